"""Run on every rank by ``tests/core/test_cost_model.py``: the sketch protocol's ledger on real
gloo ranks, DDP and FSDP2, with what the cost model needs to predict it (module level, so
spawned processes import it).

Each case trains the DDP tests' MLP two steps (DDP rebuilds its buckets after the first) and
returns the last step's ledger, bucket by bucket, with the bucket's parameter sizes (DDP: as
the hook saw them; FSDP2: every parameter's padded shard, as the unit lays out a row).
"""

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from _ddp_workers import batch, make_model
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from bucketmoo_hooks import BucketMOOState, bucket_moo_hook, install_bucket_moo
from bucketmoo_hooks._ddp import install_ddp


@dataclass(frozen=True)
class SketchCase:
    name: str
    engine: str  # "ddp" or "fsdp2"
    objective_of_rank: tuple[Hashable, ...]
    granularity: str = "bucket"
    sketch_size: int | None = None
    dtype: torch.dtype = torch.float32
    find_unused_parameters: bool = False  # DDP: then the hook counts presence
    hidden: tuple[int, ...] = (15, 17)


def sketch_ledger(rank: int, world_size: int, case: SketchCase) -> dict[str, Any]:
    model = make_model(case.hidden, case.dtype)
    state = BucketMOOState(
        case.objective_of_rank,
        weighting="mgda",
        granularity=case.granularity,
        protocol="sketch",
        sketch_size=case.sketch_size,
    )
    sizes: dict[int, list[int]] = {}
    if case.engine == "ddp":
        ddp = DistributedDataParallel(
            model, bucket_cap_mb=0.001, find_unused_parameters=case.find_unused_parameters
        )

        def recorded(
            state: BucketMOOState, bucket: dist.GradBucket
        ) -> torch.futures.Future[torch.Tensor]:
            sizes[bucket.index()] = [p.numel() for p in bucket.parameters()]
            return bucket_moo_hook(state, bucket)

        install_ddp(ddp, state, hook=recorded)
        trained: nn.Module = ddp
    else:
        for i in (0, 2):
            fully_shard(model[i])
        fully_shard(model)
        units = install_bucket_moo(model, state).units
        sizes = {u.index: list(u.segment_sizes) for u in units}
        trained = model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02)
    for step in range(2):
        x, target = batch(rank, step, 0, case.dtype)
        nn.functional.mse_loss(trained(x), target).backward()
        optimizer.step()
        optimizer.zero_grad()
    presence = case.engine == "fsdp2" or case.find_unused_parameters
    buckets = [
        {
            "index": t.index,
            "numel": t.numel,
            "element_size": t.element_size,
            "sent": dict(t.sent),
            "sizes": sizes[t.index],
        }
        for t in state.ledger.last_step
    ]
    state.close()
    return {
        "buckets": buckets,
        "overhead": dict(state.ledger.step_overhead),
        "presence": presence,
        "num_objectives": len(set(case.objective_of_rank)),
    }


def sketch_ledgers(rank: int, world_size: int, cases: list[SketchCase]) -> list[dict[str, Any]]:
    return [sketch_ledger(rank, world_size, case) for case in cases]
