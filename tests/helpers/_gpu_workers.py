"""Rank functions of the GPU tests that need several ranks or a profiler.

NCCL refuses two ranks on one GPU, but gloo implements all-to-all, all-gather and all-reduce
on CUDA tensors, so several gloo processes can share one GPU: the hook then takes its CUDA path
(side stream, device solve, fused kernels) with ``R > 1`` and real data in every row, which a
one-rank NCCL group cannot give (its all-gather writes back what it read). The same run on the
CPU is the reference. The synchronisation count runs on a one-rank NCCL group instead: gloo's
CUDA collectives synchronise by design.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
from _ddp_workers import batch, make_model
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from bucketmoo_hooks import BucketMOOState, Diagnostics, install_bucket_moo
from bucketmoo_hooks._collectives import Collectives

#: ``pytestmark`` of the GPU test modules.
GPU_ONLY = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@dataclasses.dataclass(frozen=True)
class Scenario:
    """One DDP training run; ``ids`` per rank (uneven groups when some id repeats)."""

    weighting: str = "mgda"
    granularity: str = "bucket"
    protocol: str = "shard"
    ids: tuple[str, ...] = ("en", "de", "en")
    hidden: tuple[int, ...] = (31, 17)  # odd parameter sizes: buckets padded to a multiple of R
    steps: int = 3

    @property
    def name(self) -> str:
        return f"{self.weighting}-{self.granularity}-{self.protocol}-R{len(self.ids)}"


def scenarios(weighting_names: list[str]) -> list[Scenario]:
    """Every weighting per bucket; MGDA per parameter and globally; the sketch protocol."""
    return [
        *(Scenario(weighting=name) for name in weighting_names),
        Scenario(granularity="parameter"),
        Scenario(granularity="parameter", weighting="nash_mtl"),
        Scenario(granularity="global"),
        Scenario(protocol="sketch"),
    ]


def train_ddp(
    rank: int, scenario: Scenario, device: str, hook: Callable[[], None] | None = None
) -> list[Tensor]:
    """The gradients (flattened, on the host) after every step's backward; ``hook`` runs right
    after each backward, before the gradients are read."""
    model = make_model(scenario.hidden, torch.float32).to(device)
    ddp = DistributedDataParallel(model, bucket_cap_mb=0.001)
    options: dict[str, Any] = {}
    if scenario.protocol == "sketch":
        options = {"protocol": "sketch", "sketch_size": 64}
    state = BucketMOOState(
        list(scenario.ids),
        weighting=scenario.weighting,
        granularity=scenario.granularity,
        **options,
    )
    install_bucket_moo(ddp, state)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    grads = []
    for step in range(scenario.steps):
        x, target = batch(rank, step, 0, torch.float32)
        nn.functional.mse_loss(ddp(x.to(device)), target.to(device)).backward()
        if hook is not None:
            hook()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]).cpu())
        optimizer.step()
        optimizer.zero_grad()
    return grads


def cuda_and_cpu(
    rank: int, world_size: int, runs: list[Scenario], devices: tuple[str, ...] = ("cuda", "cpu")
) -> dict[str, Any]:
    """Every scenario on the GPU and on the CPU, in the same processes (one gloo group)."""
    return {s.name: {device: train_ddp(rank, s, device) for device in devices} for s in runs}


def fsdp2_cuda_and_cpu(
    rank: int, world_size: int, devices: tuple[str, ...] = ("cuda", "cpu")
) -> dict[str, list[Tensor]]:
    """FSDP2 under MGDA over the gloo group, on the GPU and on the CPU: the local gradient
    shards of every step."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    result = {}
    for device in devices:
        model = make_model((31, 17), torch.float32).to(device)
        mesh = DeviceMesh.from_group(dist.group.WORLD, device)
        for i in (0, 2):
            fully_shard(model[i], mesh=mesh)
        fully_shard(model, mesh=mesh)
        install_bucket_moo(model, BucketMOOState(["en", "de", "en"][:world_size]))
        grads = []
        for step in range(3):
            x, target = batch(rank, step, 0, torch.float32)
            nn.functional.mse_loss(model(x.to(device)), target.to(device)).backward()
            local = [p.grad.to_local() for p in model.parameters()]
            grads.append(torch.cat([g.flatten() for g in local]).cpu())
            model.zero_grad()
        result[device] = grads
    return result


def race_detector(rank: int, world_size: int, cycles: int, runs: list[Scenario]) -> dict:
    """Each scenario plain, then with delays that expose missing stream ordering: a sleep on
    the hook's side stream before every all-gather (the gather's inputs must wait for it), and
    after backward a sleep on the default stream followed by blocks of the gradients' size
    allocated and filled with NaN (memory the hook freed too early would be reused by them).
    The gradients must be equal bit for bit."""
    gather = Collectives.all_gather

    def slow_gather(self: Collectives, output: Tensor, input: Tensor) -> dist.Work:
        torch.cuda._sleep(cycles)
        return gather(self, output, input)

    def after_backward() -> None:
        torch.cuda._sleep(cycles)
        for _ in range(4):
            torch.empty(2**16, device="cuda").fill_(float("nan"))

    result = {}
    for scenario in runs:
        plain = train_ddp(rank, scenario, "cuda")
        Collectives.all_gather = slow_gather  # type: ignore[method-assign]
        try:
            delayed = train_ddp(rank, scenario, "cuda", after_backward)
        finally:
            Collectives.all_gather = gather  # type: ignore[method-assign]
        result[scenario.name] = (plain, delayed)
    return result


# CUDA runtime calls that block the host until the device catches up (the profiler sees them
# inside cuSOLVER, MAGMA, CuPy and NCCL too, which sync-debug mode does not).
BLOCKING = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
ORDERING = ("cudaEventRecord", "cudaStreamWaitEvent")


def sync_count(
    rank: int, world_size: int, cases: list[dict[str, Any] | None]
) -> list[dict[str, int]]:
    """Per case (``BucketMOOState`` options, plus ``diagnostics``; ``None``: DDP's own
    all-reduce, the baseline of what the profiler itself adds): the blocking CUDA runtime calls
    in the backward passes of 2 steps after 2 warm-up steps on a one-rank NCCL group, the event
    records and waits, and the buckets reduced."""
    from torch.profiler import ProfilerActivity, profile

    counts = []
    for case in cases:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 257), nn.GELU(), nn.Linear(257, 31)).cuda()
        ddp = DistributedDataParallel(model, bucket_cap_mb=0.05)
        state = None
        if case is not None:
            options = dict(case)
            if options.pop("diagnostics", False):
                options["diagnostics"] = Diagnostics(log_every=1)
            state = BucketMOOState(**options)
            install_bucket_moo(ddp, state)
        found = dict.fromkeys(BLOCKING + ORDERING, 0)
        for step in range(4):
            loss = ddp(torch.randn(16, 64, device="cuda")).square().mean()
            if step < 2:
                loss.backward()
                continue
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                loss.backward()
            for event in prof.events():
                if event.name in found:
                    found[event.name] += 1
            ddp.zero_grad()
        found["buckets"] = 0 if state is None else 2 * len(state.ledger.last_step)
        counts.append(found)
    return counts
