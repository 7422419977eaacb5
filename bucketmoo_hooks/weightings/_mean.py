from collections.abc import Sequence

import torch
from torch import Tensor

from ._base import BatchedWeighting, WeightingContext


class Mean(BatchedWeighting):
    r"""Equal weights :math:`w = \mathbf{1}/L`: the objective gradients are averaged.

    With equal language groups this is exactly DDP's average (``allreduce_hook``), so it is the
    baseline every other weighting is compared with.
    """

    name = "mean"
    description = "Average of the objective gradients (DDP's average when groups are equal)."

    def solve_batch(self, gramians: Tensor, contexts: Sequence[WeightingContext | None]) -> Tensor:
        num_objectives = gramians.shape[-1]
        return torch.full(
            gramians.shape[:-1], 1.0 / num_objectives, dtype=gramians.dtype, device=gramians.device
        )
