"""The single-device engine against the real thing: DDP + the hook on gloo ranks, same gradients."""

import pytest
import torch
import torch.distributed as dist
from _distributed import shared_spawn
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from bucketmoo_hooks import BucketMOOState, Diagnostics, install_bucket_moo, reference
from bucketmoo_hooks.single_device import SingleDeviceMOO, ddp_bucket_partition

LANGUAGES = ["en", "de", "en", "ja"]  # 4 ranks, 3 objectives, one group of two
CAP_MB = 0.0005  # buckets of >= 131 fp32 numbers: 3 buckets of the 472 parameters
CONFIGS = [("mgda", "bucket"), ("pcgrad", "parameter"), ("cagrad", "global"), (None, "bucket")]


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(13, 17), nn.Tanh(), nn.Linear(17, 11), nn.Tanh(), nn.Linear(11, 3)
    )


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(8, 13, generator=generator), torch.randn(8, 3, generator=generator)


def loss_of(model: nn.Module, rank: int, step: int) -> torch.Tensor:
    x, y = batch(rank, step)
    return (model(x) - y).square().mean() * (1 + rank)  # unequal scales: MOO weights differ


def ddp_trajectory(rank: int, weighting: str | None, granularity: str) -> dict:
    """Three SGD steps of DDP (+ the hook unless ``weighting`` is None): parameters per step."""
    model = make_model()
    ddp = DistributedDataParallel(model, bucket_cap_mb=CAP_MB, find_unused_parameters=True)
    state = None
    if weighting is not None:
        state = BucketMOOState(LANGUAGES, weighting, granularity=granularity)
        install_bucket_moo(ddp, state)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trajectory = []
    for step in range(3):
        loss_of(ddp, rank, step).backward()
        optimizer.step()
        optimizer.zero_grad()
        trajectory.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    numels = [traffic.numel for traffic in state.ledger.last_step] if state else []
    return {"trajectory": torch.stack(trajectory), "bucket_numels": numels}


def ddp_worker(rank: int, world: int) -> list[dict]:
    return [ddp_trajectory(rank, weighting, granularity) for weighting, granularity in CONFIGS]


DDP_RUNS = shared_spawn(4).add(ddp_worker)


@pytest.fixture(scope="module")
def ddp_results() -> list[list[dict]]:
    """Every config on 4 gloo ranks, in one task of the shared launch."""
    return DDP_RUNS.results()


def engine_trajectory(weighting: str | None, granularity: str) -> tuple[torch.Tensor, list[int]]:
    model = make_model()
    engine = SingleDeviceMOO(model.parameters(), weighting, granularity, bucket_cap_mb=CAP_MB)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trajectory = []
    for step in range(3):
        for rank, language in enumerate(LANGUAGES):
            loss_of(model, rank, step).backward()
            engine.add_gradient(language)
        engine.combine()
        optimizer.step()
        optimizer.zero_grad()
        trajectory.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    params = list(model.parameters())
    numels = [sum(params[i].numel() for i in bucket) for bucket in engine.buckets]
    return torch.stack(trajectory), numels


@pytest.mark.slow
@pytest.mark.parametrize("config", range(len(CONFIGS)), ids=[f"{w}-{g}" for w, g in CONFIGS])
def test_engine_matches_ddp_on_four_ranks(ddp_results: list[list[dict]], config: int) -> None:
    weighting, granularity = CONFIGS[config]
    trajectory, numels = engine_trajectory(weighting, granularity)
    assert len(numels) == 3
    if weighting is not None:  # the hook's buckets are the engine's partition
        assert ddp_results[0][config]["bucket_numels"] == numels
    for rank_results in ddp_results:
        torch.testing.assert_close(rank_results[config]["trajectory"], trajectory)
    if weighting is not None:  # not vacuous: MOO moves the parameters elsewhere than the mean
        average, _ = engine_trajectory(None, granularity)
        assert (average[-1] - trajectory[-1]).abs().max() > 1e-3


def test_engine_control_records_gramians_with_rank_share_weights() -> None:
    model = make_model()
    diagnostics = Diagnostics(log_every=1)
    engine = SingleDeviceMOO(
        model.parameters(), None, bucket_cap_mb=CAP_MB, diagnostics=diagnostics
    )
    for rank, language in enumerate(LANGUAGES):
        loss_of(model, rank, 0).backward()
        engine.add_gradient(language)
    engine.combine()
    buckets = [r for r in diagnostics.records if "bucket" in r]
    assert len(buckets) == len(engine.buckets)
    assert buckets[0]["objectives"] == ["en", "de", "ja"]
    assert buckets[0]["weights"] == pytest.approx([0.5, 0.25, 0.25])


def test_engine_bucket_update_is_the_reference_over_the_partition() -> None:
    model = make_model()
    params = list(model.parameters())
    engine = SingleDeviceMOO(params, "mgda", bucket_cap_mb=CAP_MB)
    rows = []
    for rank, language in enumerate(LANGUAGES):
        loss_of(model, rank, 0).backward()
        order = [i for bucket in engine.buckets for i in bucket]
        rows.append(torch.cat([params[i].grad.flatten() for i in order]))
        engine.add_gradient(language)
    engine.combine()
    sizes = [sum(params[i].numel() for i in bucket) for bucket in engine.buckets]
    expected = reference.model_update(torch.stack(rows), sizes, LANGUAGES, "mgda")
    order = [i for bucket in engine.buckets for i in bucket]
    got = torch.cat([params[i].grad.flatten() for i in order])
    torch.testing.assert_close(got, expected)


def test_partition_follows_ddp_caps() -> None:
    params = [torch.zeros(n, requires_grad=True) for n in (300, 300, 300, 300)]
    # 2 KiB cap: a bucket closes once it holds >= 512 fp32 numbers; DDP reduces the last first.
    assert ddp_bucket_partition(params, 2 / 1024) == [[2, 3], [0, 1]]
    assert ddp_bucket_partition(params) == [[0, 1, 2, 3]]  # default: 1 MiB first bucket
    assert not dist.is_initialized()  # no process group needed


def test_engine_refuses_bad_use() -> None:
    model = make_model()
    with pytest.raises(ValueError, match="granularity"):
        SingleDeviceMOO(model.parameters(), granularity="layer")
    with pytest.raises(RuntimeError, match="add_gradient"):
        SingleDeviceMOO(model.parameters()).combine()
