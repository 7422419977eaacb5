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
    ranks = tuple(dist.get_process_group_ranks(group))
    timeout = group_timeout(group) or dist.default_pg_timeout
    key = (purpose, ranks, timeout)
    digest = hashlib.sha1(f"{ranks}/{timeout.total_seconds()}".encode(), usedforsecurity=False)
    name = f"bucketmoo-{purpose}-{digest.hexdigest()[:20]}"
    existing = _groups.get(key)
    if existing is not None and c10d._world.pg_names.get(existing) == name:
        return existing
    # What ``new_group(ranks, timeout, "gloo")`` does, under a name of our own and called by the
    # members only (a private helper: its signature is the one of torch 2.13).
    _, store = c10d._world.pg_map[c10d._get_default_group()]
    made, _ = c10d._new_process_group_helper(
        len(ranks),
        ranks.index(dist.get_rank()),
        list(ranks),
        dist.Backend.GLOO,
        store,
        name,
        timeout=timeout,
        group_desc=f"bucketmoo_hooks {purpose}",
    )
    c10d._world.pg_group_ranks[made] = {global_rank: i for i, global_rank in enumerate(ranks)}
    _groups[key] = made
    return made


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
