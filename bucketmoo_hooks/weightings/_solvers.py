"""Device-side building blocks shared by the weightings: trace normalisation, a fixed-sweep
Jacobi eigensolver, and a primal active-set solver for lower-bounded QPs on the Gramian.

Everything here runs in float64 on the input's device with a fixed amount of work and no host
synchronisation, on a batch of problems at once: a Gramian is ``[..., L, L]`` (any leading batch
dimensions, e.g. the ``S`` segments of a bucket), a vector ``[..., L]``, and a per-problem scalar
``[..., 1]``, so one bucket's solve issues the same ops whatever its number of problems. Also:
no ``.item()``, no Python branching on device values, no host-checked ``torch.linalg`` calls
(only ``solve_ex``), no index tensors copied from the host. The one
exception, shared with :func:`~bucketmoo_hooks.weightings.min_norm_weights`, is the optional early
stop at an exact fixed point, which is taken only on the CPU where reading a flag costs nothing.
"""

import math

import torch
from torch import Tensor

from .._device_path import cpu_path

__all__ = [
    "check_iterations",
    "check_reg_eps",
    "diagonal",
    "dot",
    "dual_cone_weights",
    "jacobi_eigh",
    "lower_bounded_qp",
    "matvec",
    "noise_level",
    "normalise_by_trace",
    "positive_definite_ridge",
    "quadratic",
    "regularise",
    "significant_eigh",
    "uniform_if_zero",
    "unit_gramian",
]

# Primal feasibility tolerance of the active-set method (weights), and its optimality tolerance
# relative to the round-off scale of a multiplier (Gv)_i, √G_ii · Σ_j √G_jj |v_j|: a cosine, so
# that a conflict with a gradient 1e-6 times shorter than the others still counts.
_FEASIBILITY = 1e-12
_OPTIMALITY = 1e-12


def check_iterations(iterations: object) -> int | None:
    """Validate an ``iterations`` argument: a positive int, or ``None`` for the default."""
    if iterations is not None and (
        isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1
    ):
        raise ValueError(f"iterations must be a positive int or None, got {iterations!r}")
    return iterations


def check_reg_eps(reg_eps: object) -> float:
    """Validate a ``reg_eps`` argument: a finite number ``≥ 0``."""
    if (
        isinstance(reg_eps, bool)
        or not isinstance(reg_eps, (int, float))
        or not 0 <= reg_eps < math.inf
    ):
        raise ValueError(f"reg_eps must be a finite number ≥ 0, got {reg_eps!r}")
    return float(reg_eps)


def matvec(matrix: Tensor, vector: Tensor) -> Tensor:
    """``M v`` for batches ``[..., L, L]`` and ``[..., L]`` (``@`` would take ``v`` as a matrix)."""
    return (matrix @ vector.unsqueeze(-1)).squeeze(-1)


def dot(a: Tensor, b: Tensor) -> Tensor:
    """``aᵀb`` for batches ``[..., L]``, as ``[..., 1]`` (one batched product: one kernel)."""
    return (a.unsqueeze(-2) @ b.unsqueeze(-1)).squeeze(-1)


def quadratic(matrix: Tensor, vector: Tensor) -> Tensor:
    """``vᵀ M v`` for batches ``[..., L, L]`` and ``[..., L]``, as ``[..., 1]``."""
    return dot(vector, matvec(matrix, vector))


def diagonal(matrix: Tensor) -> Tensor:
    """The diagonals ``[..., L]`` of a batch ``[..., L, L]``."""
    return matrix.diagonal(dim1=-2, dim2=-1)


def normalise_by_trace(gramian: Tensor) -> tuple[Tensor, Tensor]:
    """``(G / tr G, tr G > 0)`` in float64, the flag ``[..., 1]``. A zero Gramian stays zero (never
    NaN)."""
    g = gramian.to(torch.float64)
    trace = diagonal(g).sum(dim=-1, keepdim=True)
    nonzero = trace > 0
    return g / torch.where(nonzero, trace, 1.0).unsqueeze(-1), nonzero


def unit_gramian(g: Tensor) -> tuple[Tensor, Tensor]:
    """The Gramian of the unit gradients ``ḡ_i / ‖ḡ_i‖`` and the ``1 / ‖ḡ_i‖``, for a
    trace-normalised ``g`` (float64). A zero gradient gets a zero row and column, and 0 as inverse.
    """
    norms = diagonal(g).clamp_min(0.0).sqrt()
    inverse = torch.where(norms > 0, 1.0 / torch.where(norms > 0, norms, 1.0), 0.0)
    return g * inverse.unsqueeze(-1) * inverse.unsqueeze(-2), inverse


def noise_level(dtype: torch.dtype, num_objectives: int) -> float:
    """``L·max(ε_dtype, 1e-13)``: the relative size below which a Gramian's structure is round-off.

    A Gramian stored in ``dtype`` has entries ``G_ij(1 + η_ij)``, ``|η_ij| ≤ ε/2``; scaled by
    ``1/(‖ḡ_i‖‖ḡ_j‖)`` that perturbs the correlation matrix by at most ``L·ε/2`` in norm
    (Gershgorin), so eigen-directions below ``L·ε·λ_max`` carry no information, and a diagonal
    ridge of ``L·ε·G_ii`` keeps a Gramian positive definite against its storage round-off (its
    accumulation error, ``O(log n · ε)`` relative for a blocked fp32 dot product, is usually
    covered too). ``L·ε`` is also ``torch.linalg.pinv``'s default cutoff and torchjd's rank rule in
    AlignedMTL. The 1e-13 floor covers this module's own float64 round-off (the Jacobi solver's
    eigenvalue error is ≤ 2e-14 relative to ``λ_max`` for ``L ≤ 32``) for float64 Gramians.
    """
    return num_objectives * max(torch.finfo(dtype).eps, 1e-13)


def regularise(g: Tensor, ridge: float) -> Tensor:
    """``G + ridge·diag(G_ii) + 1e-30·I`` for a trace-normalised ``G``.

    The ridge is relative to each objective's own squared norm, so it perturbs a small gradient as
    little as a large one (a ridge relative to the trace would swamp gradients whose norms are
    1e-5 of the largest), and with ``ridge = noise_level(...)`` it makes the rounded Gramian
    positive definite; the 1e-30 floor keeps zero gradients' rows non-singular. It makes every
    subproblem strictly convex, so duplicated or collinear objectives share their weight equally.
    """
    return g + torch.diag_embed(ridge * diagonal(g).clamp_min(0.0) + 1e-30)


def positive_definite_ridge(g: Tensor, floor: float, rungs: int = 12) -> Tensor:
    """A ridge ``r`` such that ``g + r·I`` is safely positive definite: ``4ρ``, with ``ρ`` the first
    of ``floor·4^k`` (``k < rungs``) for which a Cholesky factorisation of ``g + ρI`` succeeds.

    ``floor`` (e.g. :func:`noise_level`) covers the storage round-off of the input's dtype, but a
    Gramian accumulated in lower precision than it is stored (a float32 Gramian cast to float64,
    a long fp32 reduction) can have negative eigenvalues larger than that; the ladder finds the
    ridge that covers them. All rungs of all problems are factorised in one batched ``cholesky_ex``
    and the first success is picked on the device: no host synchronisation. If every rung fails
    (the input is not a Gramian), the largest ridge is returned. Shape ``[..., 1, 1]``.
    """
    eye = torch.eye(g.shape[-1], dtype=g.dtype, device=g.device)
    ridges = floor * 4.0 ** torch.arange(rungs, dtype=g.dtype, device=g.device)
    succeeded = torch.linalg.cholesky_ex(g.unsqueeze(-3) + ridges[:, None, None] * eye).info == 0
    first = torch.where(succeeded.any(dim=-1), succeeded.int().argmax(dim=-1), rungs - 1)
    # take, not ridges[first]: indexing with a 0-d tensor reads the index on the host.
    return 4.0 * ridges.take(first)[..., None, None]


def uniform_if_zero(weights: Tensor, nonzero: Tensor) -> Tensor:
    """Uniform weights ``1/L`` where the Gramian is all zero (every gradient is 0, so is ``d``)."""
    return torch.where(nonzero, weights, 1.0 / weights.shape[-1])  # nonzero: [..., 1]


# -- symmetric eigen-decomposition ---------------------------------------------------------------

_SCHEDULES: dict[tuple[int, str], tuple[Tensor, Tensor, Tensor]] = {}


def _round_robin(num: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """The rounds of the parallel (round-robin) Jacobi ordering, built on ``device``.

    Round ``r`` pairs every index with at most one partner (one index sits out per round when
    ``num`` is odd), and every pair ``i < j`` occurs in exactly one of the ``num − 1`` rounds
    (``num`` for odd ``num``). Returns three ``[rounds, num, num]`` float64 stacks; row ``i`` of
    round ``r``, for ``i``'s pair ``(lo, hi)`` (all zero when ``i`` sits out):

    - ``difference``: ``−e_lo + e_hi``, so ``difference @ diag(A)`` is ``A_hi,hi − A_lo,lo`` for
      both members, bit-identical (the same two nonzero terms);
    - ``partner``: ``e_partner``;
    - ``signed``: ``+e_hi`` in row ``lo`` and ``−e_lo`` in row ``hi``, the off-diagonal pattern of
      the rotation.

    Built with arithmetic on ``torch.arange``, so no index tensor is copied from the host; cached
    per device.
    """
    key = (num, str(device))
    cached = _SCHEDULES.get(key)
    if cached is not None:
        return cached
    players = num + num % 2  # a dummy player makes the count even; its partner sits out
    rounds = players - 1
    r = torch.arange(rounds, device=device)[:, None]
    i = torch.arange(players, device=device)[None, :]
    # Circle method: i < players − 1 meets (r − i) mod (players − 1), or the last player when
    # that is itself; the last player meets the i with 2i ≡ r, i.e. i = r·players/2.
    partner = torch.remainder(r - i, rounds)
    partner = torch.where(partner == i, players - 1, partner)
    partner = torch.where(i == players - 1, torch.remainder(r * (players // 2), rounds), partner)
    partner = partner[:, :num]
    columns = torch.arange(num, device=device)
    one_hot = (partner[:, :, None] == columns[None, None, :]).to(torch.float64)
    lower = torch.where(columns[None, :] < partner, 1.0, -1.0) * one_hot.sum(dim=2)
    signed = lower[:, :, None] * one_hot
    difference = signed - torch.diag_embed(lower)
    _SCHEDULES[key] = (difference, one_hot, signed)
    return difference, one_hot, signed


def default_sweeps(num_objectives: int) -> int:
    """Jacobi sweeps run by default: enough for float64 round-off on every tested matrix."""
    if num_objectives == 2:
        return 1  # one rotation diagonalises a 2×2 matrix exactly
    if num_objectives <= 4:
        return 5
    if num_objectives <= 8:
        return 7
    return 9 if num_objectives <= 16 else 11


def jacobi_eigh(matrix: Tensor, sweeps: int | None = None) -> tuple[Tensor, Tensor]:
    r"""Eigen-decomposition ``A = V diag(λ) Vᵀ`` of a small symmetric float64 matrix.

    Cyclic Jacobi with the parallel round-robin ordering: each round rotates ``⌊L/2⌋`` disjoint
    index pairs at once (one ``L×L`` orthogonal matrix ``R``, ``A ← RᵀAR``, ``V ← VR``), each pair
    with the inner rotation angle (``|θ| ≤ π/4``) that zeroes its off-diagonal entry (Golub & Van
    Loan, *Matrix Computations*, §8.5); a sweep is the ``L − 1`` rounds (``L`` for odd ``L``) that
    visit every pair once, ~14 small tensor ops per round. Convergence is quadratic. The count is
    fixed, :func:`default_sweeps`: 1 for ``L = 2`` (exact), 5 for ``L ≤ 4``, 7 for ``L ≤ 8``, 9
    for ``L ≤ 16``, 11 above, one more than the most any test matrix needed (random, rank-deficient,
    rank one, repeated and clustered eigenvalues 1e-9 apart, 1e-12 spread, float32-rounded; ``L``
    up to 32) to reach ``‖A − V diag(λ) Vᵀ‖ ≤ 1e-14 ‖A‖``, ``‖VᵀV − I‖ ≤ 1e-13`` and eigenvalue
    errors ≤ 2e-14 ``λ_max``.

    Returns the eigenvalues (unsorted) and the eigenvectors as columns of ``V``, for each matrix
    of a batch ``[..., L, L]``.
    """
    num = matrix.shape[-1]
    a = matrix.to(torch.float64)
    v = torch.eye(num, dtype=torch.float64, device=a.device).expand_as(a)
    if num == 1:
        return diagonal(a).clone(), v
    schedule = list(zip(*_round_robin(num, a.device), strict=True))
    for _ in range(default_sweeps(num) if sweeps is None else sweeps):
        for difference, partner, signed in schedule:
            # For the pair (lo, hi) the inner angle |θ| ≤ π/4 with tan 2θ = 2A_lo,hi / δ,
            # δ = A_hi,hi − A_lo,lo, is 2θ = atan(2A_lo,hi / δ) (±π/2 for δ = 0; 0/0, which
            # means nothing to rotate, and rows that sit out give NaN → 0).
            # Both members of a pair must get bit-identical angles or the rotation is not
            # orthogonal: δ comes out identical for both (see _round_robin), and
            # A_lo,hi + A_hi,lo is symmetric although round-off leaves A slightly asymmetric
            # (this matters for repeated eigenvalues, where a tiny off-diagonal entry still
            # calls for a large angle).
            delta = matvec(difference, diagonal(a))
            across = diagonal((a + a.mT) @ partner)
            half = 0.5 * torch.atan(across / delta).nan_to_num(nan=0.0)
            cosine, sine = torch.cos(half), torch.sin(half)
            rotation = torch.addcmul(torch.diag_embed(cosine), sine.unsqueeze(-1), signed)
            a = rotation.mT @ a @ rotation
            v = v @ rotation
    return diagonal(a).clone(), v


# -- lower-bounded QP ----------------------------------------------------------------------------


def lower_bounded_qp(
    gramian: Tensor, lower: Tensor, iterations: int, stop_at_fixed_point: bool
) -> Tensor:
    r"""``argmin_v vᵀ G v`` subject to ``v ≥ u``, for a batch of lower bounds ``u`` ``[..., B, L]``.

    ``G`` is PSD float64 ``[..., L, L]`` (already regularised by the caller); ``u ≥ 0``. This is
    the dual of projecting ``Jᵀu`` onto the dual cone of the rows of ``J`` (Quinton & Rey 2024,
    Prop. 1): the projection is ``Jᵀv``.

    Primal active-set method, all problems of the batch at once: start at ``v = u`` with every
    bound active; each iteration solves the equality-constrained problem with the active
    variables fixed at their bounds in closed form (``G_FF v_F = −G_FA u_A`` by ``solve_ex``), then
    either steps back to the first free variable that reaches its bound (fixing it) or, when the
    solution is feasible, frees the active variable with the most negative multiplier
    ``(Gv)_i < 0`` (relative to ``√G_ii Σ_j √G_jj |v_j|``, i.e. a cosine; tolerance 1e-12). The
    objective decreases strictly, so the method terminates exactly; the fixed count is the
    caller's (``iterations``; on the test zoo, ``L ≤ 32``, the fixed point is reached after at
    most ``L + 1``). KKT at the solution: ``v ≥ u``, ``Gv ≥ 0``, and ``(Gv)_i = 0`` wherever
    ``v_i > u_i``.
    """
    num = lower.shape[-1]
    lower = lower.expand(*gramian.shape[:-2], *lower.shape[-2:])
    eye = torch.eye(num, dtype=gramian.dtype, device=gramian.device)
    index = torch.arange(num, device=gramian.device)
    norms = diagonal(gramian).clamp_min(0.0).sqrt().unsqueeze(-2)  # [..., 1, L]
    free = torch.zeros(lower.shape, dtype=torch.bool, device=gramian.device)
    v = lower.clone()
    square = gramian.unsqueeze(-3)  # [..., 1, L, L]: one per problem, shared by its bounds
    for _ in range(iterations):
        # G_FF on the free block; the rows (and columns) of active variables are identity rows
        # with the bound as right-hand side, the active part of free rows moves to the right.
        system = torch.where(free.unsqueeze(-1) & free.unsqueeze(-2), square, eye)
        rhs = torch.where(free, -(torch.where(free, 0.0, lower) @ gramian), lower)
        x = torch.linalg.solve_ex(system, rhs)[0]
        x = torch.where(free, x, lower)

        below = free & (x < lower - _FEASIBILITY)
        infeasible = below.any(dim=-1, keepdim=True)
        # Infeasible: walk from v towards x until the first free variable reaches its bound.
        ratio = torch.where(below, (v - lower) / (v - x), math.inf)
        step = ratio.amin(dim=-1, keepdim=True).clamp(max=1.0)
        moved = torch.maximum(v + step * (x - v), lower)
        hits = below & (ratio <= step)
        moved = torch.where(hits, lower, moved)

        # Feasible: optimal unless an active variable has a negative multiplier (Gx)_i; the most
        # negative relative to its scale is released.
        feasible = torch.maximum(x, lower)
        scale = norms * (feasible.abs() @ norms.mT)
        relative = (feasible @ gramian) / torch.where(scale > 0, scale, 1.0)
        multiplier = torch.where(free, math.inf, relative)
        smallest = multiplier.min(dim=-1, keepdim=True)
        releases = (index == smallest.indices) & (smallest.values < -_OPTIMALITY)

        v = torch.where(infeasible, moved, feasible)
        free = torch.where(infeasible, free & ~hits, free | releases)
        if stop_at_fixed_point and not (infeasible.any() | releases.any()):
            break
    return v


def dual_cone_weights(
    gramian: Tensor, lower: Tensor, reg_eps: float, iterations: int | None
) -> Tensor:
    """Weights ``v`` with ``Jᵀv = π(Jᵀu)``, the projection onto the dual cone of the rows of ``J``.

    ``lower`` holds the vectors ``u`` (``[B, L]``, float64, ``≥ 0``), the same for every Gramian
    of the batch ``[..., L, L]``. Solves :func:`lower_bounded_qp` on ``G / tr G + reg_eps·I``
    (torchjd's ``reg_eps``), plus the :func:`regularise` ridge at the Gramian dtype's
    :func:`noise_level`. Default iterations: ``2L``. Returns ``v`` (``[..., B, L]`` float64).
    """
    num_objectives = gramian.shape[-1]
    g, _ = normalise_by_trace(gramian)
    g = regularise(g, noise_level(gramian.dtype, num_objectives))
    g = g + reg_eps * torch.eye(num_objectives, dtype=g.dtype, device=g.device)
    count = 2 * num_objectives if iterations is None else iterations
    return lower_bounded_qp(g, lower, count, stop_at_fixed_point=cpu_path(g.device))


def significant_eigh(g: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Eigenvalues, eigenvectors (:func:`jacobi_eigh`) of the trace-normalised Gramian ``g``, and
    the mask of eigenvalues above the round-off level of the input ``dtype`` (:func:`noise_level`).
    """
    eigenvalues, eigenvectors = jacobi_eigh(g)
    largest = eigenvalues.amax(dim=-1, keepdim=True)
    kept = eigenvalues > noise_level(dtype, g.shape[-1]) * largest
    return eigenvalues, eigenvectors, kept
