"""The gloo groups the hook keeps beside the user's process group, and the overlap threads.

One group per (purpose, the user's group's global ranks in its rank order, its timeout) in the
process, shared by every state over those ranks, named from those alone: every rank derives the
same name whatever groups it created before. ``new_group`` cannot be used for them: it names a
group from a per-process count, of its calls (``_world.group_count``) or, with
``use_local_synchronization=True``, of the groups this process is a member of (the length of
``_world.pg_names``, hashed with the ranks). Members of a subgroup count it and other ranks do
not, so after any subgroup that leaves some rank out, the ranks derive different names and each
waits for the others under its own store prefix until the timeout.

Creating a group is a rendezvous of its ranks: ``install_bucket_moo`` creates them, on every
rank of the group alike, before the first backward.
"""

import datetime
import hashlib
import weakref

import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

from ._worker import BucketWorker

HOST = "host"  # the per-step objective exchange, for a group without a CPU backend
OVERLAP = "overlap"  # the overlap worker's copy of the group, for CPU buckets
# The sketch protocol's small collective of CPU buckets on the overlap worker: on a gloo group of
# its own it does not queue behind the all-reduces of earlier buckets (gloo runs one group's
# collectives in order). Used by the worker thread only, like OVERLAP.
SKETCH = "sketch"

_groups: dict[tuple[str, tuple[int, ...], datetime.timedelta], dist.ProcessGroup] = {}
# One thread per copy: collectives issued on one gloo group from two threads could pair up in a
# different order on each rank. Held by the states only, so it stops once none needs it.
_workers: "weakref.WeakValueDictionary[dist.ProcessGroup, BucketWorker]" = (
    weakref.WeakValueDictionary()
)


def helper_group(group: dist.ProcessGroup, purpose: str) -> dist.ProcessGroup:
    """The gloo group for ``purpose`` over ``group``'s ranks, in ``group``'s rank order (so this
    rank's rank is the same in both), with ``group``'s timeout.

    Created at the first call for these ranks in the process, which every rank of ``group`` must
    make alike; later calls return it until the default group is destroyed.
    """
    return _made(purpose, tuple(ranks_of(group)), _timeout(group), dist.Backend.GLOO)


def node_groups(
    group: dist.ProcessGroup, ranks_per_node: int
) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """The hierarchical protocol's two levels over ``group`` (its ranks node by node,
    ``ranks_per_node`` each): this rank's node (group ranks ``kG … kG+G−1``) and its rank's
    peers with the same local index on every node (``i, G+i, 2G+i, …``), on ``group``'s
    backend, with its timeout.

    Each rank makes the two groups it belongs to, named from their ranks alone (as
    :func:`helper_group`'s): no rank has to take part in the groups of others. The copies over
    the overlap worker's group are groups of their own (used by its thread only).
    """
    ranks, size = ranks_of(group), ranks_per_node
    index = group.rank()
    node, local = divmod(index, size)
    copy = "overlap-" if is_helper(group, OVERLAP) else ""
    timeout, backend = _timeout(group), dist.get_backend(group)
    within = tuple(ranks[node * size : (node + 1) * size])
    across = tuple(ranks[local::size])
    return (
        _made(f"{copy}node{size}", within, timeout, backend),
        _made(f"{copy}across{size}", across, timeout, backend),
    )


def node_layout_error(ranks_per_node: int | None, ranks: list[int]) -> str | None:
    """Why the hierarchical protocol cannot run over a group of global ``ranks`` (in its rank
    order) with ``ranks_per_node``, or ``None``: it needs whole blocks of ``G`` consecutive
    group ranks, each on one node (global ranks ``g`` with the same ``g // G``)."""
    if ranks_per_node is None:
        return (
            "protocol='hierarchical' needs ranks_per_node (the ranks on each node; torchrun's "
            "LOCAL_WORLD_SIZE or the DeepSpeed launcher's LOCAL_SIZE is its default, and "
            "neither is set)"
        )
    if len(ranks) % ranks_per_node:
        return (
            f"ranks_per_node={ranks_per_node} does not divide the process group's "
            f"{len(ranks)} ranks; protocol='hierarchical' needs whole nodes"
        )
    for start in range(0, len(ranks), ranks_per_node):
        block = ranks[start : start + ranks_per_node]
        if len({r // ranks_per_node for r in block}) != 1:
            return (
                f"ranks {start}…{start + ranks_per_node - 1} of the process group (global ranks "
                f"{block}) are not on one node of {ranks_per_node} consecutive global ranks; "
                "protocol='hierarchical' needs the group's ranks node by node"
            )
    return None


def _timeout(group: dist.ProcessGroup) -> datetime.timedelta:
    return group_timeout(group) or dist.default_pg_timeout


def _made(
    purpose: str, ranks: tuple[int, ...], timeout: datetime.timedelta, backend: str
) -> dist.ProcessGroup:
    """The group of ``ranks`` for ``purpose``, created by its members at the first call."""
    key = (purpose, ranks, timeout)
    digest = hashlib.sha1(f"{ranks}/{timeout.total_seconds()}".encode(), usedforsecurity=False)
    name = f"bucketmoo-{purpose}-{digest.hexdigest()[:20]}"
    existing = _groups.get(key)
    if existing is not None and c10d._world.pg_names.get(existing) == name:
        return existing
    # What ``new_group(ranks, timeout, backend)`` does, under a name of our own and called by the
    # members only (a private helper: its signature is the one of torch 2.13).
    _, store = c10d._world.pg_map[c10d._get_default_group()]
    made, _ = c10d._new_process_group_helper(
        len(ranks),
        ranks.index(dist.get_rank()),
        list(ranks),
        backend,
        store,
        name,
        timeout=timeout,
        group_desc=f"bucketmoo_hooks {purpose}",
    )
    c10d._world.pg_group_ranks[made] = {global_rank: i for i, global_rank in enumerate(ranks)}
    _groups[key] = made
    return made


def ranks_of(group: dist.ProcessGroup) -> list[int]:
    return dist.get_process_group_ranks(group)


def is_helper(group: dist.ProcessGroup, purpose: str) -> bool:
    """Whether ``group`` is the :func:`helper_group` for ``purpose`` of some ranks."""
    return any(made is group for (p, _, _), made in _groups.items() if p == purpose)


def shared_worker(copy: dist.ProcessGroup) -> BucketWorker:
    """The running overlap thread over ``copy`` (a :func:`helper_group`), started if none is."""
    worker = _workers.get(copy)
    if worker is None or worker.closed:
        worker = _workers[copy] = BucketWorker(copy)
    return worker


def group_timeout(group: dist.ProcessGroup) -> datetime.timedelta | None:
    """The collective timeout of ``group``, for the groups made beside it (a stalled peer must
    fail them as soon as it fails the user's group; ``new_group`` defaults to 30 minutes).
    ``None`` when no backend of the group reports one."""
    for device in group._device_types:
        options = getattr(group._get_backend(device), "options", None)
        timeout = getattr(options, "_timeout", None)
        if timeout is not None:
            return timeout
    return None
