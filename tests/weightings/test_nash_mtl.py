"""Nash-MTL: the bargaining equation, its degenerate cases, warm starts, and torchjd's solver."""

import io
import math

import pytest
import torch
from _gramians import KINDS, gramian_of

from bucketmoo_hooks import objective_key, reference
from bucketmoo_hooks.weightings import MGDA, NashMTL, WeightingContext
from bucketmoo_hooks.weightings._nash_mtl import bargain, unit_problem

KEYS = tuple(objective_key(language) for language in ("en", "de", "ja", "ko", "ar"))


def context(problem: tuple[int, ...] | None = (0,), objectives=KEYS[:3]) -> WeightingContext:
    return WeightingContext(0, 0, objectives, problem=problem)


def residual(gramian: torch.Tensor, alpha: torch.Tensor) -> float:
    """``max_i |α_i (Gα)_i − 1|``: how far ``α`` is from the bargaining solution."""
    g, alpha = gramian.double(), alpha.double()
    return (alpha * (g @ alpha) - 1).abs().max().item()


# Gramians of full rank, or with duplicates: the bargaining problem has a solution.
SOLVABLE = ("gaussian", "shared_component", "duplicated", "spread_norms", "conflicting")


@pytest.mark.parametrize("kind", SOLVABLE)
@pytest.mark.parametrize("num_objectives", [2, 3, 4, 8, 16])
def test_paper_weights_solve_the_bargaining_equation(kind: str, num_objectives: int) -> None:
    """α_i (Gα)_i = 1 (Navon et al. 2022, Theorem 5.1), up to the noise-level ridge."""
    for seed in range(3):
        gramian = gramian_of(kind, num_objectives, seed).double()
        alpha = NashMTL(normalization="none")(gramian)
        assert (alpha > 0).all()
        assert residual(gramian, alpha) <= 1e-9, (kind, num_objectives, seed)


@pytest.mark.parametrize("num_objectives", [3, 4, 8, 16])
def test_without_a_bargaining_solution_the_update_tends_to_the_min_norm_point(
    num_objectives: int,
) -> None:
    """Rank-2 gradients with 0 in their convex hull: no direction improves them all, so α_i (Gα)_i
    = 1 has no solution; the ridge makes d tiny, as MGDA's (d = 0)."""
    for seed in range(3):
        gramian = gramian_of("low_rank", num_objectives, seed).double()
        if MGDA()(gramian) @ gramian @ MGDA()(gramian) > 1e-12 * gramian.diagonal().max():
            continue  # this draw has a common descent direction
        weights = NashMTL()(gramian)
        update_norm_squared = weights @ gramian @ weights
        assert update_norm_squared <= 1e-9 * gramian.diagonal().max(), (num_objectives, seed)


def test_two_objectives_get_inverse_norm_weights() -> None:
    """For L = 2 the unit-gradient Gramian is symmetric, so β₀ = β₁ and w_i ∝ 1/‖ḡ_i‖."""
    for cosine in (-0.9, -0.3, 0.0, 0.5, 0.99):
        for norms in ((1.0, 1.0), (1.0, 3.0), (1e-4, 2.0)):
            a, b = norms
            gramian = torch.tensor([[a * a, cosine * a * b], [cosine * a * b, b * b]])
            expected = torch.tensor([1 / a, 1 / b]) / (1 / a + 1 / b)
            torch.testing.assert_close(NashMTL()(gramian), expected, rtol=1e-6, atol=0)


PINNED = [
    # CONFLICT_2, ḡ₀ = e₁, ḡ₁ = −e₁ + √3e₂: α₀²(1 − r) = 1 = α₀²(4r² − r), r = α₁/α₀ = ½.
    ([[1.0, -1.0], [-1.0, 4.0]], [2 / 3, 1 / 3]),
    (
        [[1.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 9.0]],
        [6 / 11, 3 / 11, 2 / 11],
    ),  # α_i = 1/‖ḡ_i‖
    # e₁, e₁, 2e₂: α₀ = α₁ = 1/√2 (2α₀² = 1), α₂ = ½ (4α₂² = 1).
    (
        [[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 4.0]],
        [x / (math.sqrt(2) + 0.5) for x in (1 / math.sqrt(2), 1 / math.sqrt(2), 0.5)],
    ),
    ([[1.0, -1.0], [-1.0, 1.0]], [0.5, 0.5]),  # no solution; by symmetry, and d = 0
    ([[1.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 0.0]], [2 / 3, 1 / 3, 0.0]),  # zero gradient
]


@pytest.mark.parametrize(("gramian", "expected"), PINNED, ids=str)
def test_pinned_values(gramian: list, expected: list[float]) -> None:
    for dtype, tolerance in ((torch.float32, 1e-6), (torch.float64, 1e-12)):
        weights = NashMTL()(torch.tensor(gramian, dtype=dtype))
        torch.testing.assert_close(
            weights, torch.tensor(expected, dtype=dtype), rtol=0, atol=tolerance
        )


def test_paper_normalisation_keeps_the_update_length_fixed() -> None:
    """With normalization="none", L identical gradients give d = √L ḡ/‖ḡ‖ whatever ‖ḡ‖."""
    for scale in (1e-6, 1.0, 1e6):
        gradient = scale * torch.randn(1, 50, dtype=torch.float64)
        for num_objectives in (1, 2, 4):
            grads = gradient.expand(num_objectives, -1)
            update = reference.combine(grads, NashMTL(normalization="none")).update
            expected = math.sqrt(num_objectives) * gradient[0] / gradient.norm()
            torch.testing.assert_close(update, expected, rtol=1e-9, atol=0)


def test_update_improves_every_objective_when_it_can() -> None:
    """⟨d, ḡ_i⟩ = (Gw)_i > 0 for every objective of a solvable problem (it is 1/α_i up to scale)."""
    for kind in SOLVABLE:
        for num_objectives in (2, 3, 5, 8):
            gramian = gramian_of(kind, num_objectives, seed=4).double()
            assert (gramian @ NashMTL()(gramian) > 0).all(), (kind, num_objectives)


# -- the solver ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_default_iterations_reach_the_limit(kind: str) -> None:
    """The default 2L + 16 iterations give the weights of 400 iterations to 1e-7, from cold."""
    for num_objectives in (3, 4, 8, 16):
        for seed in range(3):
            gramian = gramian_of(kind, num_objectives, seed)
            limit = NashMTL(iterations=400)(gramian)
            torch.testing.assert_close(NashMTL()(gramian), limit, rtol=0, atol=1e-7)


def test_early_stop_on_cpu_is_bit_exact() -> None:
    """The CPU stops at an exact fixed point, so stopping changes no bit of the result."""
    for kind in KINDS:
        for num_objectives in (3, 8, 16):
            c, inverse, _ = unit_problem(gramian_of(kind, num_objectives, seed=0))
            start = torch.ones_like(inverse)
            assert torch.equal(bargain(c, start, 100, True), bargain(c, start, 100, False))


def test_iterations_and_normalization_are_validated() -> None:
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="iterations must be a positive int"):
            NashMTL(iterations=bad)
    with pytest.raises(ValueError, match=r"normalization must be one of \('sum', 'none'\)"):
        NashMTL(normalization="l2")
    assert repr(NashMTL()) == "NashMTL(iterations=None, normalization='sum')"


# -- warm starts ---------------------------------------------------------------------------------


def test_warm_start_is_kept_per_problem_and_objective() -> None:
    """One Newton step from the last solution (warm) is closer than one from cold."""
    gramian = gramian_of("conflicting", 3, seed=1)
    limit = NashMTL(iterations=400)(gramian)
    warm = NashMTL(iterations=1)
    cold_error = (warm(gramian, context()) - limit).abs().max()
    for _ in range(10):
        weights = warm(gramian, context())
    assert (weights - limit).abs().max() < 1e-3 * cold_error
    # Another problem, or no problem key, starts cold.
    torch.testing.assert_close((warm(gramian, context((7,))) - limit).abs().max(), cold_error)
    torch.testing.assert_close((warm(gramian, None) - limit).abs().max(), cold_error)
    torch.testing.assert_close((warm(gramian, context(None)) - limit).abs().max(), cold_error)
    assert [entry["problem"] for entry in warm.state_dict()["starts"]] == [[0], [7]]


def test_warm_starts_follow_objectives_by_key() -> None:
    """A new objective joins with the cold start; known ones keep theirs, in any order."""
    weighting = NashMTL(iterations=400)
    gramian = gramian_of("shared_component", 3, seed=2)
    weighting(gramian, context(objectives=KEYS[:3]))
    before = weighting.state_dict()["starts"][0]
    permutation = [2, 0, 1]
    objectives = (*(KEYS[i] for i in permutation), KEYS[3])
    bigger = gramian_of("shared_component", 4, seed=2)
    bigger[:3, :3] = gramian[permutation][:, permutation]
    weighting(bigger, context(objectives=objectives))
    after = weighting.state_dict()["starts"][0]
    assert after["objectives"] == list(KEYS[:4])
    assert after["beta"].shape == (4,)
    assert not torch.equal(after["beta"][:3], before["beta"])


def test_state_dict_round_trips_through_a_weights_only_load() -> None:
    weighting = NashMTL(iterations=2)
    for problem in ((0,), (1, 2)):
        weighting(gramian_of("gaussian", 3, seed=problem[-1]), context(problem))
    buffer = io.BytesIO()
    torch.save(weighting.state_dict(), buffer)
    buffer.seek(0)
    restored = NashMTL(iterations=2)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    gramian = gramian_of("conflicting", 3, seed=5)
    torch.testing.assert_close(restored(gramian, context()), weighting(gramian, context()))


def test_load_state_dict_validates() -> None:
    weighting = NashMTL()
    with pytest.raises(ValueError, match="not a NashMTL state"):
        weighting.load_state_dict({"targets": []})
    with pytest.raises(ValueError, match=r"NashMTL state for problem \[0\]: beta must be"):
        weighting.load_state_dict(
            {"starts": [{"problem": [0], "objectives": [1, 2], "beta": torch.ones(3)}]}
        )
    with pytest.raises(ValueError, match="every entry must be a dict with keys"):
        weighting.load_state_dict({"starts": [{"problem": [0], "beta": torch.ones(3)}]})


# -- torchjd -------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_agrees_with_torchjd_where_its_solver_converges(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchjd's NashMTL (the paper's sequence of convex programs, ECOS) stops when
    ‖Gα − 1/α‖ < 1e-3; here it runs with tight ECOS tolerances until its iterate stops moving
    (relative change ≤ 1e-10: from the second program on where it converges, its later iterates
    differ at ECOS's round-off only; at most 40 programs). It then reaches the bargaining
    equation to 1e-8 on most of these Gramians, where the paper's weights agree to 1e-8; on the
    others (strong conflicts) it stalls, while this solver reaches 1e-9 on all.
    (Norms spread over 1e6 make ECOS stall every time: seen residuals up to 1e3; left out.)"""
    pytest.importorskip("cvxpy")
    pytest.importorskip("ecos")
    numpy = pytest.importorskip("numpy")
    from torchjd.aggregation._nash_mtl import _NashMTLWeighting

    solve = __import__("cvxpy").Problem.solve

    def tight(self, *args, **kwargs):
        tolerances = {"abstol": 1e-12, "reltol": 1e-12, "feastol": 1e-12, "max_iters": 500}
        return solve(self, *args, **{**kwargs, **tolerances})

    def converged(self, gtg, alpha):
        new = self.alpha_param.value  # the program's solution; alpha: the iterate it started from
        return bool(new is None or numpy.abs(new - alpha).max() <= 1e-10 * numpy.abs(new).max())

    monkeypatch.setattr(__import__("cvxpy").Problem, "solve", tight)
    monkeypatch.setattr(_NashMTLWeighting, "_stop_criteria", converged)
    compared = 0
    for kind in ("gaussian", "shared_component", "duplicated", "conflicting"):
        for num_objectives in (2, 3, 5, 8):
            for seed in range(2):
                gramian = gramian_of(kind, num_objectives, seed).double()
                eigenvalues, eigenvectors = torch.linalg.eigh(gramian)
                jacobian = eigenvectors * eigenvalues.clamp_min(0).sqrt()  # J Jᵀ = G
                theirs = _NashMTLWeighting(num_objectives, 0.0, 1, 40)(jacobian).double()
                mine = NashMTL(normalization="none")(gramian)
                assert residual(gramian, mine) <= 1e-9
                if residual(gramian, theirs) <= 1e-8:
                    compared += 1
                    error = (mine - theirs).abs().max() / theirs.abs().max()
                    assert error <= 1e-8, (kind, num_objectives, seed)
    assert compared >= 28
