from collections.abc import Sequence

import torch
from torch import Tensor

from ._base import BatchedWeighting, WeightingContext
from ._solvers import diagonal, matvec, normalise_by_trace, significant_eigh, uniform_if_zero

# |1ᵀv| below this (trace-normalised units, where identical gradients give 1ᵀv = √L) means no
# combination with equal projections sums to one: the weights are then zero.
_DEGENERATE_SUM = 1e-10


class IMTLG(BatchedWeighting):
    r"""Impartial multi-task learning, gradient part: equal projections on every unit gradient.

    Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang 2021, "Towards Impartial Multi-task Learning"
    (ICLR), IMTL-G; in the Gramian form of Quinton & Rey 2024 ("Jacobian Descent for
    Multi-Objective Optimization", torchjd's ``IMTLG``), which also covers linearly dependent
    gradients. The update ``d = Σ_ℓ w_ℓ ḡ_ℓ`` with ``Σ_ℓ w_ℓ = 1`` has the same projection on every
    unit gradient, ``⟨d, ḡ_ℓ⟩ / ‖ḡ_ℓ‖ = const``, i.e. ``G w ∝ n`` with ``n_ℓ = ‖ḡ_ℓ‖ = √G_ℓℓ``:

    .. math:: v = G^{+} n, \qquad w = v / \mathbf 1^\top v .

    Identical gradients give ``w = 1/L`` (the scaling contract holds without normalisation).

    Solver (float64 on the Gramian's device, no host sync, fixed work): ``G`` is trace-normalised
    and eigen-decomposed by the fixed-sweep Jacobi method of :func:`~._solvers.jacobi_eigh`
    (accuracy ≤ 1e-14 relative); the pseudo-inverse drops eigenvalues ``≤ L·ε_dtype·λ_max``
    (``torch.linalg.pinv``'s default cutoff, as torchjd uses, with ``ε`` of the Gramian's dtype;
    :func:`~._solvers.noise_level`). Unlike ``pinv``'s SVD, negative round-off eigenvalues are
    dropped rather than inverted.

    Degenerate cases: if ``|1ᵀv| ≤ 1e-10`` (e.g. two opposite gradients: no update with equal
    projections sums to one) the weights are zero, as in torchjd (which tests ``|1ᵀv| < 1e-12`` in
    the Gramian's own units; here the test is scale-free). A zero Gramian gives ``1/L``.
    """

    name = "imtl_g"
    description = "Update with equal projections on all unit gradients (Liu 2021, IMTL-G)."

    def solve_batch(self, gramians: Tensor, contexts: Sequence[WeightingContext | None]) -> Tensor:
        g, nonzero = normalise_by_trace(gramians)
        eigenvalues, eigenvectors, kept = significant_eigh(g, gramians.dtype)
        inverse = torch.where(kept, 1.0 / torch.where(kept, eigenvalues, 1.0), 0.0)
        norms = diagonal(g).clamp_min(0.0).sqrt()
        v = matvec(eigenvectors, inverse * matvec(eigenvectors.mT, norms))
        total = v.sum(dim=-1, keepdim=True)
        degenerate = total.abs() <= _DEGENERATE_SUM
        weights = torch.where(degenerate, 0.0, v / torch.where(degenerate, 1.0, total))
        return uniform_if_zero(weights, nonzero).to(gramians.dtype)
