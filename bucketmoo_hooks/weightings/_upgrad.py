from collections.abc import Sequence

import torch
from torch import Tensor

from ._base import BatchedWeighting, WeightingContext
from ._solvers import check_iterations, check_reg_eps, dual_cone_weights


class UPGrad(BatchedWeighting):
    r"""UPGrad: the mean of the gradients, each projected onto the dual cone of all of them.

    Quinton & Rey 2024, "Jacobian Descent for Multi-Objective Optimization" (arXiv 2406.16232),
    the UPGrad aggregator of torchjd. With ``π`` the Euclidean projection onto the dual cone
    ``{x : ⟨ḡ_ℓ, x⟩ ≥ 0 ∀ℓ}`` of the objective gradients,

    .. math:: d = \frac1L \sum_i \pi\big(\bar g_i\big) = \sum_\ell w_\ell \bar g_\ell, \qquad
              w = \sum_i v^{(i)}, \quad v^{(i)} = \operatorname*{argmin}_{v \ge e_i / L} v^\top G v

    (Proposition 1 of the paper: ``π(Jᵀu) = Jᵀv`` with ``v`` the solution of that QP). ``d`` never
    conflicts with any objective (``Gw ≥ 0``), and it is ``ḡ`` itself for identical gradients
    (``w = 1/L``), so the scaling contract holds without normalisation.

    Solver (float64 on the Gramian's device, no host sync, fixed work): the ``L`` QPs are solved
    together by the primal active-set method of :func:`~._solvers.lower_bounded_qp` (start at
    ``v = u``, every bound active; closed-form equality-constrained steps by ``solve_ex``; step
    back to the first bound hit, or free the most negative multiplier), ``2L`` iterations by
    default. It terminates exactly; on the test zoo (``L ≤ 32``) it needs at most ``L + 1``
    iterations, and the KKT conditions then hold to round-off (multipliers, as cosines, ≥ −3e-15).

    Regularisation: ``G`` is trace-normalised, then ``reg_eps·I`` is added (torchjd's
    ``QuadprogProjector(reg_eps=1e-4)`` default; here ``0`` by default, the paper's exact
    projection) and the relative ridge ``L·ε_dtype·G_ℓℓ`` that makes a rounded Gramian positive
    definite (see :func:`~._solvers.noise_level`); with it, ``⟨d, ḡ_ℓ⟩ ≥ −L·ε_dtype·w_ℓ‖ḡ_ℓ‖²``
    (``− reg_eps·tr G·w_ℓ`` more with ``reg_eps > 0``), i.e. non-conflicting up to the Gramian's
    round-off. Unlike torchjd, a Gramian with a tiny trace is not set to zero (torchjd's
    ``norm_eps``): the weights do not depend on the gradient scale. A zero Gramian gives ``1/L``.

    Args:
        reg_eps: Added to the diagonal of the trace-normalised Gramian (``≥ 0``).
        iterations: Active-set iterations; ``None`` means ``2L``.
    """

    name = "upgrad"
    description = "Mean of the gradients projected onto their dual cone (Quinton & Rey 2024)."

    def __init__(self, reg_eps: float = 0.0, iterations: int | None = None) -> None:
        self.reg_eps = check_reg_eps(reg_eps)
        self.iterations = check_iterations(iterations)

    def solve_batch(self, gramians: Tensor, contexts: Sequence[WeightingContext | None]) -> Tensor:
        num_objectives = gramians.shape[-1]
        eye = torch.eye(num_objectives, dtype=torch.float64, device=gramians.device)
        v = dual_cone_weights(gramians, eye / num_objectives, self.reg_eps, self.iterations)
        return v.sum(dim=-2).to(gramians.dtype)

    def __repr__(self) -> str:
        return f"UPGrad(reg_eps={self.reg_eps}, iterations={self.iterations})"
