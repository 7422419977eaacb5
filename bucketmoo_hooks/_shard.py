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

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ._absent import presence_counts
from ._collectives import Collectives, nbytes
from ._kernels import FusedBucket, fused_kernels
from ._linalg import Segment, combine_segments, objective_shards, partial_gramians, row_segments
from ._protocol import Exchange, ExchangeProtocol, Gradient, Request
from ._runtime import Workspace
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
    gradient: Gradient,
    shards: Tensor,
    averaging: Tensor,
    parameters: list[Segment],
    request: Request,
    gather: "Gather | None" = None,
) -> "ShardExchange":
    """Steps 2–4 on this rank's received slice ``S_j ∈ ℝ^{R×c}``: group averages, partial
    Gramians (the fused kernels' or torch's, by ``request.kernels``), their all-reduce with the
    presence counts. ``parameters``: every parameter's segment of the slice; with
    ``request.per_parameter`` each is a problem of its own, else the slice is one problem.
    ``gradient``: what :meth:`ShardExchange.deliver` writes, with ``gather`` (default
    :meth:`Collectives.gather_into`) for an all-reduce.

    ``S_j`` may be any rows whose combination ``M S_j`` is ``A_j`` (the hierarchical protocol:
    node sums already averaged, and a 0/1 ``M``); the presence counts then count rows, not
    ranks, which is all their use (``> 0``) needs."""
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
        comm.all_reduce_unit(packed).wait()
        gramians = packed[: gramians.numel()].view_as(gramians)
        counts = packed[gramians.numel() :].view_as(counts)
    else:
        comm.all_reduce_unit(gramians).wait()
    return ShardExchange(
        comm,
        gradient,
        shards,
        averaging,
        objectives,
        fused,
        problems,
        parameters,
        gramians,
        counts,
        gather,
    )


#: Step 7 of an all-reduce: ``(buffer, combined slice) → future of the reduced buffer``.
Gather = Callable[[Tensor, Tensor], torch.futures.Future[Tensor]]


@dataclass(eq=False, slots=True)
class ShardExchange(Exchange):
    """One bucket after phase 1 of :class:`ShardProtocol`: this rank's slice and the
    all-reduced Gramians."""

    comm: Collectives
    gradient: Gradient
    shards: Tensor | None  # S_j, [R, c]; what the fused kernels read in phase 2
    averaging: Tensor  # M, [L, R]
    objectives: Tensor | None  # A_j = M S_j, [L, c]: the torch path's
    fused: FusedBucket | None
    problems: list[Segment]  # the problems' segments of the slice
    parameters: list[Segment]  # every parameter's segment of the slice ((0, 0): outside)
    gramians: Tensor
    counts: Tensor | None
    gather: "Gather | None"  # step 7; None: Collectives.gather_into

    def solves(self, weighting: Weighting) -> bool:
        return self.fused is not None and self.fused.solves(weighting)

    @property
    def held_bytes(self) -> int:
        return sum(nbytes(t) for t in (self.shards, self.objectives) if t is not None)

    def hold(self) -> None:
        """Keep ``S_j`` (``R·c`` in the bucket dtype) for the kernels or ``A_j`` (``L·c``
        fp32) for the torch path, whichever is smaller."""
        if self.objectives is None:
            assert self.shards is not None
            if self.shards.element_size() * self.shards.shape[0] <= 4 * self.averaging.shape[0]:
                return  # the kernels' input is the smaller
            self.objectives = objective_shards(self.shards, self.averaging)
            self.fused = None
        self.shards = None

    def _objectives(self) -> Tensor:
        if self.objectives is None:
            assert self.shards is not None
            self.objectives = objective_shards(self.shards, self.averaging)
        return self.objectives

    def combine(
        self, weighting: Weighting, weights: Tensor | None, parameter_weights: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        dtype = self.gradient.flat.dtype
        if parameter_weights is not None:  # per parameter: in torch, whichever path
            assert weights is not None
            return weights, combine_segments(
                parameter_weights, self._objectives(), self.parameters, dtype
            )
        if self.fused is not None:
            return self.fused.combine(self.gramians, weighting, weights)
        assert weights is not None
        return weights, combine_segments(weights, self._objectives(), self.problems, dtype)

    def deliver(self, combined: Tensor) -> torch.futures.Future[Tensor] | None:
        output = self.gradient.output
        if output is None:  # step 7
            gather = self.gather or self.comm.gather_into
            return gather(self.gradient.flat, combined)
        output.copy_(combined)
        return None


def shard_length(numel: int, world_size: int) -> int:
    """``c = ⌈n / R⌉``: the slice of a bucket that one rank combines."""
    return -(-numel // world_size)


def scatter_shards(comm: Collectives, flat: Tensor, workspace: Workspace | None = None) -> Tensor:
    """Step 1: pad ``flat`` to ``R·c`` and all-to-all it; returns ``S_j ∈ ℝ^{R×c}``.

    Row ``r`` of the result is slice ``j`` (this rank's) of rank ``r``'s gradient. With a
    ``workspace`` (CPU ``flat`` only), the result lives in it until the next bucket's exchange.
    """
    padded = padded_bucket(flat, comm.world_size, workspace)
    received = bucket_buffer(flat, "received", padded.numel(), workspace)
    comm.all_to_all(received, padded).wait()
    return received.view(comm.world_size, -1)


def padded_bucket(flat: Tensor, world_size: int, workspace: Workspace | None = None) -> Tensor:
    """``flat`` zero-padded to ``R·c`` elements: ``flat`` itself when it has as many."""
    numel = flat.numel()
    total = world_size * shard_length(numel, world_size)
    if numel == total:
        return flat
    padded = bucket_buffer(flat, "input", total, workspace)
    padded[numel:].zero_()
    padded[:numel].copy_(flat)
    return padded


def bucket_buffer(like: Tensor, slot: str, numel: int, workspace: Workspace | None) -> Tensor:
    """``numel`` elements of ``like``'s dtype and device: ``workspace``'s buffer ``slot`` for a
    CPU tensor (its content is whatever the last bucket left), else a fresh one."""
    if workspace is None or like.device.type != "cpu":
        return like.new_empty(numel)
    return workspace.take(slot, numel, like.dtype)


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
