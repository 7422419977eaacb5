"""Every collective the hooks issue, each with the bytes one rank sends through it.

Bytes are those of the bandwidth-optimal algorithm of each collective (what NCCL's ring and
pairwise algorithms send), from the size ``n·b`` of the tensor the collective is about: the
all-reduced tensor, the all-to-all's input, the all-gather's output, the reduce-scatter's input.
One formula per collective: :mod:`.cost_model` and :class:`._ledger.BucketTraffic` use these.

Each collective's bytes are also split by link class, within a node or across nodes, by peer
pairs (:func:`cross_node_bytes`): the bandwidth-optimal algorithms send each of a rank's ``R−1``
peers the same share, and ``ranks_per_node`` (torchrun's ``LOCAL_WORLD_SIZE``: consecutive
global ranks share a node) tells which peers share this rank's node. Unknown (``None``): one node.
"""

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ReduceOp

from ._compat import all_gather_single, reduce_scatter_single

if TYPE_CHECKING:
    from ._ledger import BucketTraffic


def all_reduce_bytes(nbytes: int, world_size: int) -> int:
    """Ring all-reduce: ``2(R−1)/R · n·b``."""
    return 2 * (world_size - 1) * nbytes // world_size


def all_to_all_bytes(nbytes: int, world_size: int) -> int:
    """All-to-all: every rank keeps its own chunk and sends the other ``R−1``: ``(R−1)/R · n·b``."""
    return (world_size - 1) * nbytes // world_size


def all_gather_bytes(nbytes: int, world_size: int) -> int:
    """All-gather into ``n·b`` bytes: ``R−1`` chunks of ``n·b/R``."""
    return (world_size - 1) * nbytes // world_size


def reduce_scatter_bytes(nbytes: int, world_size: int) -> int:
    """Reduce-scatter of ``n·b`` bytes: ``(R−1)/R · n·b``."""
    return (world_size - 1) * nbytes // world_size


SENT_BYTES: dict[str, Callable[[int, int], int]] = {
    "all_reduce": all_reduce_bytes,
    "all_to_all": all_to_all_bytes,
    "all_gather": all_gather_bytes,
    "reduce_scatter": reduce_scatter_bytes,
}


def nbytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def cross_node_bytes(nbytes: int, world_size: int, peers_on_node: int) -> int:
    """Of the ``nbytes`` a rank sends in a collective over ``world_size`` ranks, those for the
    ``R−1−p`` peers off its node (``p = peers_on_node``), each peer getting an equal share."""
    if world_size <= 1:
        return 0
    return nbytes * (world_size - 1 - peers_on_node) // (world_size - 1)


def peers_on_node(group: dist.ProcessGroup, ranks_per_node: int | None) -> int:
    """How many other ranks of ``group`` share this rank's node: global ranks ``g`` with the
    same ``g // ranks_per_node``; all of them when ``ranks_per_node`` is ``None`` (unknown)."""
    ranks = dist.get_process_group_ranks(group)
    if ranks_per_node is None:
        return len(ranks) - 1
    return _peers(tuple(ranks), dist.get_rank(), ranks_per_node)


@functools.lru_cache(maxsize=256)
def _peers(ranks: tuple[int, ...], rank: int, ranks_per_node: int) -> int:
    # Keyed by ranks, not by the group: a cache that held process groups would keep them alive
    # past destroy_process_group, and gloo then aborts the process at exit.
    node = rank // ranks_per_node
    return sum(r // ranks_per_node == node for r in ranks) - 1


class Collectives:
    """The collectives of one bucket or unit over ``group``, each counted in its traffic.

    With an ``outer`` group (HSDP: the protocol runs over the replicate group on one shard of a
    unit), :meth:`all_reduce_unit` also sums over ``outer``, so that a Gramian covers the whole
    unit; every other collective runs over ``group`` only. ``ranks_per_node`` splits the bytes
    by link class (:func:`cross_node_bytes`).
    """

    __slots__ = ("group", "outer", "ranks_per_node", "traffic", "world_size")

    def __init__(
        self,
        group: dist.ProcessGroup,
        traffic: "BucketTraffic",
        outer: dist.ProcessGroup | None = None,
        ranks_per_node: int | None = None,
    ) -> None:
        self.group = group
        self.traffic = traffic
        self.outer = outer
        self.ranks_per_node = ranks_per_node
        self.world_size = group.size()

    def over(self, group: dist.ProcessGroup) -> "Collectives":
        """The collectives of the same bucket over ``group`` (a subgroup of this one's ranks)."""
        return Collectives(group, self.traffic, None, self.ranks_per_node)

    def _count(self, collective: str, sent: int, group: dist.ProcessGroup) -> None:
        peers = peers_on_node(group, self.ranks_per_node)
        self.traffic.add(collective, sent, cross_node_bytes(sent, group.size(), peers))

    def all_to_all(
        self, output: Tensor, input: Tensor, output_splits: list[int] | None = None
    ) -> dist.Work:
        """Chunk ``r`` of ``input`` to rank ``r``; ``output_splits``: the elements that come
        from each rank, when they differ (``input``'s chunks are equal)."""
        self._count("all_to_all", all_to_all_bytes(nbytes(input), self.world_size), self.group)
        return dist.all_to_all_single(output, input, output_splits, group=self.group, async_op=True)

    def all_reduce(self, tensor: Tensor) -> dist.Work:
        """SUM over the group."""
        self._count("all_reduce", all_reduce_bytes(nbytes(tensor), self.world_size), self.group)
        return dist.all_reduce(tensor, group=self.group, async_op=True)

    def all_reduce_unit(self, tensor: Tensor) -> dist.Work:
        """SUM over the group, then over ``outer`` if any: a statistic of the whole unit."""
        work = self.all_reduce(tensor)
        if self.outer is None:
            return work
        work.wait()
        return self.all_reduce_outer(tensor)

    def all_reduce_outer(self, tensor: Tensor) -> dist.Work:
        """SUM over ``outer`` only (HSDP: a statistic of every shard of the unit)."""
        assert self.outer is not None
        self._count("all_reduce", all_reduce_bytes(nbytes(tensor), self.outer.size()), self.outer)
        return dist.all_reduce(tensor, group=self.outer, async_op=True)

    def all_gather(self, output: Tensor, input: Tensor) -> dist.Work:
        self._count("all_gather", all_gather_bytes(nbytes(output), self.world_size), self.group)
        return all_gather_single(output, input, group=self.group, async_op=True)

    def reduce_scatter(self, output: Tensor, input: Tensor) -> dist.Work:
        """SUM of every rank's ``input`` (``[R·c]``), chunk ``r`` to rank ``r``."""
        sent = reduce_scatter_bytes(nbytes(input), self.world_size)
        self._count("reduce_scatter", sent, self.group)
        return reduce_scatter_single(
            output, input, op=ReduceOp.SUM, group=self.group, async_op=True
        )

    def gather_into(self, buffer: Tensor, update: Tensor) -> torch.futures.Future[Tensor]:
        """All-gather every rank's ``update`` slice into ``buffer`` (the last slice may be
        padding past ``buffer``'s end); the future resolves to ``buffer``."""
        numel = buffer.numel()
        if update.numel() * self.world_size == numel:  # no padding: straight into the buffer
            return self.all_gather(buffer, update).get_future().then(lambda _: buffer)
        padded = buffer.new_empty(update.numel() * self.world_size)
        future = self.all_gather(padded, update).get_future()

        def unpad(_: torch.futures.Future) -> Tensor:
            if padded.is_cuda:  # read on the callback's stream: keep the block until then
                padded.record_stream(torch.cuda.current_stream(padded.device))
            return buffer.copy_(padded[:numel])

        return future.then(unpad)
