import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .._device_path import cpu_path
from ._base import BatchedWeighting, WeightingContext
from ._solvers import (
    check_iterations,
    diagonal,
    dot,
    matvec,
    noise_level,
    normalise_by_trace,
    quadratic,
    regularise,
    uniform_if_zero,
)

# Feasibility and optimality tolerances of the active-set method (trace-normalised units).
_NEGATIVE = -1e-12
_ENTER_TOLERANCE = 1e-12
# ‖g_w*‖² counts as zero (Pareto-stationary) below this multiple of the ridge's share of it,
# ridge·Σ w_ℓ²‖ḡ_ℓ‖²: there the Gramian's round-off, not the gradients, decides the direction.
# Measured on the test zoo: degenerate optima (0 in the hull, c ≥ 1) end at ≤ 0.42, genuine ones
# at ≥ 1e3 apart from two float32 low-rank cases at 0.4 that are themselves at round-off.
_STATIONARY = 10.0


class CAGrad(BatchedWeighting):
    r"""Conflict-averse gradient descent: the best worst-case improvement near the average gradient.

    Liu, Liu, Jin, Stone & Liu 2021, "Conflict-Averse Gradient Descent for Multi-task Learning"
    (NeurIPS), Algorithm 1. With ``g₀ = (1/L) Σ_ℓ ḡ_ℓ``, ``g_w = Σ_ℓ w_ℓ ḡ_ℓ`` and
    ``√φ = c ‖g₀‖``, the dual problem and the update are

    .. math:: w^\star = \operatorname*{argmin}_{w \in \Delta_L}\ g_w^\top g_0 + \sqrt\phi\,\|g_w\|,
              \qquad d = \frac{1}{1 + c}\Big(g_0 + \frac{\sqrt\phi}{\|g_{w^\star}\|}\,
              g_{w^\star}\Big),

    all from the Gramian: ``g_wᵀg₀ = wᵀGu``, ``‖g_w‖² = wᵀGw``, ``‖g₀‖² = uᵀGu`` (``u = 1/L``), so
    the weights are ``(u + λ w*) / (1 + c)``, ``λ = √φ / ‖g_{w*}‖``. ``d`` maximises
    ``min_ℓ ⟨ḡ_ℓ, d⟩`` over the ball ``‖d − g₀‖ ≤ c‖g₀‖`` (before the ``1/(1 + c)``).

    Normalisation: identical gradients give ``g₀ + c g₀ = (1 + c) g₀``, so the update is divided
    by ``1 + c``, the paper code's ``rescale=2`` option (its default ``rescale=1`` divides by
    ``1 + c²`` and torchjd does not rescale); then identical gradients give that gradient back
    (docs/design.md §4). torchjd's weights are these times ``1 + c``.

    Solver (float64 on the Gramian's device, no host sync, fixed work): a primal active-set method
    on the support of ``w``, started from the full support (duplicated objectives share their
    weight), run for ``2L`` iterations by default. On a support ``S`` the minimiser over the affine
    hull has a closed form: with ``p = G_SS⁻¹1``, ``q = G_SS⁻¹b`` (``b = Gu``), ``α = 1ᵀp``,
    ``β = 1ᵀq``, ``γ = bᵀq``, it is ``x = (μp − q)/λ``, ``λ = √(αφ − (αγ − β²))``,
    ``μ = (λ + β)/α``. If ``αφ ≤ αγ − β²`` the objective is unbounded below on the affine hull and
    the method moves along the steepest recession direction ``(β/α)p − q`` instead. Infeasible
    moves stop at the first weight that reaches zero (dropping it); at a feasible point the
    objective that most violates ``∂F/∂w_j ≥ F(w)`` (KKT) enters. ``G`` is trace-normalised and
    gets the relative ridge ``L·ε_dtype·G_ℓℓ`` (:func:`~._solvers.noise_level`, enough to keep a
    rounded float32 Gramian positive definite; it also smooths the kink of ``‖g_w‖`` at 0). The
    method terminates exactly: on the test zoo (``L ≤ 32``, ``c`` from 0.1 to 2) the fixed point is
    reached within ``L + 3`` iterations and its KKT residual is ≤ 1e-11; against a high-accuracy
    conic solve (Clarabel at 1e-14) the weights agree to ≤ 3e-6 for float64 Gramians, while
    torchjd's own Clarabel solve is accurate to ~1e-5–1e-4 only.

    Degenerate cases: if ``‖g_{w*}‖²`` is within 10× the ridge's share of it,
    ``L·ε_dtype·Σ_ℓ w_ℓ²‖ḡ_ℓ‖²`` (``0`` is in the convex hull and CAGrad's optimum is attained
    there, e.g. ``c ≥ 1`` at a Pareto-stationary point; the Gramian's round-off then decides the
    direction ``g_w/‖g_w‖``), the weights are all zero (``d = 0``), as in torchjd (which tests
    ``‖g_w‖ < 1e-4`` relative to ``‖J‖_F``, so it also zeroes genuine directions carried by
    gradients 1e4 times smaller than the others; the test here is relative to the gradients in
    ``w*``). For ``c ≥ 1`` ``d = 0`` is an optimal CAGrad update; for ``c < 1`` the optimum is then
    not unique and ``d = 0`` lies outside the ball, a conservative choice. If ``g₀ = 0`` (or
    ``c = 0``) the update is ``g₀/(1 + c)`` exactly (weights ``1/(L(1 + c))``, resp. ``1/L``). A
    zero Gramian gives ``1/L``.

    Args:
        c: Radius of the ball around ``g₀`` relative to ``‖g₀‖`` (``c ≥ 0``; ``c = 0`` is the
            mean). The default ``0.4`` is the paper's value for NYU-v2 and CityScapes.
        iterations: Active-set iterations; ``None`` means ``2L``.
    """

    name = "cagrad"
    description = "Best worst-case improvement in a ball around the mean gradient (Liu 2021)."

    def __init__(self, c: float = 0.4, iterations: int | None = None) -> None:
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not c >= 0 or math.isinf(c):
            raise ValueError(f"c must be a finite number ≥ 0, got {c!r}")
        self.c = float(c)
        self.iterations = check_iterations(iterations)

    def solve_batch(self, gramians: Tensor, contexts: Sequence[WeightingContext | None]) -> Tensor:
        num_objectives = gramians.shape[-1]
        iterations = 2 * num_objectives if self.iterations is None else self.iterations
        g, nonzero = normalise_by_trace(gramians)
        uniform = torch.full(
            (num_objectives,), 1.0 / num_objectives, dtype=g.dtype, device=g.device
        )
        b = g @ uniform
        radius = self.c * torch.sqrt(b.mean(dim=-1, keepdim=True).clamp_min(0.0))  # √φ = c‖g₀‖
        ridge = noise_level(gramians.dtype, num_objectives)
        regularised = regularise(g, ridge)
        w = cagrad_dual(regularised, b, radius, iterations, stop_at_fixed_point=cpu_path(g.device))
        squared = quadratic(g, w).clamp_min(0.0)
        floor = _STATIONARY * ridge * dot(w * w, diagonal(g))
        # With √φ = 0 (c = 0 or g₀ = 0) the update is g₀/(1 + c) whatever w* is.
        stationary = (squared <= floor) & (radius > 0)
        scale = torch.where(stationary | (radius == 0), 0.0, radius / torch.sqrt(squared))
        weights = torch.where(stationary, 0.0, (uniform + scale * w) / (1 + self.c))
        return uniform_if_zero(weights, nonzero).to(gramians.dtype)

    def __repr__(self) -> str:
        return f"CAGrad(c={self.c}, iterations={self.iterations})"


def cagrad_dual(
    regularised: Tensor, b: Tensor, radius: Tensor, iterations: int, stop_at_fixed_point: bool
) -> Tensor:
    """``argmin_{w∈Δ} bᵀw + radius·√(wᵀGw)`` in float64 for a positive definite ``G``, for each
    problem of a batch (``G`` ``[..., L, L]``, ``b`` ``[..., L]``, ``radius`` ``[..., 1]``); see
    :class:`CAGrad` for the method."""
    g = regularised
    num_objectives = g.shape[-1]
    index = torch.arange(num_objectives, device=g.device)
    eye = torch.eye(num_objectives, dtype=g.dtype, device=g.device)
    phi = radius * radius
    support = torch.ones(g.shape[:-1], dtype=torch.bool, device=g.device)
    w = torch.full(g.shape[:-1], 1.0 / num_objectives, dtype=g.dtype, device=g.device)
    if num_objectives == 1:
        return w
    for _ in range(iterations):
        s = support.to(g.dtype)
        system = torch.where(support.unsqueeze(-1) & support.unsqueeze(-2), regularised, eye)
        solved = torch.linalg.solve_ex(system, torch.stack([s, b * s], dim=-1))[0]
        solved = solved * s.unsqueeze(-1)
        p, q = solved[..., 0], solved[..., 1]
        totals = solved.sum(dim=-2)  # p and q vanish off the support
        alpha, beta, gamma = totals[..., :1], totals[..., 1:], dot(b, q)
        excess = alpha * phi - (alpha * gamma - beta * beta).clamp_min(0.0)
        bounded = excess > 0
        lam = torch.sqrt(torch.where(bounded, excess, 1.0))
        mu = (lam + beta) / alpha
        candidate = (mu * p - q) / lam
        # Unbounded on the affine hull: move along the recession direction, which decreases F
        # strictly; it sums to zero, so some weight reaches zero after a finite step.
        direction = torch.where(bounded, candidate - w, (beta / alpha) * p - q)
        reach = torch.where(bounded, 1.0, math.inf)

        negative = support & (direction < 0) & (w + reach * direction < _NEGATIVE)
        infeasible = negative.any(dim=-1, keepdim=True)
        ratio = torch.where(negative, w / -direction, math.inf)
        step = torch.minimum(ratio.amin(dim=-1, keepdim=True), reach)
        step = torch.where(torch.isfinite(step), step, 0.0)  # direction 0: F is constant, stay
        moved = (w + step * direction).clamp_min(0.0)
        kept = support & (ratio > step) & (moved > 0)
        moved = torch.where(kept, moved, 0.0)
        moved = moved / moved.sum(dim=-1, keepdim=True)

        # Feasible: optimal unless some inactive j has ∂F/∂w_j < F(w) (= wᵀ∇F on the support).
        feasible = candidate.clamp_min(0.0)
        norm = torch.sqrt(quadratic(regularised, feasible).clamp_min(1e-300))
        gradient = b + radius * matvec(regularised, feasible) / norm
        value = dot(feasible, gradient)
        outside = torch.where(support, math.inf, gradient).min(dim=-1, keepdim=True)
        enters = (index == outside.indices) & (outside.values < value - _ENTER_TOLERANCE)

        update = infeasible | ~bounded
        w = torch.where(update, moved, feasible)
        support = torch.where(update, kept, support | enters)
        if stop_at_fixed_point and not (update.any() | enters.any()):
            break
    return w
