"""Differences between the torch versions this package supports (2.11 … 2.13)."""

import torch.distributed as dist

# torch 2.13 renamed all_gather_into_tensor to all_gather_single and deprecated the old name.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
# The same rename for reduce_scatter_tensor → reduce_scatter_single.
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
