from collections.abc import Sequence

import torch
from torch import Tensor

from ._base import BatchedWeighting, WeightingContext
from ._solvers import check_iterations, check_reg_eps, dual_cone_weights


class DualProj(BatchedWeighting):
    r"""The mean gradient projected onto the dual cone of the objective gradients.

    Quinton & Rey 2024, "Jacobian Descent for Multi-Objective Optimization" (arXiv 2406.16232),
    the DualProj aggregator of torchjd; the projection is Equation 11 of Lopez-Paz & Ranzato 2017,
    "Gradient Episodic Memory for Continual Learning". With ``π`` the Euclidean projection onto
    the dual cone ``{x : ⟨ḡ_ℓ, x⟩ ≥ 0 ∀ℓ}``,

    .. math:: d = \pi\Big(\frac1L \sum_\ell \bar g_\ell\Big) = \sum_\ell w_\ell \bar g_\ell, \qquad
              w = \operatorname*{argmin}_{v \ge \mathbf 1 / L} v^\top G v

    (Proposition 1 of the paper). ``d`` never conflicts with any objective (``Gw ≥ 0``); it is the
    mean whenever the mean conflicts with nothing, so identical gradients give that gradient back
    (``w = 1/L``) without normalisation.

    Solver and regularisation: as :class:`~.UPGrad` (one QP instead of ``L``): primal active set,
    ``2L`` iterations by default (at most ``L`` needed on the test zoo); ``reg_eps·I`` on the
    trace-normalised Gramian (torchjd's default is ``1e-4``, here ``0``) plus the relative ridge
    ``L·ε_dtype·G_ℓℓ``; scale-free (no ``norm_eps``). A zero Gramian gives ``1/L``.

    Args:
        reg_eps: Added to the diagonal of the trace-normalised Gramian (``≥ 0``).
        iterations: Active-set iterations; ``None`` means ``2L``.
    """

    name = "dualproj"
    description = "Mean gradient projected onto the gradients' dual cone (Quinton & Rey 2024)."

    def __init__(self, reg_eps: float = 0.0, iterations: int | None = None) -> None:
        self.reg_eps = check_reg_eps(reg_eps)
        self.iterations = check_iterations(iterations)

    def solve_batch(self, gramians: Tensor, contexts: Sequence[WeightingContext | None]) -> Tensor:
        num_objectives = gramians.shape[-1]
        mean = torch.full(
            (1, num_objectives), 1.0 / num_objectives, dtype=torch.float64, device=gramians.device
        )
        v = dual_cone_weights(gramians, mean, self.reg_eps, self.iterations)
        return v.squeeze(-2).to(gramians.dtype)

    def __repr__(self) -> str:
        return f"DualProj(reg_eps={self.reg_eps}, iterations={self.iterations})"
