from collections.abc import Sequence

import torch
from torch import Tensor

from ._base import BatchedWeighting, WeightingContext
from ._solvers import matvec, normalise_by_trace, significant_eigh

_SCALE_MODES = ("min", "median", "rmse")


class AlignedMTL(BatchedWeighting):
    r"""Aligned-MTL: makes the gradient system well conditioned before averaging.

    Senushkin, Patakin, Kuznetsov & Konushin 2023, "Independent Component Alignment for
    Multi-Task Learning" (CVPR), Algorithm 1, in the Gramian form of torchjd's ``AlignedMTL``.
    With the eigen-decomposition ``G = V Λ Vᵀ`` restricted to its ``R`` non-null eigenvalues, the
    balance transformation ``B = √σ · V Λ^{-1/2} Vᵀ`` turns the objective gradients into
    orthogonal vectors of equal norm ``√σ`` spanning the same space (``(JᵀB)ᵀ(JᵀB) = σ·P_R``), and
    the update is their mean:

    .. math:: w = B\,\tfrac1L\mathbf 1, \qquad d = \textstyle\sum_\ell w_\ell \bar g_\ell ,

    with ``σ = λ_min`` (``scale_mode="min"``, the paper's choice and torchjd's default), the lower
    median (``"median"``) or the mean (``"rmse"``) of the non-null eigenvalues. Identical gradients
    (``R = 1``) give ``w = 1/L``, so the scaling contract holds without normalisation.

    Solver (float64 on the Gramian's device, no host sync, fixed work): ``G`` is trace-normalised
    (``B`` does not depend on the scale) and eigen-decomposed by the fixed-sweep Jacobi method of
    :func:`~._solvers.jacobi_eigh` (accuracy ≤ 1e-14 relative). Eigenvalues ``≤ L·ε_dtype·λ_max``
    count as null, torchjd's rank rule with ``ε`` of the Gramian's dtype
    (:func:`~._solvers.noise_level`). Rank 0 (a zero Gramian) gives ``B = I``, i.e. ``1/L``.

    Args:
        scale_mode: ``"min"``, ``"median"`` or ``"rmse"``, as above.
    """

    name = "aligned_mtl"
    description = "Mean of the gradients made orthogonal with equal norms (Senushkin 2023)."

    def __init__(self, scale_mode: str = "min") -> None:
        if scale_mode not in _SCALE_MODES:
            raise ValueError(f"scale_mode must be one of {_SCALE_MODES}, got {scale_mode!r}")
        self.scale_mode = scale_mode

    def solve_batch(self, gramians: Tensor, contexts: Sequence[WeightingContext | None]) -> Tensor:
        num_objectives = gramians.shape[-1]
        g, _ = normalise_by_trace(gramians)
        eigenvalues, eigenvectors, kept = significant_eigh(g, gramians.dtype)
        safe = torch.where(kept, eigenvalues, 1.0)
        count = kept.sum(dim=-1, keepdim=True)
        if self.scale_mode == "min":
            scale = torch.where(kept, eigenvalues, torch.inf).amin(dim=-1, keepdim=True)
        elif self.scale_mode == "rmse":
            scale = torch.where(kept, eigenvalues, 0.0).sum(dim=-1, keepdim=True)
            scale = scale / count.clamp_min(1)
        else:  # lower median of the kept eigenvalues, as torch.median
            ascending = torch.where(kept, eigenvalues, torch.inf).sort(dim=-1).values
            middle = ((count - 1) // 2).clamp_min(0)
            scale = ascending.gather(-1, middle)
        root = torch.where(kept, (torch.where(kept, scale, 1.0) / safe).sqrt(), 0.0)
        uniform = torch.full(
            (num_objectives,), 1.0 / num_objectives, dtype=g.dtype, device=g.device
        )
        weights = matvec(eigenvectors, root * (uniform @ eigenvectors))
        return torch.where(count > 0, weights, uniform).to(gramians.dtype)

    def __repr__(self) -> str:
        return f"AlignedMTL(scale_mode={self.scale_mode!r})"
