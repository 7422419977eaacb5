"""The shard-Gramian protocol (DESIGN.md §3), shared by the DDP hook and the FSDP reduce-scatter.

Per bucket, rank ``j`` receives slice ``j`` of every rank's gradient (all-to-all), averages the
rows by objective, forms its partial Gramian, all-reduces the ``L×L`` Gramian, computes the
weights on the device, and combines its slice. DDP then all-gathers the slices; FSDP keeps its
slice as the reduce-scatter output. No rank ever holds the ``L`` objective gradients of a whole
bucket, and the bytes moved are those of the all-reduce (or reduce-scatter) being replaced, plus
``L²`` fp32 numbers.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from ._compat import all_gather_single
from ._kernels import fused_kernels
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


class Workspace:
    """Buffers reused from bucket to bucket for the exchange of CPU buckets, one bucket at a time.

    A fresh bucket-sized tensor on CPU is fresh pages: glibc hands large blocks back to the
    system when they are freed, so every bucket would page-fault its buffers in again (tens of
    thousands of faults per step, measured to cost as much as the exchange itself on gloo). Holds
    at most two buffers of the largest bucket per dtype. Not for CUDA tensors (the caching
    allocator already reuses blocks, in stream order) and not for slices that outlive the call
    (global MOO holds them).
    """

    __slots__ = ("_buffers",)

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype], Tensor] = {}

    def take(self, slot: str, numel: int, dtype: torch.dtype) -> Tensor:
        """``numel`` elements of buffer ``slot``; its content is whatever the last user left."""
        buffer = self._buffers.get((slot, dtype))
        if buffer is None or buffer.numel() < numel:
            buffer = self._buffers[slot, dtype] = torch.empty(numel, dtype=dtype)
        return buffer[:numel]

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())


def scatter_shards(comm: BucketComm, flat: Tensor, workspace: Workspace | None = None) -> Tensor:
    """Step 1: pad ``flat`` to ``R·c`` and all-to-all it; returns ``S_j ∈ ℝ^{R×c}``.

    Row ``r`` of the result is slice ``j`` (this rank's) of rank ``r``'s gradient. With a
    ``workspace`` (CPU ``flat`` only), the result lives in it until the next bucket's exchange.
    """
    world_size = comm.world_size
    numel = flat.numel()
    shard = shard_length(numel, world_size)
    if workspace is not None and flat.device.type != "cpu":
        workspace = None

    def empty(slot: str) -> Tensor:
        if workspace is None:
            return flat.new_empty(world_size * shard)
        return workspace.take(slot, world_size * shard, flat.dtype)

    padded = flat
    if numel != world_size * shard:
        padded = empty("input")
        padded[numel:].zero_()
        padded[:numel].copy_(flat)
    received = empty("received")
    comm.all_to_all(received, padded).wait()
    return received.view(world_size, shard)


Segment = tuple[int, int]


def shard_segments(sizes: Sequence[int], rank: int, shard: int) -> list[Segment]:
    """Where each of consecutive pieces of ``sizes`` elements falls in slice ``rank`` of length
    ``shard``: ``(lo, hi)`` in slice coordinates, ``(0, 0)`` for a piece outside the slice.

    Every rank gets one segment per piece, so the stacked partial Gramians have the same shape on
    all ranks and one all-reduce sums them.
    """
    start, end = rank * shard, (rank + 1) * shard
    segments, offset = [], 0
    for size in sizes:
        lo, hi = max(offset, start), min(offset + size, end)
        segments.append((lo - start, hi - start) if lo < hi else (0, 0))
        offset += size
    return segments


def objective_shards(shards: Tensor, averaging: Tensor) -> Tensor:
    """Step 2: ``A_j = M S_j ∈ ℝ^{L×c}``, in fp32 even for bf16/fp16 buckets (fp64 stays fp64).

    When every rank is its own objective, in rank order, ``M`` is the identity and ``A_j`` is
    ``S_j`` itself: on CPU, where the check costs no device synchronisation, the product (a
    pass over the bucket, the hook's largest compute on gloo) is skipped.
    """
    compute_dtype = torch.promote_types(shards.dtype, torch.float32)
    if averaging.device.type == "cpu" and _is_identity(averaging):
        return shards.to(compute_dtype)
    return averaging.to(compute_dtype) @ shards.to(compute_dtype)


def _is_identity(matrix: Tensor) -> bool:
    rows, columns = matrix.shape
    return rows == columns and torch.equal(matrix, torch.eye(rows, dtype=matrix.dtype))


def partial_gramians(objectives: Tensor, segments: Sequence[Segment]) -> Tensor:
    """Step 3: ``P_j[s] = A_j[:, s] A_j[:, s]ᵀ`` for every segment, ``[S, L, L]``.

    Zero padding and empty segments add nothing.
    """
    return torch.stack([objectives[:, lo:hi] @ objectives[:, lo:hi].T for lo, hi in segments])


def combine_segments(
    weights: Tensor, objectives: Tensor, segments: Sequence[Segment], dtype: torch.dtype
) -> Tensor:
    """Step 6: ``d_j[s] = w[s]ᵀ A_j[:, s]`` for every segment, in the bucket dtype."""
    if len(segments) == 1 and segments[0] == (0, objectives.shape[1]):
        return (weights[0].to(objectives.dtype) @ objectives).to(dtype)
    update = objectives.new_zeros(objectives.shape[1])
    for (lo, hi), segment_weights in zip(segments, weights, strict=True):
        update[lo:hi] = segment_weights.to(objectives.dtype) @ objectives[:, lo:hi]
    return update.to(dtype)


def segment_weights(
    weighting: Weighting, gramians: Tensor, contexts: Sequence[WeightingContext]
) -> Tensor:
    """Step 5 for every segment: ``[S, L]`` weights, segment ``s`` solved with ``contexts[s]``."""
    return torch.stack(
        [weighting(gramian, context) for gramian, context in zip(gramians, contexts, strict=True)]
    )


@dataclass(frozen=True, slots=True)
class ShardCombination:
    """What one rank computed for its slice of one bucket.

    Attributes:
        update: ``d_j``, this rank's slice of the combined update, in the bucket dtype.
        gramians: The all-reduced Gramians, one per segment, ``[S, L, L]`` (fp32, fp64 for fp64).
        weights: One weight vector per segment, ``[S, L]``.
    """

    update: Tensor
    gramians: Tensor
    weights: Tensor


def solve_shards(
    comm: BucketComm,
    shards: Tensor,
    averaging: Tensor,
    weighting: Weighting,
    contexts: Sequence[WeightingContext],
    segments: Sequence[Segment] | None = None,
    kernels: str = "auto",
    check: Callable[[Tensor], None] | None = None,
) -> ShardCombination:
    """Steps 2–6: group-average, partial Gramians, one all-reduce, weights, combined slice.

    Args:
        shards: ``S_j ∈ ℝ^{R×c}`` from :func:`scatter_shards` (or FSDP's reduce-scatter input).
        averaging: ``M ∈ ℝ^{L×R}`` (:meth:`ObjectiveMap.averaging_matrix`) on the shards' device.
        contexts: One weighting context per problem (per segment).
        segments: Independent problems within the slice (:func:`shard_segments`); ``None`` is one
            problem for the whole slice (bucket granularity).
        kernels: ``"auto"``, ``"torch"`` or ``"cuda"``: whether the fused CUDA kernels
            (:mod:`._kernels`) or the torch functions above do the compute (``BucketMOOState``).
        check: Called with the all-reduced Gramians before they are used (e.g.
            :func:`._nonfinite.raise_if_nonfinite`).
    """
    fused = fused_kernels(kernels, shards, averaging, segments)
    if fused is not None:  # the same steps; A_j is recomputed from S_j instead of stored
        gramians = fused.partial_gramians()
        comm.all_reduce(gramians).wait()
        if check is not None:
            check(gramians)
        given = None if fused.solves(weighting) else segment_weights(weighting, gramians, contexts)
        weights, update = fused.combine(gramians, weighting, given)
        return ShardCombination(update, gramians, weights)
    objectives = objective_shards(shards, averaging)
    if segments is None:
        segments = [(0, objectives.shape[1])]
    gramians = partial_gramians(objectives, segments)
    comm.all_reduce(gramians).wait()  # G[s] = Σ_j P_j[s]
    if check is not None:
        check(gramians)
    weights = segment_weights(weighting, gramians, contexts)
    update = combine_segments(weights, objectives, segments, shards.dtype)
    return ShardCombination(update, gramians, weights)
