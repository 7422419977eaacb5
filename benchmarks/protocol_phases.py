"""Where a bucket's time goes: each phase of the shard-Gramian protocol next to an all-reduce.

One bucket (``--numel`` fp32 elements, default 25 MiB), every rank its own objective, timed
in isolation (no backward competing for the cores), median of ``--repeats``::

    torchrun --nproc-per-node 2 benchmarks/protocol_phases.py

Rank 0 prints one line per phase in milliseconds: the all-reduce the hook replaces, then the
hook's phases, numbered as the steps of docs/design.md §3 (all-to-all, averages and partial
Gramian, Gramian all-reduce, MGDA solve, combination, all-gather), and the whole bucket end to
end through the hook's core, then what checking for absent objectives adds (the presence counts
of the bucket's ``--parameters`` equal parameters, and the bucket end to end with them: what the
raw hook and DDP with ``find_unused_parameters`` pay). On CPU the
phases are host work, so their sum against the all-reduce is the hook's extra CPU time per
bucket: what a machine with no idle core pays in step time (``benchmarks/comm_overhead.py``).
"""

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from bucketmoo_hooks import BucketMOOState, ObjectiveMap, _core
from bucketmoo_hooks._absent import presence_counts
from bucketmoo_hooks._collectives import Collectives
from bucketmoo_hooks._ledger import BucketTraffic
from bucketmoo_hooks._linalg import combine_segments, objective_shards, partial_gramians
from bucketmoo_hooks._protocol import Bucket, Gradient
from bucketmoo_hooks._runtime import Workspace
from bucketmoo_hooks._shard import scatter_shards, shard_segments
from bucketmoo_hooks.weightings import MGDA, WeightingContext


def timed(action: Callable[[], object], repeats: int) -> float:
    """Median milliseconds of ``action`` over ``repeats`` runs, all ranks starting together."""
    samples = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        action()
        samples.append(time.perf_counter() - start)
    return 1e3 * statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=25 * 2**20 // 4)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--parameters", type=int, default=16, help="parameters in the bucket")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    world_size = dist.get_world_size()
    bucket = torch.randn(args.numel, generator=torch.Generator().manual_seed(dist.get_rank()))
    comm = Collectives(dist.group.WORLD, BucketTraffic(0, bucket.numel(), bucket.element_size()))
    workspace = Workspace()
    objective_map = ObjectiveMap.from_ids(list(range(world_size)))  # every rank its own objective
    averaging = objective_map.averaging_matrix(bucket.device)
    weighting = MGDA()
    context = WeightingContext(0, 0, tuple(range(world_size)))

    shards = scatter_shards(comm, bucket, workspace)
    objectives = objective_shards(shards, averaging)
    whole = [(0, objectives.shape[1])]
    gramians = partial_gramians(objectives, whole)
    weights = weighting(gramians[0], context)[None]
    update = combine_segments(weights, objectives, whole, bucket.dtype)

    sizes = [len(part) for part in torch.arange(args.numel).tensor_split(args.parameters)]
    parameters = shard_segments(sizes, dist.get_rank(), shards.shape[1])
    bucket_0 = Bucket(0, "bucket 0", None, [None] * len(sizes))
    # The hook's core on the bucket, as DDP's buckets go through it: ``"zero"`` counts no
    # presence (DDP without find_unused_parameters), ``"exclude"`` does.
    states = {
        absent: BucketMOOState(weighting=weighting, absent=absent) for absent in ("zero", "exclude")
    }

    def end_to_end(absent: str) -> None:
        gradient = Gradient(bucket, None, sizes)
        state = states[absent]
        _core.reduce(state, comm, bucket_0, gradient, objective_map, averaging).wait()

    phases = {
        "all-reduce (DDP allreduce_hook)": lambda: dist.all_reduce(bucket),
        "1 all-to-all": lambda: scatter_shards(comm, bucket, workspace),
        "2-3 averages, partial Gramian": lambda: partial_gramians(
            objective_shards(shards, averaging), whole
        ),
        "4 Gramian all-reduce": lambda: dist.all_reduce(gramians.clone()),
        "5 MGDA solve": lambda: weighting(gramians[0], context),
        "6 combination": lambda: combine_segments(weights, objectives, whole, bucket.dtype),
        "7 all-gather": lambda: comm.gather_into(bucket, update).wait(),
        "bucket end to end": lambda: end_to_end("zero"),
        "presence counts": lambda: presence_counts(shards, averaging, parameters),
        "bucket end to end, presence checked": lambda: end_to_end("exclude"),
    }
    times = {name: timed(action, args.repeats) for name, action in phases.items()}
    if dist.get_rank() == 0:
        size_mib = bucket.numel() * bucket.element_size() / 2**20
        print(
            f"R = {world_size}, one {size_mib:g} MiB fp32 bucket of {args.parameters} parameters, "
            f"median of {args.repeats}:"
        )
        baseline = times["all-reduce (DDP allreduce_hook)"]
        for name, milliseconds in times.items():
            print(f"  {name:<32} {milliseconds:8.2f} ms  {milliseconds / baseline:5.2f} ×")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
