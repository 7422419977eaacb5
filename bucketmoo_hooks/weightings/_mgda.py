import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .._device_path import cpu_path
from ._base import BatchedWeighting, WeightingContext
from ._solvers import diagonal, dot, matvec, normalise_by_trace, unit_gramian

# Added to the trace-normalised Gramian on the support: makes every equality-constrained
# subproblem strictly convex (duplicated or collinear objectives share their weight equally)
# while moving the optimum by O(1e-10) relative.
_RIDGE = 1e-10
# An objective enters the support only if it lowers the objective by more than this
# (trace-normalised units); guards against cycling on round-off.
_ENTER_TOLERANCE = 1e-12
# Affine solutions below this are infeasible (round-off around an exact zero is not).
_NEGATIVE = -1e-12
# Gradient normalisations computable from the Gramian alone (see MGDA).
_NORMALIZATIONS = ("none", "l2")


class MGDA(BatchedWeighting):
    r"""Multiple-gradient descent: the min-norm point of the convex hull of the objective gradients.

    .. math:: w^\star = \operatorname*{argmin}_{w \in \Delta_L} w^\top G w, \qquad
              d = \textstyle\sum_\ell w^\star_\ell \bar g_\ell

    (Désidéri 2012, "Multiple-gradient descent algorithm (MGDA) for multiobjective optimization";
    Sener & Koltun 2018, "Multi-Task Learning as Multi-Objective Optimization"). If any descent
    direction common to all objectives exists, ``d`` is one; ``d = 0`` exactly at Pareto-stationary
    points. Weights lie on the simplex, so identical objective gradients give that gradient back.

    Solver (float64 on the Gramian's device, no host synchronisation, fixed work):

    - ``L = 1``: ``w = [1]``; ``L = 2``: the exact closed form
      ``γ = clamp((G₁₁ − G₀₁) / (G₀₀ + G₁₁ − 2G₀₁), 0, 1)``, ``w = [γ, 1 − γ]``
      (``γ = ½`` for identical gradients);
    - ``L ≥ 3``: a primal active-set method run for a fixed number of iterations (``2L`` by
      default), started from the full support so that duplicated objectives get equal weights. Each
      iteration solves the equality-constrained problem on the support in closed form and either
      steps back to the first weight that hits zero (dropping it) or adds the objective that most
      violates optimality. It terminates exactly; on the test zoo of Gramians (random, low-rank,
      duplicated, conflicting, 1e-3…1e3 norm spread, ``L`` up to 32) the relative duality gap
      (:func:`duality_gap`) after ``2L`` iterations is ≤ 1e-6, i.e. at fp32 round-off.

    Gradient normalisation (``normalization``), the options of Sener & Koltun's
    ``gradient_normalizers`` that need only the Gramian (their ``"loss"`` and ``"loss+"`` divide
    by the loss values, which a Gramian does not carry):

    - ``"none"`` (default): the problem above.
    - ``"l2"``: the min-norm point of the unit gradients ``ḡ_ℓ/‖ḡ_ℓ‖``, i.e. ``w'`` solves the
      problem on ``D G D``, ``D = diag(1/√G_ℓℓ)``; every objective then counts by direction only.
      Its direction ``Σ_ℓ w'_ℓ ḡ_ℓ/‖ḡ_ℓ‖`` is kept and expressed on the original gradients with
      weights summing to one: ``w_ℓ = (w'_ℓ/‖ḡ_ℓ‖) / Σ_k (w'_k/‖ḡ_k‖)``, so ``d`` is the point of
      the convex hull of the ``ḡ_ℓ`` on that ray, still a common descent direction when one
      exists, and identical gradients still give that gradient back (``w = 1/L``). (Sener &
      Koltun's training script instead applies ``w'`` unchanged to the unnormalised losses,
      ``d = Σ_ℓ w'_ℓ ḡ_ℓ``, which changes the direction and in general loses the common-descent
      guarantee.) A zero gradient stays zero in ``D G D``, so then ``d = 0``, as without
      normalisation.

    Args:
        iterations: Active-set iterations for ``L ≥ 3``; ``None`` means ``2L``.
        normalization: ``"none"`` or ``"l2"``, as above.
    """

    name = "mgda"
    description = "Min-norm point of the convex hull (Désidéri 2012; Sener & Koltun 2018)."

    def __init__(self, iterations: int | None = None, normalization: str = "none") -> None:
        if iterations is not None and (
            isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1
        ):
            raise ValueError(f"iterations must be a positive int or None, got {iterations!r}")
        if normalization not in _NORMALIZATIONS:
            raise ValueError(
                f"normalization must be one of {_NORMALIZATIONS}, got {normalization!r} (Sener "
                "& Koltun's 'loss' and 'loss+' need the loss values, which a Gramian lacks)"
            )
        self.iterations = iterations
        self.normalization = normalization

    def solve_batch(self, gramians: Tensor, contexts: Sequence[WeightingContext | None]) -> Tensor:
        num_objectives = gramians.shape[-1]
        iterations = 2 * num_objectives if self.iterations is None else self.iterations
        if self.normalization == "none":
            return min_norm_weights(gramians, iterations).to(gramians.dtype)
        unit, inverse = unit_gramian(normalise_by_trace(gramians)[0])
        unit_weights = min_norm_weights(unit, iterations)
        # Trace-normalised norms are ≤ 1, so the rescaled weights sum to ≥ 1: no division by 0.
        weights = torch.where(inverse > 0, unit_weights * inverse, unit_weights)
        return (weights / weights.sum(dim=-1, keepdim=True)).to(gramians.dtype)

    def __repr__(self) -> str:
        # The default is left out so that the repr of existing configurations does not change.
        if self.normalization == "none":
            return f"MGDA(iterations={self.iterations})"
        return f"MGDA(iterations={self.iterations}, normalization={self.normalization!r})"


def min_norm_weights(gramian: Tensor, iterations: int) -> Tensor:
    """``argmin_{w∈Δ} wᵀGw`` in float64 for each Gramian of a batch ``[..., L, L]``; see
    :class:`MGDA` for the method."""
    num_objectives = gramian.shape[-1]
    g = gramian.to(torch.float64)
    # Weights do not change when G is scaled: normalise so the tolerances are relative.
    trace = diagonal(g).sum(dim=-1)[..., None, None]
    g = g / trace.clamp_min(torch.finfo(torch.float64).tiny)
    if num_objectives == 1:
        return torch.ones(g.shape[:-1], dtype=torch.float64, device=g.device)
    if num_objectives == 2:
        return _two_objectives(g)
    # Once an iteration neither drops nor adds an objective, every later one recomputes the same
    # weights bit for bit, so stopping there is exact. Only on the CPU is the flag free to read;
    # on a GPU the loop runs its fixed count and nothing waits for the device.
    return _active_set(g, iterations, stop_at_fixed_point=cpu_path(g.device))


def _two_objectives(g: Tensor) -> Tensor:
    g00, g01, g11 = g[..., 0, 0], g[..., 0, 1], g[..., 1, 1]
    distance = g00 + g11 - 2 * g01  # ‖ḡ₀ − ḡ₁‖² (normalised)
    gamma = ((g11 - g01) / distance.clamp_min(torch.finfo(g.dtype).tiny)).clamp(0, 1)
    gamma = torch.where(distance > 1e-12, gamma, 0.5)
    return torch.stack([gamma, 1 - gamma], dim=-1)


def _active_set(g: Tensor, iterations: int, stop_at_fixed_point: bool) -> Tensor:
    num_objectives = g.shape[-1]
    index = torch.arange(num_objectives, device=g.device)
    eye = torch.eye(num_objectives, dtype=g.dtype, device=g.device)
    regularised = g + _RIDGE * eye
    support = torch.ones(g.shape[:-1], dtype=torch.bool, device=g.device)
    weights = torch.full(g.shape[:-1], 1.0 / num_objectives, dtype=g.dtype, device=g.device)
    for _ in range(iterations):
        s = support.to(g.dtype)
        # Min-norm point of the affine hull of the support: x = G_SS⁻¹ 1, normalised to sum 1.
        # Inactive rows are identity rows with a zero right-hand side, so x vanishes off S.
        system = torch.where(support.unsqueeze(-1) & support.unsqueeze(-2), regularised, eye)
        x = torch.linalg.solve_ex(system, s)[0] * s
        candidate = x / x.sum(dim=-1, keepdim=True)
        negative = candidate < _NEGATIVE
        infeasible = negative.any(dim=-1, keepdim=True)

        # Infeasible: walk from the current weights towards the candidate until the first
        # weight reaches zero, and drop every weight that did.
        ratio = torch.where(negative, weights / (weights - candidate), math.inf)
        step = ratio.amin(dim=-1, keepdim=True).clamp(max=1.0)
        moved = weights + step * (candidate - weights)
        kept = support & (ratio > step) & (moved > 0)
        moved = torch.where(kept, moved, 0.0)
        moved = moved / moved.sum(dim=-1, keepdim=True)

        # Feasible: optimal unless some inactive objective j has (Gw)_j < wᵀGw; add the worst.
        feasible = candidate.clamp_min(0.0)
        gradient = matvec(g, feasible)
        value = dot(feasible, gradient)
        outside = torch.where(support, math.inf, gradient).min(dim=-1, keepdim=True)
        enters = (index == outside.indices) & (outside.values < value - _ENTER_TOLERANCE)

        weights = torch.where(infeasible, moved, feasible)
        support = torch.where(infeasible, kept, support | enters)
        if stop_at_fixed_point and not (infeasible.any() | enters.any()):
            break
    return weights


def duality_gap(gramian: Tensor, weights: Tensor) -> Tensor:
    r"""Relative duality gap of ``weights`` for the min-norm problem, a 0-dim float64 tensor.

    .. math:: \frac{w^\top G w - \min_i (G w)_i}{\max_i G_{ii}}

    ``w ∈ Δ`` is optimal exactly when ``(Gw)_i ≥ wᵀGw`` for all ``i`` (KKT), so the numerator is
    the KKT violation; it also bounds the suboptimality, ``wᵀGw − min_Δ ≤ 2·numerator`` (it is half
    the Frank–Wolfe gap). Dividing by the largest squared norm makes it scale-free.
    """
    g = gramian.to(torch.float64)
    w = weights.to(torch.float64)
    gw = g @ w
    scale = g.diagonal().max().clamp_min(torch.finfo(torch.float64).tiny)
    return (w @ gw - gw.min()) / scale
