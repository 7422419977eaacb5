"""The shard-Gramian protocol (DESIGN.md §3), shared by the DDP hook and the FSDP reduce-scatter.

Per bucket, rank ``j`` receives slice ``j`` of every rank's gradient (all-to-all), averages the
rows by objective, forms its partial Gramian, all-reduces the ``L×L`` Gramian, computes the
weights on the device, and combines its slice. DDP then all-gathers the slices; FSDP keeps its
slice as the reduce-scatter output. No rank ever holds the ``L`` objective gradients of a whole
bucket, and the bytes moved are those of the all-reduce (or reduce-scatter) being replaced, plus
``L²`` fp32 numbers.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from ._compat import all_gather_single
from ._ledger import BucketTraffic
from .weightings import Weighting, WeightingContext


class BucketComm:
    """The collectives of one bucket, each counted in the bucket's :class:`BucketTraffic`.

    Bytes are those one rank sends under the bandwidth-optimal algorithm of each collective,
    computed from the tensors actually passed.
    """

    __slots__ = ("group", "traffic", "world_size")

    def __init__(self, group: dist.ProcessGroup, traffic: BucketTraffic) -> None:
        self.group = group
        self.traffic = traffic
        self.world_size = group.size()

    def all_to_all(self, output: Tensor, input: Tensor) -> dist.Work:
        # Every rank keeps its own chunk and sends the other R−1.
        chunk_bytes = input.numel() * input.element_size() // self.world_size
        self.traffic.add("all_to_all", (self.world_size - 1) * chunk_bytes)
        return dist.all_to_all_single(output, input, group=self.group, async_op=True)

    def all_reduce(self, tensor: Tensor) -> dist.Work:
        nbytes = tensor.numel() * tensor.element_size()
        self.traffic.add("all_reduce", 2 * (self.world_size - 1) * nbytes // self.world_size)
        return dist.all_reduce(tensor, group=self.group, async_op=True)

    def all_gather(self, output: Tensor, input: Tensor) -> dist.Work:
        self.traffic.add("all_gather", (self.world_size - 1) * input.numel() * input.element_size())
        return all_gather_single(output, input, group=self.group, async_op=True)


def shard_length(numel: int, world_size: int) -> int:
    """``c = ceil(n / R)``: the slice of a bucket that one rank combines."""
    return -(-numel // world_size)


def scatter_shards(comm: BucketComm, flat: Tensor) -> Tensor:
    """Step 1: pad ``flat`` to ``R·c`` and all-to-all it; returns ``S_j ∈ ℝ^{R×c}``.

    Row ``r`` of the result is slice ``j`` (this rank's) of rank ``r``'s gradient.
    """
    world_size = comm.world_size
    numel = flat.numel()
    shard = shard_length(numel, world_size)
    padded = flat
    if numel != world_size * shard:
        padded = flat.new_zeros(world_size * shard)
        padded[:numel].copy_(flat)
    received = torch.empty_like(padded)
    comm.all_to_all(received, padded).wait()
    return received.view(world_size, shard)


@dataclass(frozen=True, slots=True)
class Combination:
    """A combined update with the Gramian and weights it came from.

    Attributes:
        update: ``d = wᵀ A`` in the bucket dtype: this rank's slice ``d_j`` in the protocol, the
            whole bucket in :mod:`bucketmoo_hooks.reference`.
        gramian: The bucket Gramian ``G`` (after the all-reduce; fp32, or fp64 for fp64 buckets).
        weights: ``w``, one weight per objective.
    """

    update: Tensor
    gramian: Tensor
    weights: Tensor


def solve_shards(
    comm: BucketComm,
    shards: Tensor,
    averaging: Tensor,
    weighting: Weighting,
    context: WeightingContext,
) -> Combination:
    """Steps 2–6: group-average, partial Gramian, Gramian all-reduce, weights, combined slice.

    Args:
        shards: ``S_j ∈ ℝ^{R×c}`` from :func:`scatter_shards` (or FSDP's reduce-scatter input).
        averaging: ``M ∈ ℝ^{L×R}`` (:meth:`ObjectiveMap.averaging_matrix`) on the shards' device.
    """
    # The Gramian is accumulated in fp32 even for bf16/fp16 buckets (fp64 buckets stay fp64).
    compute_dtype = torch.promote_types(shards.dtype, torch.float32)
    objective_shards = averaging.to(compute_dtype) @ shards.to(compute_dtype)  # A_j = M S_j
    gramian = objective_shards @ objective_shards.T  # P_j; zero padding adds nothing
    comm.all_reduce(gramian).wait()  # G = Σ_j P_j
    weights = weighting(gramian, context)
    update = (weights.to(compute_dtype) @ objective_shards).to(shards.dtype)
    return Combination(update, gramian, weights)
