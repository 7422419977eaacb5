r"""The hierarchical protocol (``protocol="hierarchical"``, docs/protocols.md): the shard
protocol's exact result, exchanged so that what crosses the network is at most what a ring
all-reduce sends when every node trains one objective.

``N`` nodes of ``G`` ranks (``ranks_per_node``): rank ``kG + i`` of the group is node ``k``'s
local index ``i``. As in the shard protocol the bucket is padded to ``R`` chunks of ``c = ⌈n/R⌉``
and every rank ends with ``A = M S ∈ ℝ^{L×c}``, the objective averages of its chunk (``M``:
:meth:`ObjectiveMap.averaging_matrix`, row ``ℓ`` is ``1/m_ℓ`` on the ranks of objective ``ℓ``).
Rank ``(k, i)``'s chunk: ``iN + k`` for an all-reduce (DDP), so that both levels move
contiguous blocks of the bucket (block ``i``: chunks ``iN … iN + N−1``) and nothing is
reordered; ``kG + i`` for a reduce-scatter (FSDP: chunk ``r`` of its input is rank ``r``'s
shard), whose input is reordered into those blocks once.

1. Within the node, an all-to-all: rank ``(k, i)`` receives block ``i`` of every local rank's
   bucket, ``[G, N, c]``.
2. It sums them by objective, ``P_k = M_k S ∈ ℝ^{L_k×N×c}``: ``M_k`` is ``M`` on the columns of
   node ``k``'s ranks and on the ``L_k`` objectives with ranks there (already divided by the
   global ``m_ℓ``); in fp32, rounded once to the bucket's dtype for the wire.
3. Across nodes, among the ``N`` ranks with local index ``i``, an all-to-all with split sizes:
   rank ``(k', i)`` receives ``P_k``'s rows for its chunk from every node ``k``, ``S' ∈
   ℝ^{(Σ_k L_k)×c}``, and ``A = M' S'`` where ``M'`` (0/1) adds the rows of the same objective.
4. The shard protocol's steps 3–6 on ``(S', M')`` (:func:`._shard.exchange_shards`): partial
   Gramians, their all-reduce over all ranks, weights, the combined chunk ``d = wᵀA``.
5. An all-reduce: all-gather ``d`` across nodes (block ``i``), then the blocks within the node.
   A reduce-scatter: ``d`` is the rank's output.

Bytes per rank (``b`` per element, besides the shard protocol's Gramian all-reduce): across
nodes ``(L_k + 1)·c·(N−1)·b`` (steps 3 and 5; the flat protocol sends ``2·G·c·(N−1)·b``), within
the node ``2·(G−1)·N·c·b`` (steps 1 and 5). One node (``G = R``) or one rank per node (``G = 1``):
the two levels collapse into one and the exchange is the shard protocol's.
"""

import functools
import os
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

from ._collectives import Collectives
from ._groups import node_groups, node_layout_error
from ._linalg import objective_shards, row_segments
from ._protocol import ExchangeProtocol, Gradient, Request, checked_int
from ._shard import (
    ShardExchange,
    ShardProtocol,
    bucket_buffer,
    exchange_shards,
    padded_bucket,
    shard_length,
    shard_segments,
)

_LAYOUTS = 64  # averaging matrices whose layout is kept


@dataclass(frozen=True, slots=True)
class _NodeLayout:
    """Which objectives each node's ranks train, for one averaging matrix ``M``."""

    present: tuple[tuple[int, ...], ...]  # per node k: the L_k objectives with ranks there
    node_averaging: Tensor  # M_k of this rank's node: [L_k, G]
    merge: Tensor  # M': [L, Σ_k L_k], 0/1, the received rows into objectives


class HierarchicalProtocol(ExchangeProtocol):
    """Two-level all-to-all, Gramian all-reduce, two-level all-gather: exact, and across nodes
    at most a ring all-reduce's bytes when every node trains one objective."""

    name = "hierarchical"

    def __init__(self, ranks_per_node: int) -> None:
        self.ranks_per_node = ranks_per_node
        # Per averaging matrix (the runtime keeps one per objective map), by identity: read on
        # the host once, not at every bucket.
        self._layouts: dict[int, tuple[weakref.ref[Tensor], _NodeLayout]] = {}

    def exchange(
        self, comm: Collectives, gradient: Gradient, averaging: Tensor, request: Request
    ) -> ShardExchange:
        size, world_size = self.ranks_per_node, comm.world_size
        if world_size % size:  # registered with register_comm_hook, unchecked
            raise ValueError(node_layout_error(size, list(range(world_size))))
        if size in (1, world_size):  # one level: the flat exchange is this exchange
            return ShardProtocol().exchange(comm, gradient, averaging, request)
        nodes, rank = world_size // size, comm.group.rank()
        node, local = divmod(rank, size)
        within, across = (comm.over(g) for g in node_groups(comm.group, size))
        layout = self._layout(averaging, size, node)
        flat, workspace = gradient.flat, request.workspace
        shard = shard_length(flat.numel(), world_size)
        if gradient.output is None:  # an all-reduce: rank (k, i) combines chunk iN + k
            chunk, blocks = local * nodes + node, padded_bucket(flat, world_size, workspace)
        else:  # a reduce-scatter: chunk kG + i is rank (k, i)'s shard
            chunk, blocks = rank, bucket_buffer(flat, "input", flat.numel(), workspace)
            blocks.view(size, nodes, shard).copy_(flat.view(nodes, size, shard).transpose(0, 1))
        # Step 1: block i of ``blocks`` (the chunks of local index i, node by node) to local i.
        received = bucket_buffer(flat, "received", blocks.numel(), workspace)
        within.all_to_all(received, blocks).wait()
        # Step 2: node sums by objective, [L_k, N·c], laid out node by node: [N, L_k, c].
        sums = objective_shards(received.view(size, -1), layout.node_averaging)
        rows = sums.view(-1, nodes, shard).transpose(0, 1)
        if rows.is_contiguous():  # L_k = 1: in place, when the dtype is the bucket's
            rows = rows.to(flat.dtype)
        else:
            rows = flat.new_empty(rows.shape).copy_(rows)
        # Step 3: node k's rows of the chunk of (k', i) to rank (k', i).
        splits = [len(p) * shard for p in layout.present]
        merged = flat.new_empty(sum(splits))
        across.all_to_all(merged, rows.view(-1), splits).wait()
        if gradient.rows:
            parameters = row_segments(gradient.sizes)
        else:
            parameters = shard_segments(gradient.sizes, chunk, shard)
        gather = functools.partial(gather_nodes, within, across)
        return exchange_shards(
            comm, gradient, merged.view(-1, shard), layout.merge, parameters, request, gather
        )

    def _layout(self, averaging: Tensor, size: int, node: int) -> _NodeLayout:
        known = self._layouts.get(id(averaging))
        if known is not None and known[0]() is averaging:
            return known[1]
        if len(self._layouts) >= _LAYOUTS:
            self._layouts.clear()
        on_node = averaging.cpu().view(averaging.shape[0], -1, size) != 0  # [L, N, G]
        present = tuple(
            tuple(on_node[:, k].any(dim=1).nonzero().flatten().tolist())
            for k in range(on_node.shape[1])
        )
        columns = [objective for p in present for objective in p]
        merge = torch.zeros(averaging.shape[0], len(columns), dtype=averaging.dtype)
        merge[columns, torch.arange(len(columns))] = 1
        node_averaging = averaging[list(present[node]), node * size : (node + 1) * size]
        layout = _NodeLayout(present, node_averaging, merge.to(averaging.device))
        self._layouts[id(averaging)] = (weakref.ref(averaging), layout)
        return layout


def gather_nodes(
    within: Collectives, across: Collectives, buffer: Tensor, update: Tensor
) -> torch.futures.Future[Tensor]:
    """Step 5 of an all-reduce: every rank's combined chunk ``update`` into ``buffer``. Across
    nodes first (``c·(N−1)`` elements cross the network): the chunks ``iN … iN + N−1`` of this
    local index, block ``i`` of the bucket; then the blocks within the node, in order (the
    padding past ``buffer``'s end dropped); the future resolves to ``buffer``."""
    block = update.new_empty(across.world_size * update.numel())
    across.all_gather(block, update).wait()
    return within.gather_into(buffer, block)


#: Where launchers put the number of ranks on this node: torchrun, then DeepSpeed's launcher.
LOCAL_SIZE_VARIABLES = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE")


def check_ranks_per_node(ranks_per_node: object) -> int | None:
    """``ranks_per_node`` as the state keeps it: a positive int, or ``None`` (unknown) when not
    given and no launcher set :data:`LOCAL_SIZE_VARIABLES`."""
    if ranks_per_node is None:
        for variable in LOCAL_SIZE_VARIABLES:
            value = os.environ.get(variable)
            if value is None:
                continue
            if not value.strip().isdigit() or int(value) < 1:
                raise ValueError(
                    f"ranks_per_node defaults to the environment's {variable}, which is "
                    f"{value!r}, not a positive int; pass ranks_per_node="
                )
            return int(value)
        return None
    ranks_per_node = checked_int(ranks_per_node, "ranks_per_node", "ranks on each node, or None")
    if ranks_per_node < 1:
        raise ValueError(f"ranks_per_node must be at least 1, got {ranks_per_node}")
    return ranks_per_node
