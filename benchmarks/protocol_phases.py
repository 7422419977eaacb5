"""Where a bucket's time goes: each phase of the shard-Gramian protocol next to an all-reduce.

One bucket (``--numel`` fp32 elements, default 25 MiB), every rank its own objective, timed
in isolation (no backward competing for the cores), median of ``--repeats``::

    torchrun --nproc-per-node 2 benchmarks/protocol_phases.py

Rank 0 prints one line per phase in milliseconds: the all-reduce the hook replaces, then the
hook's phases (all-to-all, partial Gramian, Gramian all-reduce, MGDA solve, combination,
all-gather) and the whole protocol end to end, then what checking for absent objectives adds
(the presence counts of the bucket's ``--parameters`` equal parameters, and the protocol end to
end with them: what the raw hook and DDP with ``find_unused_parameters`` pay). On CPU the
phases are host work, so their sum against the all-reduce is the hook's extra CPU time per
bucket: what a machine with no idle core pays in step time (``benchmarks/comm_overhead.py``).
"""

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from bucketmoo_hooks._absent import ParameterLayout, presence_counts
from bucketmoo_hooks._hook import _gather_into
from bucketmoo_hooks._ledger import BucketTraffic
from bucketmoo_hooks._protocol import (
    BucketComm,
    Workspace,
    combine_segments,
    objective_shards,
    partial_gramians,
    scatter_shards,
    shard_segments,
    solve_shards,
)
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
    comm = BucketComm(dist.group.WORLD, BucketTraffic(0, bucket.numel(), bucket.element_size()))
    workspace = Workspace()
    averaging = torch.eye(world_size)  # every rank its own objective
    weighting = MGDA()
    context = WeightingContext(0, 0, tuple(range(world_size)))

    shards = scatter_shards(comm, bucket, workspace)
    objectives = objective_shards(shards, averaging)
    whole = [(0, objectives.shape[1])]
    gramians = partial_gramians(objectives, whole)
    weights = weighting(gramians[0], context)[None]
    update = combine_segments(weights, objectives, whole, bucket.dtype)

    sizes = [len(part) for part in torch.arange(args.numel).tensor_split(args.parameters)]
    layout = ParameterLayout.of(shard_segments(sizes, dist.get_rank(), shards.shape[1]), "bucket")

    def protocol(checked: ParameterLayout | None = None) -> None:
        received = scatter_shards(comm, bucket, workspace)
        result = solve_shards(comm, received, averaging, weighting, [context], layout=checked)
        _gather_into(bucket, comm, result.update).wait()

    phases = {
        "all-reduce (DDP allreduce_hook)": lambda: dist.all_reduce(bucket),
        "1 all-to-all": lambda: scatter_shards(comm, bucket, workspace),
        "2 partial Gramian": lambda: partial_gramians(objectives, whole),
        "3 Gramian all-reduce": lambda: dist.all_reduce(gramians.clone()),
        "4 MGDA solve": lambda: weighting(gramians[0], context),
        "5 combination": lambda: combine_segments(weights, objectives, whole, bucket.dtype),
        "6 all-gather": lambda: _gather_into(bucket, comm, update).wait(),
        "protocol end to end": protocol,
        "presence counts": lambda: presence_counts(shards, averaging, layout.segments),
        "protocol, presence checked": lambda: protocol(layout),
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
