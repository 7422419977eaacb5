"""The shard protocol (``protocol="shard"``, docs/design.md §3): the paper's exact method.

Per bucket, rank ``j`` receives slice ``j`` of every rank's gradient (step 1: all-to-all of the
padded bucket; a reduce-scatter's input is laid out so already), averages the rows by objective
(step 2: ``A_j = M S_j``), forms its partial Gramians (step 3), all-reduces them (step 4), and,
once the core has the weights (step 5), combines its slice (step 6: ``d_j = wᵀA_j``). An
all-reduce then all-gathers the slices into the bucket (step 7); a reduce-scatter keeps its
slice as its output. No rank ever holds the ``L`` objective gradients of a whole bucket; the
bytes are those of the all-reduce (or reduce-scatter) replaced, plus ``L²`` fp32 numbers per
problem (and ``L`` per parameter where objectives may be absent).
"""

import torch
from torch import Tensor

from ._absent import presence_counts
from ._collectives import Collectives, nbytes
from ._kernels import FusedBucket, fused_kernels
from ._linalg import Segment, combine_segments, objective_shards, partial_gramians, row_segments
from ._protocol import Exchange, ExchangeProtocol, Gradient, Request
from .weightings import Weighting


class ShardProtocol(ExchangeProtocol):
    """All-to-all, Gramian all-reduce, all-gather: exact, the bytes of a ring all-reduce."""

    name = "shard"

    def exchange(
        self, comm: Collectives, gradient: Gradient, averaging: Tensor, request: Request
    ) -> "ShardExchange":
        flat, world_size = gradient.flat, comm.world_size
        if gradient.output is None:  # step 1 of an all-reduce: pad, all-to-all
            shards = scatter_shards(comm, flat, request.workspace)
        else:  # a reduce-scatter's input: chunk r is already rank r's
            received = torch.empty_like(flat)
            comm.all_to_all(received, flat).wait()
            shards = received.view(world_size, -1)
        if gradient.rows:
            parameters = row_segments(gradient.sizes)
        else:
            parameters = shard_segments(gradient.sizes, comm.group.rank(), shards.shape[1])
        return exchange_shards(comm, gradient, shards, averaging, parameters, request)


def exchange_shards(
    comm: Collectives,
    gradient: Gradient | None,
    shards: Tensor,
    averaging: Tensor,
    parameters: list[Segment],
    request: Request,
) -> "ShardExchange":
    """Steps 2–4 on this rank's received slice ``S_j ∈ ℝ^{R×c}``: group averages, partial
    Gramians (the fused kernels' or torch's, by ``request.kernels``), their all-reduce with the
    presence counts. ``parameters``: every parameter's segment of the slice; with
    ``request.per_parameter`` each is a problem of its own, else the slice is one problem.
    ``gradient`` (what :meth:`ShardExchange.deliver` writes) may be ``None`` to compute only."""
    problems = parameters if request.per_parameter else [(0, shards.shape[1])]
    fused = fused_kernels(
        request.kernels, shards, averaging, parameters if request.per_parameter else None
    )
    objectives = None  # A_j: the fused kernels recompute it from S_j instead of storing it
    if fused is not None:
        gramians = fused.partial_gramians()
    else:
        objectives = objective_shards(shards, averaging)
        gramians = partial_gramians(objectives, problems)
    counts = None
    if request.presence:  # L numbers per parameter, in the same all-reduce
        counts = presence_counts(shards, averaging, parameters).to(gramians.dtype)
        packed = torch.cat([gramians.reshape(-1), counts.reshape(-1)])
        comm.all_reduce(packed).wait()
        gramians = packed[: gramians.numel()].view_as(gramians)
        counts = packed[gramians.numel() :].view_as(counts)
    else:
        comm.all_reduce(gramians).wait()
    return ShardExchange(
        comm, gradient, shards, averaging, objectives, fused, problems, parameters, gramians, counts
    )


class ShardExchange(Exchange):
    """One bucket after phase 1 of :class:`ShardProtocol`: this rank's slice ``S_j`` (or
    ``A_j``) and the all-reduced Gramians."""

    def __init__(
        self,
        comm: Collectives,
        gradient: Gradient | None,
        shards: Tensor,
        averaging: Tensor,
        objectives: Tensor | None,
        fused: FusedBucket | None,
        problems: list[Segment],
        parameters: list[Segment],
        gramians: Tensor,
        counts: Tensor | None,
    ) -> None:
        self.comm = comm
        self.gradient = gradient
        self.shards = shards  # S_j, [R, c]
        self.averaging = averaging  # M, [L, R]
        self.objectives = objectives  # A_j = M S_j, [L, c] (torch path)
        self.fused = fused
        self.problems = problems  # the problems' segments of the slice
        self.parameters = parameters  # every parameter's segment of the slice ((0, 0): outside)
        self.gramians = gramians
        self.counts = counts

    def solves(self, weighting: Weighting) -> bool:
        return self.fused is not None and self.fused.solves(weighting)

    @property
    def held_bytes(self) -> int:
        return nbytes(self.shards if self.objectives is None else self.objectives)

    def combine(
        self, weighting: Weighting, weights: Tensor | None, parameter_weights: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        dtype = self.shards.dtype
        if parameter_weights is not None:  # per parameter: in torch, whichever path
            assert weights is not None
            if self.objectives is None:
                self.objectives = objective_shards(self.shards, self.averaging)
            return weights, combine_segments(
                parameter_weights, self.objectives, self.parameters, dtype
            )
        if self.fused is not None:
            return self.fused.combine(self.gramians, weighting, weights)
        assert self.objectives is not None and weights is not None
        return weights, combine_segments(weights, self.objectives, self.problems, dtype)

    def deliver(self, combined: Tensor) -> torch.futures.Future[Tensor] | None:
        assert self.gradient is not None
        output = self.gradient.output
        if output is None:  # step 7
            return self.comm.gather_into(self.gradient.flat, combined)
        output.copy_(combined)
        return None


def shard_length(numel: int, world_size: int) -> int:
    """``c = ⌈n / R⌉``: the slice of a bucket that one rank combines."""
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
        return sum(nbytes(b) for b in self._buffers.values())


def scatter_shards(comm: Collectives, flat: Tensor, workspace: Workspace | None = None) -> Tensor:
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


def shard_segments(sizes: "list[int] | tuple[int, ...]", rank: int, shard: int) -> list[Segment]:
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
