"""Weightings on their own: properties shared by all, pinned values, MGDA's stated accuracy."""

import math
import re

import pytest
import torch
from _gramians import KINDS, gramian_of

from bucketmoo_hooks import reference, weighting_names
from bucketmoo_hooks.weightings import (
    IMTLG,
    MGDA,
    AlignedMTL,
    CAGrad,
    CallableWeighting,
    DualProj,
    Mean,
    NashMTL,
    PCGrad,
    UPGrad,
    Weighting,
    WeightingContext,
    duality_gap,
    get_weighting,
)
from bucketmoo_hooks.weightings._cagrad import cagrad_dual
from bucketmoo_hooks.weightings._mgda import _active_set
from bucketmoo_hooks.weightings._solvers import (
    dual_cone_weights,
    jacobi_eigh,
    noise_level,
    regularise,
)

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


# PCGrad visits the other objectives in a random order drawn per objective *position* (Yu et al.
# 2020, Algorithm 1), so relabelling the objectives changes which order each one gets: it is not
# permutation equivariant for L ≥ 3 (see test_pcgrad_permutation_equivariance_where_it_holds).
# GradVac visits in PCGrad's order (Wang et al. 2021, Algorithm 1), so the same holds for it.
PERMUTATION_EQUIVARIANT = [n for n in weighting_names() if n not in ("pcgrad", "gradvac")]


@pytest.mark.parametrize("name", PERMUTATION_EQUIVARIANT)
def test_permutation_equivariance(name: str) -> None:
    for kind in ("gaussian", "shared_component", "conflicting", "spread_norms"):
        gramian = gramian_of(kind, 6, seed=3)
        permutation = torch.randperm(6, generator=torch.Generator().manual_seed(0))
        weights = get_weighting(name)(gramian)
        permuted = get_weighting(name)(gramian[permutation][:, permutation])
        torch.testing.assert_close(permuted, weights[permutation], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", weighting_names())
@pytest.mark.parametrize("scale", [1e-20, 1e-12, 1e12, 1e20])
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


# -- the other methods: shared helpers -------------------------------------------------------------

NEW_METHODS = ("pcgrad", "cagrad", "imtl_g", "upgrad", "dualproj", "aligned_mtl", "nash_mtl")


def normalised(gramian: torch.Tensor) -> torch.Tensor:
    g = gramian.double()
    return g / g.diagonal().sum()


def visiting_orders(pcgrad: PCGrad, num_objectives: int, context: WeightingContext | None):
    """Objective i's order of visits (the other objectives), as lists."""
    ranks = pcgrad.visiting_ranks(num_objectives, context, "cpu")
    return [row.argsort()[: num_objectives - 1].tolist() for row in ranks]


def pcgrad_on_vectors(grads: torch.Tensor, orders: list[list[int]]) -> torch.Tensor:
    """Yu et al. 2020, Algorithm 1 on explicit float64 gradient vectors; the mean of the g_i'."""
    projected = []
    for i, order in enumerate(orders):
        g_i = grads[i].clone()
        for j in order:
            inner = g_i @ grads[j]
            if inner < 0:
                g_i = g_i - inner / (grads[j] @ grads[j]) * grads[j]
        projected.append(g_i)
    return torch.stack(projected).mean(dim=0)


def test_new_methods_are_registered_with_descriptions() -> None:
    assert set(NEW_METHODS) <= set(weighting_names())
    for name in NEW_METHODS:
        # "What it does (paper year)." on one line
        assert re.fullmatch(r"[^\n]+\([^)]*\d{4}[^)]*\)\.", get_weighting(name).description)


@pytest.mark.parametrize("name", NEW_METHODS)
def test_zero_gramian_gives_uniform_weights(name: str) -> None:
    """Every gradient is zero, so d = 0 for any weights; the methods return 1/L (documented)."""
    for num_objectives in (1, 2, 3, 5):
        weights = get_weighting(name)(torch.zeros(num_objectives, num_objectives))
        expected = torch.full((num_objectives,), 1 / num_objectives)
        torch.testing.assert_close(weights, expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("name", [*NEW_METHODS, "mgda"])
def test_degenerate_gramians_give_finite_weights(name: str) -> None:
    generator = torch.Generator().manual_seed(11)
    directions = torch.randn(5, 40, generator=generator, dtype=torch.float64)
    cases = []
    for exponent, dtype in ((9, torch.float32), (20, torch.float64)):  # norms 1e-x … 1e+x
        grads = directions * torch.logspace(-exponent, exponent, 5, dtype=torch.float64)[:, None]
        cases.append((grads @ grads.T).to(dtype))
    rank_one = directions[:1].expand(4, -1) * torch.tensor([[1.0], [-2.0], [3.0], [0.5]])
    cases.append((rank_one @ rank_one.T).float())
    with_zero = torch.cat([directions[:3], torch.zeros(1, 40, dtype=torch.float64)])
    cases.append((with_zero @ with_zero.T).float())
    base = directions[:3] @ directions[:3].T
    cases += [(base * 1e-30).float(), base * 1e-300, base * 1e300]
    opposite = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    cases += [opposite, opposite * 1e-30]
    for gramian in cases:
        weights = get_weighting(name)(gramian)
        assert weights.dtype == gramian.dtype
        assert torch.isfinite(weights).all(), (name, gramian)


@pytest.mark.parametrize(
    "weighting",
    [
        PCGrad(seed=3),
        CAGrad(c=0.25, iterations=5),
        IMTLG(),
        UPGrad(reg_eps=1e-4, iterations=7),
        DualProj(reg_eps=0.5),
        AlignedMTL(scale_mode="rmse"),
        MGDA(iterations=4, normalization="l2"),
        NashMTL(iterations=5, normalization="none"),
    ],
    ids=repr,
)
def test_repr_is_deterministic_and_shows_every_hyperparameter(weighting: Weighting) -> None:
    text = repr(weighting)
    assert text == repr(weighting)
    assert eval(text, {cls.__name__: cls for cls in Weighting._registry.values()}).__dict__ == (
        weighting.__dict__
    )


def test_mgda_repr_without_normalisation_is_unchanged() -> None:
    assert repr(MGDA(iterations=9)) == "MGDA(iterations=9)"
    assert repr(MGDA(normalization="l2")) == "MGDA(iterations=None, normalization='l2')"


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: PCGrad(seed=1.5), "seed must be an int"),
        (lambda: PCGrad(seed=True), "seed must be an int"),
        (lambda: CAGrad(c=-0.1), "c must be a finite number ≥ 0"),
        (lambda: CAGrad(c=math.inf), "c must be a finite number ≥ 0"),
        (lambda: CAGrad(c=math.nan), "c must be a finite number ≥ 0"),
        (lambda: CAGrad(c="0.4"), "c must be a finite number ≥ 0"),
        (lambda: CAGrad(iterations=0), "iterations must be a positive int"),
        (lambda: UPGrad(reg_eps=-1e-4), "reg_eps must be a finite number ≥ 0"),
        (lambda: UPGrad(iterations=2.0), "iterations must be a positive int"),
        (lambda: DualProj(reg_eps=math.inf), "reg_eps must be a finite number ≥ 0"),
        (lambda: DualProj(iterations=-3), "iterations must be a positive int"),
        (lambda: AlignedMTL(scale_mode="max"), "scale_mode must be one of"),
        (lambda: MGDA(normalization="loss"), r"normalization must be one of \('none', 'l2'\)"),
    ],
)
def test_hyperparameters_are_validated(factory, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        factory()


def test_paper_defaults() -> None:
    assert CAGrad().c == 0.4  # Liu et al. 2021, NYU-v2 and CityScapes
    assert AlignedMTL().scale_mode == "min"  # Senushkin et al. 2023, Algorithm 1
    assert UPGrad().reg_eps == DualProj().reg_eps == 0.0  # the exact projection
    assert MGDA().normalization == "none"


# -- pinned values, derived by hand (see each comment) ---------------------------------------------

SQRT5 = math.sqrt(5)
ORTHOGONAL_2 = [[1.0, 0.0], [0.0, 4.0]]  # ḡ₀ = e₁, ḡ₁ = 2e₂
OBTUSE_2 = [[1.0, -0.5], [-0.5, 1.0]]  # unit vectors 120° apart
CONFLICT_2 = [[1.0, -1.0], [-1.0, 4.0]]  # ḡ₀ = e₁, ḡ₁ = −e₁ + √3e₂
STRONG_CONFLICT_2 = [[1.0, -2.0], [-2.0, 9.0]]  # ḡ₀ = e₁, ḡ₁ = −2e₁ + √5e₂
OPPOSITE_2 = [[1.0, -1.0], [-1.0, 1.0]]
ORTHOGONAL_3 = [[1.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 9.0]]  # e₁, 2e₂, 3e₃
ONE_CONFLICT_3 = [[1.0, 0.0, -1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 2.0]]  # e₁, e₂, −e₁ + e₃
DUPLICATE_3 = [[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 4.0]]  # e₁, e₁, 2e₂

PINNED = [
    # PCGrad (means of the projected gradients). OBTUSE_2: g₀' = g₀ + g₁/2, g₁' = g₁ + g₀/2.
    (PCGrad(), ORTHOGONAL_2, [0.5, 0.5]),
    (PCGrad(), OBTUSE_2, [0.75, 0.75]),
    # g₀' = g₀ + g₁/4 (⟨g₀,g₁⟩/‖g₁‖² = −1/4), g₁' = g₁ + g₀: mean (2g₀ + 5g₁/4)/2.
    (PCGrad(), CONFLICT_2, [1.0, 0.625]),
    (PCGrad(), OPPOSITE_2, [1.0, 1.0]),  # g₀' = g₁' = 0
    # g₀' = g₀ + g₂/2 = (e₁ + e₃)/2, g₁' = g₁, g₂' = g₂ + g₀ = e₃, whatever the order.
    (PCGrad(), ONE_CONFLICT_3, [2 / 3, 1 / 3, 1 / 2]),
    # CAGrad, c = 0.4 (weights (u + λw*)/(1 + c)). ORTHOGONAL_2: F(w₀) = 2 − 1.5w₀ +
    # √φ·√(w₀² + 4(1 − w₀)²), √φ = 0.4‖g₀‖ = 0.2√5, is decreasing on [0, 1] (F' ≤ −1.5 + √φ < 0),
    # so w* = e₀, ‖g_w*‖ = 1, λ = 0.2√5.
    (CAGrad(), ORTHOGONAL_2, [(0.5 + 0.2 * SQRT5) / 1.4, 0.5 / 1.4]),
    # diag(1, 1, 4): w* = (½, ½, 0) (symmetric; ∂F/∂w₂ = 4/3 ≥ F(w*) = 1/3 + √φ/√2), λ = √φ·√2,
    # √φ = 0.4·√(2/3).
    (
        CAGrad(),
        [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 4.0]],
        [(1 / 3 + 0.4 / math.sqrt(3)) / 1.4] * 2 + [(1 / 3) / 1.4],
    ),
    (CAGrad(), OPPOSITE_2, [0.5 / 1.4, 0.5 / 1.4]),  # g₀ = 0: d = g₀/(1 + c) = 0
    (CAGrad(c=0.0), CONFLICT_2, [0.5, 0.5]),  # c = 0 is the mean
    # UPGrad: v⁽ⁱ⁾ = argmin_{v ≥ eᵢ/L} vᵀGv. OBTUSE_2: v⁽⁰⁾ = (½, ¼) ((Gv)₁ = 0), v⁽¹⁾ = (¼, ½).
    (UPGrad(), ORTHOGONAL_2, [0.5, 0.5]),
    (UPGrad(), OBTUSE_2, [0.75, 0.75]),
    (UPGrad(), CONFLICT_2, [1.0, 0.625]),  # v⁽⁰⁾ = (½, ⅛), v⁽¹⁾ = (½, ½)
    (UPGrad(), STRONG_CONFLICT_2, [1.5, 11 / 18]),  # v⁽⁰⁾ = (½, 1/9), v⁽¹⁾ = (1, ½)
    (UPGrad(), ONE_CONFLICT_3, [2 / 3, 1 / 3, 1 / 2]),  # v⁽⁰⁾ = (⅓, 0, ⅙), v⁽²⁾ = (⅓, 0, ⅓)
    # DualProj: argmin_{v ≥ 1/L} vᵀGv; the mean conflicts only in STRONG_CONFLICT_2: v = (1, ½).
    (DualProj(), OBTUSE_2, [0.5, 0.5]),
    (DualProj(), CONFLICT_2, [0.5, 0.5]),
    (DualProj(), STRONG_CONFLICT_2, [1.0, 0.5]),
    (DualProj(), ONE_CONFLICT_3, [1 / 3, 1 / 3, 1 / 3]),
    # IMTL-G: v = G⁺n, n = √diag G, w = v / 1ᵀv.
    (IMTLG(), ORTHOGONAL_2, [2 / 3, 1 / 3]),  # v = (1, ½)
    (IMTLG(), OBTUSE_2, [0.5, 0.5]),
    (IMTLG(), ORTHOGONAL_3, [6 / 11, 3 / 11, 2 / 11]),  # v = (1, ½, ⅓)
    (IMTLG(), DUPLICATE_3, [1 / 3, 1 / 3, 1 / 3]),  # G⁺ = [[¼, ¼, 0], [¼, ¼, 0], [0, 0, ¼]]
    (IMTLG(), OPPOSITE_2, [0.0, 0.0]),  # 1ᵀG⁺n = 0: no update with equal projections
    # Aligned-MTL: w = √σ V Λ^{-½} Vᵀ 1/L. ORTHOGONAL_2: σ = 1, w = (½, ¼·1) …
    (AlignedMTL(), ORTHOGONAL_2, [0.5, 0.25]),
    (AlignedMTL("median"), ORTHOGONAL_2, [0.5, 0.25]),  # lower median of (1, 4) is 1
    (AlignedMTL("rmse"), ORTHOGONAL_2, [0.5 * math.sqrt(2.5), 0.25 * math.sqrt(2.5)]),
    (AlignedMTL(), OBTUSE_2, [0.5, 0.5]),  # 1/L is an eigenvector (λ = ½ = σ)
    (AlignedMTL(), ORTHOGONAL_3, [1 / 3, 1 / 6, 1 / 9]),
    (AlignedMTL("median"), ORTHOGONAL_3, [2 / 3, 1 / 3, 2 / 9]),  # σ = 4
    (AlignedMTL("rmse"), ORTHOGONAL_3, [math.sqrt(14 / 3) * x for x in (1 / 3, 1 / 6, 1 / 9)]),
    # Eigenpairs (2, (1,1,0)/√2), (4, e₃), (0, (1,−1,0)/√2): σ = 2, w = (⅓, ⅓, √2/6).
    (AlignedMTL(), DUPLICATE_3, [1 / 3, 1 / 3, math.sqrt(2) / 6]),
    # MGDA with l2 normalisation: w' = MGDA on the unit gradients, w ∝ w'/‖ḡ‖.
    (MGDA(normalization="l2"), ORTHOGONAL_2, [2 / 3, 1 / 3]),  # w' = (½, ½); plain MGDA: (.8, .2)
    (MGDA(normalization="l2"), [[4.0, 2.0], [2.0, 1.0]], [1 / 3, 2 / 3]),  # ḡ₁ = ḡ₀/2, w' = ½
    (MGDA(normalization="l2"), ORTHOGONAL_3, [6 / 11, 3 / 11, 2 / 11]),
    (MGDA(normalization="l2"), OPPOSITE_2, [0.5, 0.5]),  # d = 0
]


@pytest.mark.parametrize(("weighting", "gramian", "expected"), PINNED, ids=str)
def test_pinned_values(weighting: Weighting, gramian: list, expected: list[float]) -> None:
    for dtype, tolerance in ((torch.float32, 1e-6), (torch.float64, 1e-12)):
        weights = weighting(torch.tensor(gramian, dtype=dtype))
        torch.testing.assert_close(
            weights, torch.tensor(expected, dtype=dtype), rtol=0, atol=tolerance
        )


# -- PCGrad ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_objectives", [2, 3, 5, 8])
def test_pcgrad_is_the_papers_algorithm_on_the_vectors(num_objectives: int) -> None:
    pcgrad = PCGrad(seed=7)
    for kind in ("gaussian", "conflicting", "spread_norms"):
        generator = torch.Generator().manual_seed(num_objectives)
        grads = torch.randn(num_objectives, 30, generator=generator, dtype=torch.float64)
        if kind == "conflicting":
            grads = grads + torch.where(torch.arange(num_objectives) % 2 == 0, 2.0, -2.0)[:, None]
        elif kind == "spread_norms":
            grads = grads * torch.logspace(-3, 3, num_objectives, dtype=torch.float64)[:, None]
        for step in range(4):
            context = WeightingContext(step, 2, tuple(range(num_objectives)))
            expected = pcgrad_on_vectors(grads, visiting_orders(pcgrad, num_objectives, context))
            update = reference.combine(grads, pcgrad, context).update
            torch.testing.assert_close(update, expected, rtol=1e-10, atol=1e-12)


def test_pcgrad_orders_are_permutations_shared_by_ranks_and_seeded() -> None:
    pcgrad = PCGrad(seed=5)
    context = WeightingContext(12, 3, (0, 1, 2, 3, 4, 5))
    ranks = pcgrad.visiting_ranks(6, context, "cpu")
    assert (ranks.diagonal() == 5).all()
    assert (ranks.sort(dim=1).values == torch.arange(6)).all()
    # A fresh instance (another rank) draws the same orders; nothing depends on global RNG state.
    torch.manual_seed(123)
    assert torch.equal(PCGrad(seed=5).visiting_ranks(6, context, "cpu"), ranks)
    assert torch.equal(
        pcgrad.visiting_ranks(6, None, "cpu"),
        pcgrad.visiting_ranks(6, WeightingContext(0, 0, ()), "cpu"),
    )
    others = [
        PCGrad(seed=6).visiting_ranks(6, context, "cpu"),
        pcgrad.visiting_ranks(6, WeightingContext(13, 3, context.objectives), "cpu"),
        pcgrad.visiting_ranks(6, WeightingContext(12, 4, context.objectives), "cpu"),
        pcgrad.visiting_ranks(6, WeightingContext(12, 3, context.objectives, segment=0), "cpu"),
    ]
    assert all(not torch.equal(other, ranks) for other in others)


def test_pcgrad_orders_are_uniform() -> None:
    """Over many steps every objective is visited first equally often (loose χ² bound)."""
    pcgrad, num_objectives, steps = PCGrad(), 4, 3000
    counts = torch.zeros(num_objectives, num_objectives)
    for step in range(steps):
        ranks = pcgrad.visiting_ranks(num_objectives, WeightingContext(step, 0, ()), "cpu")
        counts += (ranks == 0).float()
    expected = steps / (num_objectives - 1)
    off_diagonal = counts[~torch.eye(num_objectives, dtype=torch.bool)]
    chi2 = ((off_diagonal - expected) ** 2 / expected).sum()
    assert counts.diagonal().sum() == 0
    assert chi2 < 50  # 12 cells, 8 degrees of freedom: P(χ² > 50) < 1e-7


def test_pcgrad_permutation_equivariance_where_it_holds() -> None:
    """With two objectives the order is irrelevant, and without conflicts nothing is projected."""
    for num_objectives, kind in ((2, "conflicting"), (2, "gaussian"), (6, "shared_component")):
        gramian = gramian_of(kind, num_objectives, seed=3)
        if kind == "shared_component":
            assert (gramian >= 0).all()  # no conflicting pair
        permutation = torch.randperm(num_objectives, generator=torch.Generator().manual_seed(1))
        weights = PCGrad()(gramian)
        torch.testing.assert_close(
            PCGrad()(gramian[permutation][:, permutation]), weights[permutation]
        )


def test_pcgrad_guards_against_an_inconsistent_gramian() -> None:
    """Round-off may break Cauchy–Schwarz for a near-zero gradient; the update stays bounded."""
    gramian = torch.tensor([[1.0, -1e-6], [-1e-6, 1e-20]], dtype=torch.float64)  # |G₀₁| ≫ √(G₀₀G₁₁)
    weights = PCGrad()(gramian)
    # Each projection moves g_i' by at most ‖g_i'‖, so |w_ℓ|·‖ḡ_ℓ‖ stays ≤ max ‖ḡ‖ = 1 (the
    # unguarded coefficient would be 1e-6/1e-20, i.e. |w₁|·‖ḡ₁‖ = 5e3).
    assert (weights.abs() * gramian.diagonal().sqrt()).max() <= 1.0


# -- CAGrad ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "num_objectives", "seed"), ZOO)
def test_cagrad_dual_solver_is_exact(kind: str, num_objectives: int, seed: int) -> None:
    """The stated accuracy: the fixed point is reached within 2L iterations and satisfies the KKT
    conditions of min_{w∈Δ} bᵀw + √φ‖g_w‖ (on the regularised Gramian it solves) to round-off."""
    gramian = gramian_of(kind, num_objectives, seed)
    g = regularise(normalised(gramian), noise_level(gramian.dtype, num_objectives))
    uniform = torch.full((num_objectives,), 1 / num_objectives, dtype=torch.float64)
    b = normalised(gramian) @ uniform
    for c in (0.1, 0.4, 2.0):
        radius = c * torch.sqrt(uniform @ b)
        w = cagrad_dual(g, b, radius, 2 * num_objectives, stop_at_fixed_point=False)
        longer = cagrad_dual(g, b, radius, 4 * num_objectives, stop_at_fixed_point=False)
        assert torch.equal(w, longer), (kind, num_objectives, seed, c)
        early = cagrad_dual(g, b, radius, 2 * num_objectives, stop_at_fixed_point=True)
        assert torch.equal(w, early)
        assert (w >= 0).all() and abs(w.sum().item() - 1) <= 1e-9
        gradient = b + radius * (g @ w) / torch.sqrt(w @ g @ w)
        value = w @ gradient
        assert (gradient >= value - 1e-9).all()
        assert ((gradient - value).abs()[w > 1e-9] <= 1e-9).all()


def test_cagrad_maximises_the_worst_case_improvement_in_the_ball() -> None:
    """Primal check on explicit vectors: d·(1 + c) lies on the ball ‖x − g₀‖ = c‖g₀‖ and no
    point of the ball (sampled) improves min_ℓ ⟨ḡ_ℓ, x⟩."""
    generator = torch.Generator().manual_seed(3)
    grads = torch.randn(4, 6, generator=generator, dtype=torch.float64) + 0.5
    c = 0.4
    update = reference.combine(grads, CAGrad(c)).update * (1 + c)
    mean = grads.mean(dim=0)
    radius = c * mean.norm()
    assert abs((update - mean).norm() - radius) <= 1e-9 * radius
    best = (grads @ update).min()
    directions = torch.randn(20000, 6, generator=generator, dtype=torch.float64)
    samples = mean + radius * directions / directions.norm(dim=1, keepdim=True)
    assert (samples @ grads.T).min(dim=1).values.max() <= best + 1e-9


def test_cagrad_at_a_pareto_stationary_point_gives_zero() -> None:
    """0 in the hull and c ≥ 1: the optimum is at g_w = 0, where the direction is undefined."""
    grads = torch.tensor([[1.0, 0.0], [-1.0, 0.1], [0.0, -1.0]], dtype=torch.float64)
    weights = CAGrad(c=2.0)((grads @ grads.T).float())
    assert weights.abs().max() == 0
    # With c < 1 the same gradients give a genuine direction.
    assert CAGrad(c=0.4)((grads @ grads.T).float()).abs().max() > 0


# -- UPGrad and DualProj ---------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "num_objectives", "seed"), ZOO)
def test_dual_cone_solver_is_exact(kind: str, num_objectives: int, seed: int) -> None:
    """The stated accuracy: fixed point within 2L iterations, KKT of min vᵀGv s.t. v ≥ u."""
    gramian = gramian_of(kind, num_objectives, seed)
    g = regularise(normalised(gramian), noise_level(gramian.dtype, num_objectives))
    for lower in (
        torch.eye(num_objectives, dtype=torch.float64) / num_objectives,  # UPGrad
        torch.full((1, num_objectives), 1 / num_objectives, dtype=torch.float64),  # DualProj
    ):
        v = dual_cone_weights(gramian, lower, 0.0, None)
        assert torch.equal(v, dual_cone_weights(gramian, lower, 0.0, 4 * num_objectives))
        # Multipliers (Gv)_i relative to their scale √G_ii Σ_j √G_jj |v_j| (cosines), so that
        # conflicts with gradients 1e-6 times shorter than the others count too.
        norms = g.diagonal().sqrt()
        gv = (v @ g) / (norms * (v.abs() @ norms)[:, None])
        assert (v >= lower - 1e-12).all()
        assert (gv >= -1e-11).all()
        assert (gv.abs()[v > lower + 1e-9] <= 1e-11).all()


@pytest.mark.parametrize("weighting", [UPGrad(), DualProj(), MGDA(normalization="l2")], ids=repr)
@pytest.mark.parametrize("kind", KINDS)
def test_update_conflicts_with_no_objective(weighting: Weighting, kind: str) -> None:
    """⟨d, ḡ_ℓ⟩ = (Gw)_ℓ ≥ 0 for every ℓ, up to the ridge L·ε·w_ℓ‖ḡ_ℓ‖²."""
    for num_objectives in (2, 3, 5, 8, 16):
        for seed in range(3):
            gramian = gramian_of(kind, num_objectives, seed)
            g = gramian.double()
            weights = weighting(gramian).double()
            slack = 1e-5 * g.diagonal().sqrt() * g.diagonal().max().sqrt() * weights.abs().sum()
            assert (g @ weights >= -slack).all(), (kind, num_objectives, seed)


def test_upgrad_reg_eps_is_torchjds_ridge() -> None:
    """reg_eps is added to the trace-normalised Gramian; a large one approaches the mean."""
    gramian = torch.tensor(STRONG_CONFLICT_2)
    assert not torch.allclose(UPGrad()(gramian), UPGrad(reg_eps=1e6)(gramian), atol=1e-3)
    torch.testing.assert_close(UPGrad(reg_eps=1e6)(gramian), torch.tensor([0.5, 0.5]))


# -- IMTL-G and Aligned-MTL ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gaussian", "shared_component", "conflicting", "spread_norms"])
def test_imtl_g_update_has_equal_projections_on_the_unit_gradients(kind: str) -> None:
    for num_objectives in (2, 3, 5, 8):
        gramian = gramian_of(kind, num_objectives, seed=4)
        if kind == "spread_norms":
            gramian = gramian.double()  # its 1e-12 eigenvalue spread is below the fp32 cutoff
        g = gramian.double()
        weights = IMTLG()(gramian).double()
        projections = (g @ weights) / g.diagonal().sqrt()
        assert abs(weights.sum().item() - 1) <= 1e-6
        torch.testing.assert_close(
            projections, projections.mean().expand(num_objectives), rtol=1e-4, atol=0
        )


@pytest.mark.parametrize("kind", ["gaussian", "shared_component", "conflicting"])
def test_aligned_mtl_update_is_the_mean_of_orthogonal_equal_norm_gradients(kind: str) -> None:
    """Full rank: B G B = σI, so ‖d‖² = wᵀGw = σ·uᵀu = λ_min(G)/L for scale_mode="min"."""
    for num_objectives in (2, 3, 5, 8):
        gramian = gramian_of(kind, num_objectives, seed=4).double()
        weights = AlignedMTL()(gramian)
        smallest = torch.linalg.eigvalsh(gramian)[0]
        torch.testing.assert_close(
            weights @ gramian @ weights, smallest / num_objectives, rtol=1e-10, atol=0
        )


def jacobi_test_matrices():
    generator = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    for num in (2, 3, 4, 5, 8, 16, 32):
        for _ in range(3):
            grads = randn(num, 50)
            yield grads @ grads.T
            low = randn(num, 2) @ randn(2, 50)
            yield low @ low.T
            yield (low @ low.T).float().double()  # float32-rounded: tiny negative eigenvalues
            spread = randn(num, 50) * torch.logspace(-6, 6, num, dtype=torch.float64)[:, None]
            yield spread @ spread.T
            q = torch.linalg.qr(randn(num, num))[0]
            clustered = torch.tensor([1.0] * (num // 2) + [1 + 1e-9] * (num - num // 2))
            yield q @ torch.diag(clustered.double()) @ q.T
        yield torch.ones(num, num, dtype=torch.float64)
        yield torch.diag(torch.arange(num, dtype=torch.float64))


def test_jacobi_eigensolver_accuracy() -> None:
    """The stated accuracy of the default sweep counts, against LAPACK."""
    for matrix in jacobi_test_matrices():
        a = matrix / matrix.diagonal().sum()
        num = a.shape[0]
        eigenvalues, vectors = jacobi_eigh(a)
        reconstruction = vectors @ torch.diag(eigenvalues) @ vectors.T
        assert (reconstruction - a).norm() <= 1e-14 * a.norm() * max(1, num / 8)
        assert (vectors.T @ vectors - torch.eye(num, dtype=torch.float64)).norm() <= 1e-13
        reference_values = torch.linalg.eigvalsh(a)
        error = (eigenvalues.sort().values - reference_values).abs().max()
        assert error <= 2e-14 * reference_values.abs().max()


# -- MGDA gradient normalisation -------------------------------------------------------------------


def test_mgda_l2_is_mgda_on_unit_gradients_expressed_on_the_originals() -> None:
    for kind in ("gaussian", "spread_norms", "conflicting"):
        for num_objectives in (2, 3, 6):
            gramian = gramian_of(kind, num_objectives, seed=2).double()
            norms = gramian.diagonal().sqrt()
            unit = MGDA()(gramian / norms[:, None] / norms[None, :])
            weights = MGDA(normalization="l2")(gramian)
            assert abs(weights.sum().item() - 1) <= 1e-12
            direction = unit / norms  # the unit-gradient min-norm point, on the originals
            torch.testing.assert_close(weights, direction / direction.sum())


def test_mgda_l2_ignores_gradient_norms() -> None:
    generator = torch.Generator().manual_seed(8)
    grads = torch.randn(4, 30, generator=generator, dtype=torch.float64)
    scaled = grads * torch.tensor([[1e-3], [1.0], [7.0], [1e4]], dtype=torch.float64)
    plain = reference.combine(grads, MGDA(normalization="l2")).update
    rescaled = reference.combine(scaled, MGDA(normalization="l2")).update
    cosine = plain @ rescaled / (plain.norm() * rescaled.norm())
    assert cosine >= 1 - 1e-9


def test_mgda_l2_with_a_zero_gradient_gives_zero() -> None:
    grads = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]], dtype=torch.float64)
    update = reference.combine(grads, MGDA(normalization="l2")).update
    assert update.abs().max() <= 1e-9


# -- agreement with torchjd ------------------------------------------------------------------------

TORCHJD_KINDS = ("gaussian", "shared_component", "duplicated", "conflicting", "spread_norms")


def torchjd_aggregation():
    pytest.importorskip("torchjd")
    return pytest.importorskip("torchjd.aggregation")


def relative_error(mine: torch.Tensor, theirs: torch.Tensor) -> float:
    mine, theirs = mine.double(), theirs.double()
    return ((mine - theirs).abs().max() / theirs.abs().max().clamp_min(1e-300)).item()


def torchjd_gramians(kinds=TORCHJD_KINDS, sizes=(2, 3, 5, 8), seeds=range(3)):
    """float64 Gramians: torchjd's rank cutoffs then depend on float64 round-off only."""
    for kind in kinds:
        for num_objectives in sizes:
            for seed in seeds:
                yield (kind, num_objectives, seed), gramian_of(kind, num_objectives, seed).double()


def test_upgrad_and_dualproj_agree_with_torchjd() -> None:
    aggregation = torchjd_aggregation()
    pytest.importorskip("quadprog")
    from torchjd.linalg import QuadprogProjector

    for label, gramian in torchjd_gramians():
        # torchjd's default projector: reg_eps = 1e-4 on the trace-normalised Gramian.
        pairs = [
            (UPGrad(reg_eps=1e-4), aggregation.UPGradWeighting()),
            (DualProj(reg_eps=1e-4), aggregation.DualProjWeighting()),
        ]
        if label[0] != "duplicated":  # quadprog needs a positive definite matrix
            exact = QuadprogProjector(reg_eps=0.0)
            pairs += [
                (UPGrad(), aggregation.UPGradWeighting(projector=exact)),
                (DualProj(), aggregation.DualProjWeighting(projector=exact)),
            ]
        for mine, theirs in pairs:
            assert relative_error(mine(gramian), theirs(gramian)) <= 1e-5, (label, mine)


def test_imtl_g_and_aligned_mtl_agree_with_torchjd() -> None:
    aggregation = torchjd_aggregation()
    # spread_norms has eigenvalues between torchjd's float64 cutoff (L·2.2e-16) and this
    # library's (L·1e-13), where the two differ by design.
    for label, gramian in torchjd_gramians(kinds=TORCHJD_KINDS[:-1]):
        pairs = [(IMTLG(), aggregation.IMTLGWeighting())] + [
            (AlignedMTL(mode), aggregation.AlignedMTLWeighting(scale_mode=mode))
            for mode in ("min", "median", "rmse")
        ]
        for mine, theirs in pairs:
            assert relative_error(mine(gramian), theirs(gramian)) <= 1e-5, (label, mine)


def torchjd_with_orders(monkeypatch: pytest.MonkeyPatch, call, orders: list[list[int]]):
    """Run ``call()`` with torch.randperm replaced by the given orders (torchjd's PCGrad draws
    ``torch.randperm(L)`` once per objective and skips the objective itself)."""
    draws = iter([torch.tensor([*order, i]) for i, order in enumerate(orders)])
    monkeypatch.setattr(torch, "randperm", lambda n, *args, **kwargs: next(draws))
    try:
        return call()
    finally:
        monkeypatch.undo()


def test_pcgrad_agrees_with_torchjd(monkeypatch: pytest.MonkeyPatch) -> None:
    """Same orders (torchjd draws torch.randperm(L) per objective); torchjd sums, we average."""
    aggregation = torchjd_aggregation()
    pcgrad = PCGrad(seed=2)
    for (kind, num_objectives, seed), gramian in torchjd_gramians():
        context = WeightingContext(seed, num_objectives, tuple(range(num_objectives)))
        orders = visiting_orders(pcgrad, num_objectives, context)
        weighting = aggregation.PCGradWeighting()
        theirs = torchjd_with_orders(monkeypatch, lambda: weighting(gramian), orders)  # noqa: B023
        mine = pcgrad(gramian, context) * num_objectives
        assert relative_error(mine, theirs) <= 1e-5, (kind, num_objectives, seed)


@pytest.fixture
def tight_clarabel(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchjd's CAGrad calls Clarabel with default tolerances (~1e-5 on the weights); tighten
    them so that the comparison tests the formulation, not the host solver's stopping rule."""
    cvxpy = pytest.importorskip("cvxpy")
    solve = cvxpy.Problem.solve

    def tight(self, *args, **kwargs):
        tolerances = {"tol_gap_abs": 1e-13, "tol_gap_rel": 1e-13, "tol_feas": 1e-13}
        return solve(self, *args, **{**kwargs, **tolerances, "max_iter": 500})

    monkeypatch.setattr(cvxpy.Problem, "solve", tight)


@pytest.mark.filterwarnings("ignore:Solution may be inaccurate")
def test_cagrad_agrees_with_torchjd(tight_clarabel: None) -> None:
    """torchjd's weights are u + λw* (no rescale), ours (u + λw*)/(1 + c).

    Weights to 1e-5 for L ≤ 4; for larger L Clarabel stops at 'optimal_inaccurate' (KKT residual
    ~1e-7, weights off by up to ~4e-5 where this solver's KKT residual is 1e-14), so there the dual
    objective is compared: ours is never worse and agrees to 1e-9. Duplicated objectives make w*
    non-unique; the update is compared instead.
    """
    aggregation = torchjd_aggregation()
    kinds = ("gaussian", "shared_component", "conflicting")  # torchjd zeroes spread_norms cases
    for c in (0.1, 0.4, 0.9):
        for (kind, num_objectives, seed), gramian in torchjd_gramians(kinds, (2, 3, 4)):
            mine = CAGrad(c)(gramian) * (1 + c)
            theirs = aggregation.CAGradWeighting(c)(gramian)
            assert relative_error(mine, theirs) <= 1e-5, (c, kind, num_objectives, seed)
        for (kind, num_objectives, seed), gramian in torchjd_gramians(
            (*kinds, "duplicated"), (5, 8)
        ):
            mine = CAGrad(c)(gramian) * (1 + c)
            theirs = aggregation.CAGradWeighting(c)(gramian)
            g = normalised(gramian)
            uniform = torch.full((num_objectives,), 1 / num_objectives, dtype=torch.float64)
            b, radius = g @ uniform, c * torch.sqrt(uniform @ g @ uniform)

            def dual(weights, b=b, radius=radius, g=g, uniform=uniform):
                w = (weights - uniform) / (weights - uniform).sum()  # w* on the simplex
                return b @ w + radius * torch.sqrt(w @ g @ w)

            assert dual(mine) <= dual(theirs) + 1e-12
            assert abs(dual(mine) - dual(theirs)) <= 1e-9
            update_error = ((mine - theirs) @ g @ (mine - theirs)).sqrt() / (
                theirs @ g @ theirs
            ).sqrt()
            assert update_error <= 1e-4, (c, kind, num_objectives, seed)


@pytest.mark.slow
def test_mgda_agrees_with_torchjd() -> None:
    """torchjd's MGDA is Frank–Wolfe: exact for L = 2 (one exact line search from 1/L), slow
    (O(1/k)) beyond, where the min-norm value is compared: ours is never worse."""
    aggregation = torchjd_aggregation()
    reference_solver = aggregation.MGDAWeighting(epsilon=1e-12, max_iters=20000)
    for label, gramian in torchjd_gramians(sizes=(2,)):
        assert relative_error(MGDA()(gramian), reference_solver(gramian)) <= 1e-5, label
    for label, gramian in torchjd_gramians(sizes=(3, 5), seeds=range(2)):
        mine, theirs = MGDA()(gramian), reference_solver(gramian)
        value, their_value = mine @ gramian @ mine, theirs @ gramian @ theirs
        scale = gramian.diagonal().max()
        # MGDA's documented accuracy is a relative duality gap ≤ 1e-6 (its ridge is 1e-10 of the
        # trace, which shows on spread_norms); Frank–Wolfe is far less accurate beyond L = 2.
        assert value <= their_value + 1e-9 * scale, label
        assert their_value - value <= 1e-5 * scale, label


def test_updates_agree_with_torchjd_aggregators(monkeypatch: pytest.MonkeyPatch) -> None:
    """On random Jacobians, d = Jᵀw equals torchjd's aggregated vector, up to the documented
    normalisations (PCGrad: ×L, CAGrad: ×(1 + c))."""
    aggregation = torchjd_aggregation()
    generator = torch.Generator().manual_seed(21)
    for num_objectives in (2, 3, 6):
        for shift in (0.0, 1.0):
            jacobian = shift + torch.randn(
                num_objectives, 40, generator=generator, dtype=torch.float64
            )
            cases = [
                (UPGrad(reg_eps=1e-4), aggregation.UPGrad(), 1.0),
                (DualProj(reg_eps=1e-4), aggregation.DualProj(), 1.0),
                (IMTLG(), aggregation.IMTLG(), 1.0),
                (AlignedMTL(), aggregation.AlignedMTL(), 1.0),
            ]
            for mine, theirs, factor in cases:
                update = reference.combine(jacobian, mine).update * factor
                expected = theirs(jacobian)
                assert relative_error(update, expected) <= 1e-5, (mine, num_objectives, shift)
            pcgrad = PCGrad()
            orders = visiting_orders(pcgrad, num_objectives, None)
            aggregator = aggregation.PCGrad()
            expected = torchjd_with_orders(
                monkeypatch,
                lambda: aggregator(jacobian),  # noqa: B023
                orders,
            )
            update = reference.combine(jacobian, pcgrad).update * num_objectives
            assert relative_error(update, expected) <= 1e-5, ("pcgrad", num_objectives, shift)
