"""Weightings on their own: properties shared by all, pinned values, MGDA's stated accuracy."""

import math

import pytest
import torch

from bucketmoo_hooks import reference, weighting_names
from bucketmoo_hooks.weightings import (
    MGDA,
    CallableWeighting,
    Mean,
    Weighting,
    duality_gap,
    get_weighting,
)
from bucketmoo_hooks.weightings._mgda import _active_set

KINDS = ("gaussian", "shared_component", "low_rank", "duplicated", "spread_norms", "conflicting")


def gramian_of(kind: str, num_objectives: int, seed: int, dim: int = 200) -> torch.Tensor:
    """A Gramian of ``num_objectives`` gradients of one structured family."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    if kind == "gaussian":
        grads = randn(num_objectives, dim)
    elif kind == "shared_component":  # mostly aligned, as languages usually are
        grads = 3 * randn(1, dim) + randn(num_objectives, dim)
    elif kind == "low_rank":
        grads = randn(num_objectives, 2) @ randn(2, dim)
    elif kind == "duplicated":
        base = randn(num_objectives // 2 + 1, dim)
        grads = torch.cat([base, base[: num_objectives - base.shape[0]]])
    elif kind == "spread_norms":
        grads = randn(num_objectives, dim) * torch.logspace(-3, 3, num_objectives)[:, None]
    else:  # two opposed camps
        camp = randn(1, dim)
        signs = torch.where(torch.rand(num_objectives, 1, generator=generator) < 0.5, 1.0, -1.0)
        grads = 0.3 * randn(num_objectives, dim) + signs * camp
    return (grads @ grads.T).float()


ZOO = [
    (kind, num_objectives, seed)
    for kind in KINDS
    for num_objectives in (1, 2, 3, 4, 8, 16, 32)
    for seed in range(5)
]


# -- every weighting -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", weighting_names())
@pytest.mark.parametrize("num_objectives", [1, 2, 3, 5])
def test_weights_are_finite_float32_on_the_gramian_device(name: str, num_objectives: int) -> None:
    for kind in KINDS:
        weights = get_weighting(name)(gramian_of(kind, num_objectives, seed=1))
        assert weights.shape == (num_objectives,)
        assert weights.dtype == torch.float32
        assert torch.isfinite(weights).all()


@pytest.mark.parametrize("name", weighting_names())
def test_identical_gradients_give_that_gradient_back(name: str) -> None:
    gradient = torch.randn(1, 300, dtype=torch.float64)
    for num_objectives in (1, 2, 3, 6):
        update = reference.combine(gradient.expand(num_objectives, -1), name).update
        torch.testing.assert_close(update, gradient[0], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", weighting_names())
def test_permutation_equivariance(name: str) -> None:
    for kind in ("gaussian", "shared_component", "conflicting", "spread_norms"):
        gramian = gramian_of(kind, 6, seed=3)
        permutation = torch.randperm(6, generator=torch.Generator().manual_seed(0))
        weights = get_weighting(name)(gramian)
        permuted = get_weighting(name)(gramian[permutation][:, permutation])
        torch.testing.assert_close(permuted, weights[permutation], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", weighting_names())
@pytest.mark.parametrize("scale", [1e-12, 1e12])
def test_weights_do_not_depend_on_the_gradient_scale(name: str, scale: float) -> None:
    gramian = gramian_of("shared_component", 5, seed=2)
    torch.testing.assert_close(
        get_weighting(name)(gramian * scale), get_weighting(name)(gramian), rtol=1e-5, atol=1e-6
    )


# -- registry and plug-ins -----------------------------------------------------------------------


def test_registry_names_and_descriptions() -> None:
    assert {"mean", "mgda"} <= set(weighting_names())
    for name in weighting_names():
        weighting = get_weighting(name)
        assert weighting.name == name
        assert weighting.description


def test_unknown_name_is_a_clear_value_error() -> None:
    with pytest.raises(ValueError, match=r"weighting='mdga' is not a known weighting.*'mgda'"):
        get_weighting("mdga")


def test_non_callable_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="weighting must be a name"):
        get_weighting(3)  # type: ignore[arg-type]


def test_instances_pass_through_and_callables_are_wrapped() -> None:
    mgda = MGDA(iterations=7)
    assert get_weighting(mgda) is mgda

    def first_only(gramian: torch.Tensor) -> torch.Tensor:
        weights = torch.zeros(gramian.shape[0], dtype=torch.float64)
        weights[0] = 1
        return weights

    wrapped = get_weighting(first_only)
    assert isinstance(wrapped, CallableWeighting)
    weights = wrapped(torch.eye(3))
    assert weights.dtype == torch.float32
    assert weights.tolist() == [1.0, 0.0, 0.0]
    assert "first_only" in repr(wrapped)


def test_callable_with_wrong_output_shape_is_refused() -> None:
    with pytest.raises(ValueError, match=r"must return a tensor of shape \[3\].*got \(2,\)"):
        get_weighting(lambda gramian: torch.ones(2))(torch.eye(3))
    with pytest.raises(ValueError, match="got list"):
        get_weighting(lambda gramian: [1.0, 0.0, 0.0])(torch.eye(3))


def test_non_square_gramian_is_refused() -> None:
    with pytest.raises(ValueError, match=r"square matrix \[L, L\], got shape \(2, 3\)"):
        Mean()(torch.ones(2, 3))


def test_duplicate_registration_is_refused() -> None:
    with pytest.raises(ValueError, match="already registered"):

        class AnotherMean(Weighting):
            name = "mean"
            description = "duplicate"

            def forward(self, gramian, context):  # pragma: no cover - never instantiated
                return gramian.diagonal()


def test_mean_weights() -> None:
    assert Mean()(torch.eye(4)).tolist() == [0.25] * 4


# -- MGDA ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "num_objectives", "seed"), ZOO)
def test_mgda_is_on_the_simplex_and_optimal(kind: str, num_objectives: int, seed: int) -> None:
    """The stated accuracy: relative duality gap ≤ 1e-6 (KKT conditions to fp32 round-off)."""
    gramian = gramian_of(kind, num_objectives, seed)
    weights = MGDA()(gramian)
    assert (weights >= 0).all()
    assert math.isclose(weights.sum().item(), 1.0, rel_tol=1e-6)
    assert duality_gap(gramian, weights) <= 1e-6

    g, w = gramian.double(), weights.double()
    gw, value = g @ w, w @ g @ w
    scale = g.diagonal().max()
    # (Gw)_i ≥ wᵀGw for every objective, with equality where the weight is positive.
    assert (gw >= value - 1e-6 * scale).all()
    assert ((gw - value).abs()[w > 1e-4] <= 1e-5 * scale).all()


@pytest.mark.parametrize(
    ("gramian", "expected"),
    [
        ([[1.0, 0.0], [0.0, 4.0]], [0.8, 0.2]),
        ([[4.0, 2.0], [2.0, 1.0]], [0.0, 1.0]),  # ḡ₁ = ḡ₀/2: the shorter one is the min-norm point
        ([[1.0, -1.0], [-1.0, 1.0]], [0.5, 0.5]),  # opposite: d = 0
        ([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 2.0]], [0.5, 0.5, 0.0]),  # e₁, e₂, e₁+e₂
        ([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 4.0]], [4 / 7, 2 / 7, 1 / 7]),
        ([[1.0, -0.5, -0.5], [-0.5, 1.0, -0.5], [-0.5, -0.5, 1.0]], [1 / 3] * 3),  # equilateral
    ],
)
def test_mgda_pinned_values(gramian: list[list[float]], expected: list[float]) -> None:
    weights = MGDA()(torch.tensor(gramian))
    torch.testing.assert_close(weights, torch.tensor(expected), rtol=0, atol=1e-6)


def test_mgda_identical_gradients_give_equal_weights() -> None:
    weights = MGDA()(torch.full((4, 4), 3.0))
    torch.testing.assert_close(weights, torch.full((4,), 0.25), rtol=0, atol=1e-6)


def test_mgda_duplicated_objectives_share_their_weight() -> None:
    grads = torch.randn(2, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    grads = torch.cat([grads, grads[:1]])  # objective 2 duplicates objective 0
    weights = MGDA()((grads @ grads.T).float())
    assert abs(weights[0] - weights[2]) <= 1e-6


def test_mgda_zero_gramian_gives_uniform_weights() -> None:
    for num_objectives in (2, 3, 5):
        weights = MGDA()(torch.zeros(num_objectives, num_objectives))
        torch.testing.assert_close(weights, torch.full((num_objectives,), 1 / num_objectives))


def test_mgda_update_is_a_common_descent_direction() -> None:
    """⟨d, ḡ_ℓ⟩ ≥ ‖d‖² > 0 for every objective when one exists (Désidéri's theorem)."""
    generator = torch.Generator().manual_seed(5)
    grads = 2 * torch.randn(1, 64, generator=generator) + torch.randn(5, 64, generator=generator)
    update = reference.combine(grads.double(), "mgda").update
    assert (grads.double() @ update >= update @ update * (1 - 1e-6)).all()


def test_mgda_fixed_iterations_are_configurable_and_validated() -> None:
    gramian = gramian_of("conflicting", 6, seed=0)
    assert duality_gap(gramian, MGDA(iterations=1)(gramian)) >= 0
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="iterations must be a positive int"):
            MGDA(iterations=bad)  # type: ignore[arg-type]


def test_mgda_early_stop_on_cpu_is_bit_exact() -> None:
    """The CPU stops at the active-set fixed point; the GPU runs all iterations: same bits."""
    for kind, num_objectives, seed in ZOO:
        if num_objectives < 3:
            continue
        g = gramian_of(kind, num_objectives, seed).double()
        g = g / g.diagonal().sum()
        full = _active_set(g, 2 * num_objectives, stop_at_fixed_point=False)
        early = _active_set(g, 2 * num_objectives, stop_at_fixed_point=True)
        assert torch.equal(full, early), (kind, num_objectives, seed)


def test_duality_gap_of_a_vertex() -> None:
    assert duality_gap(torch.eye(3), torch.tensor([1.0, 0.0, 0.0])).item() == 1.0
    uniform = torch.full((3,), 1 / 3, dtype=torch.float64)
    assert duality_gap(torch.eye(3), uniform).item() == pytest.approx(0, abs=1e-15)
