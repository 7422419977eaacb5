import torch
from torch import Tensor

from ._base import Weighting, WeightingContext


class Mean(Weighting):
    r"""Equal weights :math:`w = \mathbf{1}/L`: the objective gradients are averaged.

    With equal language groups this is exactly DDP's average (``allreduce_hook``), so it is the
    baseline every other weighting is compared with.
    """

    name = "mean"
    description = "Average of the objective gradients (DDP's average when groups are equal)."

    def forward(self, gramian: Tensor, context: WeightingContext | None) -> Tensor:
        num_objectives = gramian.shape[0]
        return torch.full(
            (num_objectives,), 1.0 / num_objectives, dtype=gramian.dtype, device=gramian.device
        )
