"""GradVac: the stateful weighting (targets per problem and objective pair)."""

import io
import math

import pytest
import torch

from bucketmoo_hooks import objective_key
from bucketmoo_hooks.weightings import GradVac, PCGrad, WeightingContext

KEYS = tuple(objective_key(language) for language in ("en", "de", "ja", "ko"))


def context(step: int, problem: tuple[int, ...] = (0, 1), objectives=KEYS) -> WeightingContext:
    return WeightingContext(step, 0, objectives, problem=problem)


def conflicting_gramian(num_objectives: int = 4, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    shared = torch.randn(1, 32, generator=generator)
    grads = torch.randn(num_objectives, 32, generator=generator) - shared * torch.tensor(
        [1.0, -1.0, 1.0, -1.0][:num_objectives]
    ).unsqueeze(1)
    return grads @ grads.T


def test_with_zero_targets_it_is_pcgrad() -> None:
    gramian = conflicting_gramian()
    torch.testing.assert_close(GradVac()(gramian, context(0)), PCGrad()(gramian, context(0)))


def test_targets_follow_the_cosines_with_rate_beta() -> None:
    gramian = torch.tensor([[1.0, 0.5], [0.5, 1.0]])  # cosine 0.5 ≥ target 0: no adjustment
    weighting = GradVac(beta=0.25)
    weights = weighting(gramian, context(0, objectives=KEYS[:2]))
    torch.testing.assert_close(weights, torch.tensor([0.5, 0.5]))
    cosines = weighting.state_dict()["targets"][0]["cosines"]
    torch.testing.assert_close(
        cosines, torch.tensor([[0.0, 0.125], [0.125, 0.0]], dtype=torch.float64)
    )


def test_a_conflicting_pair_is_moved_exactly_onto_its_target() -> None:
    """g₀ = (1, 0), g₁ at 120° (cosine −½), target ½: afterwards cos(g₀', g₁) = ½."""
    grads = torch.tensor([[1.0, 0.0], [-0.5, math.sqrt(3) / 2]], dtype=torch.float64)
    weighting = GradVac()
    weighting.load_state_dict(
        {
            "targets": [
                {
                    "problem": [0, 1],
                    "objectives": list(KEYS[:2]),
                    "cosines": torch.tensor([[0.0, 0.5], [0.5, 0.0]], dtype=torch.float64),
                }
            ]
        }
    )
    weights = weighting((grads @ grads.T).float(), context(0, objectives=KEYS[:2])).double()
    # weights = column means of C, with C = [[1, c₀₁], [c₁₀, 1]].
    c01, c10 = 2 * weights[1] - 1, 2 * weights[0] - 1
    moved = [grads[0] + c01 * grads[1], grads[1] + c10 * grads[0]]
    for i, j in ((0, 1), (1, 0)):
        cosine = moved[i] @ grads[j] / (moved[i].norm() * grads[j].norm())
        assert cosine.item() == pytest.approx(0.5, abs=1e-6)


def test_state_is_kept_per_problem_and_per_objective_pair() -> None:
    weighting = GradVac(beta=0.5)
    gramian = conflicting_gramian()
    weighting(gramian, context(0, problem=(0,)))
    weighting(gramian[:2, :2], context(1, problem=(1,), objectives=KEYS[:2]))
    # A step with a different objective set keeps the targets of the absent objectives.
    weighting(gramian[1:, 1:], context(2, problem=(0,), objectives=KEYS[1:]))
    state = {tuple(e["problem"]): e for e in weighting.state_dict()["targets"]}
    assert state[(0,)]["objectives"] == list(KEYS)
    assert state[(1,)]["objectives"] == list(KEYS[:2])
    assert state[(0,)]["cosines"][0, 1] != 0  # en–de from step 0, untouched at step 2


def test_state_dict_round_trip_is_safe_and_exact() -> None:
    weighting = GradVac()
    for step in range(3):
        weighting(conflicting_gramian(seed=step), context(step))
    buffer = io.BytesIO()
    torch.save(weighting.state_dict(), buffer)
    buffer.seek(0)
    restored = GradVac()
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    gramian = conflicting_gramian(seed=9)
    assert torch.equal(restored(gramian, context(3)), weighting(gramian, context(3)))


def test_bad_arguments_and_states() -> None:
    for beta in (0, -0.1, 1.5, "0.1", True):
        with pytest.raises(ValueError, match=r"beta must be a number in \(0, 1\]"):
            GradVac(beta=beta)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs stable bucket keys: register the hook"):
        GradVac()(torch.eye(2), WeightingContext(0, 0, KEYS[:2]))
    with pytest.raises(ValueError, match="not a GradVac state"):
        GradVac().load_state_dict({"ema": []})
    bad = {"targets": [{"problem": [0], "objectives": [1, 2], "cosines": torch.zeros(3, 3)}]}
    expected = r"cosines must be a tensor of shape \[2, 2\] \(one row per objective\), got \[3, 3\]"
    with pytest.raises(ValueError, match=expected):
        GradVac().load_state_dict(bad)
