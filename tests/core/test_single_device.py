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
SKETCH = 16  # sketch_size: fold width 13, so every problem but the short biases is sketched
# (weighting, granularity, sketch_size): sketch_size=None is the shard protocol's exact Gramians.
CONFIGS = [
    ("mgda", "bucket", None),
    ("pcgrad", "parameter", None),
    ("cagrad", "global", None),
    (None, "bucket", None),
    ("mgda", "bucket", SKETCH),
    ("pcgrad", "parameter", SKETCH),
    ("cagrad", "global", SKETCH),
]


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


def ddp_trajectory(
    rank: int, weighting: str | None, granularity: str, sketch_size: int | None
) -> dict:
    """Three SGD steps of DDP (+ the hook unless ``weighting`` is None): parameters per step."""
    model = make_model()
    ddp = DistributedDataParallel(model, bucket_cap_mb=CAP_MB, find_unused_parameters=True)
    state = None
    if weighting is not None:
        protocol = "shard" if sketch_size is None else "sketch"
        state = BucketMOOState(
            LANGUAGES,
            weighting,
            granularity=granularity,
            protocol=protocol,
            sketch_size=sketch_size,
        )
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
    return [ddp_trajectory(rank, *config) for config in CONFIGS]


class WithSpare(nn.Module):
    """make_model() plus a layer no rank's forward uses (globally unused)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = make_model()
        self.spare = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def trajectory_with_spare(rank: int | None, weighting: str | None) -> torch.Tensor:
    """Three AdamW steps (weight decay: a zero gradient would still move the spare layer) under
    DDP (``rank``) or the engine (``rank=None``): every parameter after each step."""
    model = WithSpare()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5)
    if rank is not None:
        ddp = DistributedDataParallel(model, bucket_cap_mb=CAP_MB, find_unused_parameters=True)
        if weighting is not None:
            install_bucket_moo(ddp, BucketMOOState(LANGUAGES, weighting))
    else:
        engine = SingleDeviceMOO(model.parameters(), weighting, bucket_cap_mb=CAP_MB)
    trajectory = []
    for step in range(3):
        if rank is not None:
            loss_of(ddp, rank, step).backward()
        else:
            for emulated, language in enumerate(LANGUAGES):
                loss_of(model, emulated, step).backward()
                engine.add_gradient(language)
            engine.combine()
            assert model.spare.weight.grad is None  # as DDP leaves it
        optimizer.step()
        optimizer.zero_grad()
        trajectory.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    return torch.stack(trajectory)


def spare_worker(rank: int, world: int) -> list[torch.Tensor]:
    return [trajectory_with_spare(rank, weighting) for weighting in ("mgda", None)]


DDP_RUNS = shared_spawn(4).add(ddp_worker)
SPARE_RUNS = shared_spawn(4).add(spare_worker)


@pytest.fixture(scope="module")
def ddp_results() -> list[list[dict]]:
    """Every config on 4 gloo ranks, in one task of the shared launch."""
    return DDP_RUNS.results()


def engine_trajectory(
    weighting: str | None, granularity: str, sketch_size: int | None = None
) -> tuple[torch.Tensor, list[int]]:
    model = make_model()
    engine = SingleDeviceMOO(
        model.parameters(), weighting, granularity, bucket_cap_mb=CAP_MB, sketch_size=sketch_size
    )
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
@pytest.mark.parametrize(
    "config",
    range(len(CONFIGS)),
    ids=[f"{w}-{g}" + (f"-sketch{k}" if k else "") for w, g, k in CONFIGS],
)
def test_engine_matches_ddp_on_four_ranks(ddp_results: list[list[dict]], config: int) -> None:
    weighting, granularity, sketch_size = CONFIGS[config]
    trajectory, numels = engine_trajectory(weighting, granularity, sketch_size)
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


def engine_steps(
    granularity: str, sketch_size: int | None, diagnostics: Diagnostics | None = None
) -> tuple[SingleDeviceMOO, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Two steps of the MGDA engine (no optimizer): per step, the ranks' gradients ``[R, N]``
    and the combined update ``[N]``, both in the engine's flat layout (bucket order)."""
    model = make_model()
    params = list(model.parameters())
    engine = SingleDeviceMOO(
        params,
        "mgda",
        granularity,
        bucket_cap_mb=CAP_MB,
        diagnostics=diagnostics,
        sketch_size=sketch_size,
    )
    order = [i for bucket in engine.buckets for i in bucket]
    steps = []
    for step in range(2):
        rows = []
        for rank, language in enumerate(LANGUAGES):
            loss_of(model, rank, step).backward()
            rows.append(torch.cat([params[i].grad.flatten() for i in order]))
            engine.add_gradient(language)
        engine.combine()
        steps.append((torch.stack(rows), torch.cat([params[i].grad.flatten() for i in order])))
    return engine, steps


def sketched_reference(
    engine: SingleDeviceMOO, grads: torch.Tensor, granularity: str, step: int
) -> torch.Tensor:
    """The sketch protocol's update by the reference, problem by problem, with the hook's seeds:
    (step, DDP bucket index, 0 or the parameter's position in its bucket)."""
    params = engine.parameters
    sizes = [[params[i].numel() for i in bucket] for bucket in engine.buckets]
    buckets = torch.split(grads, [sum(s) for s in sizes], dim=1)
    if granularity == "bucket":
        flat = [n for s in sizes for n in s]
        lengths = [sum(s) for s in sizes]
        return reference.model_update(
            grads, lengths, LANGUAGES, step=step, parameter_sizes=flat, sketch_size=SKETCH
        )
    if granularity == "parameter":
        return torch.cat(
            [
                reference.bucket_update(
                    piece, LANGUAGES, step=step, bucket=b, segment=s, sketch_size=SKETCH
                )
                for b, chunk in enumerate(buckets)
                for s, piece in enumerate(torch.split(chunk, sizes[b], dim=1))
            ]
        )
    objective_grads, _ = reference.objective_gradients(grads, LANGUAGES)
    chunks = torch.split(objective_grads, [sum(s) for s in sizes], dim=1)
    gramian = sum(
        reference.sketch_gramian(chunk, SKETCH, step=step, bucket=b)
        for b, chunk in enumerate(chunks)
    )
    return reference.combine(objective_grads, gramian=gramian).update


@pytest.mark.parametrize("granularity", ["bucket", "parameter", "global"])
def test_engine_sketch_is_the_reference_with_the_hooks_seeds(granularity: str) -> None:
    diagnostics = Diagnostics(log_every=1)
    engine, steps = engine_steps(granularity, SKETCH, diagnostics)
    _, exact = engine_steps(granularity, None)
    for step, ((grads, update), (_, exact_update)) in enumerate(zip(steps, exact, strict=True)):
        torch.testing.assert_close(update, sketched_reference(engine, grads, granularity, step))
        # Not vacuous: a 16-number sketch of problems of up to 221 elements moves the weights.
        assert (update - exact_update).abs().max() > 1e-3 * exact_update.abs().max()
    records = [r for r in diagnostics.records if "bucket" in r]
    assert records and any(r["sketched"] for r in records)
    # Sketched exactly where the problem (for "global": some bucket) has over 16 elements.
    sizes = [[engine.parameters[i].numel() for i in bucket] for bucket in engine.buckets]
    for record in records:
        b, s = record["bucket"], record["parameter"]
        if b < 0:
            longest = max(sum(bucket) for bucket in sizes)
        else:
            longest = sum(sizes[b]) if s is None else sizes[b][s]
        assert record["sketched"] is (longest > SKETCH)
        assert record["sketch_size"] == (SKETCH if longest > SKETCH else None)
    if granularity == "parameter":  # the 11- and 3-element biases are kept whole
        assert sum(not r["sketched"] for r in records) == 2 * 2


@pytest.mark.parametrize("granularity", ["bucket", "parameter", "global"])
def test_engine_sketch_of_every_problem_whole_is_exact(granularity: str) -> None:
    diagnostics = Diagnostics(log_every=1)
    _, steps = engine_steps(granularity, 512, diagnostics)  # 472 elements in all
    _, exact = engine_steps(granularity, None)
    for (_, update), (_, exact_update) in zip(steps, exact, strict=True):
        torch.testing.assert_close(update, exact_update)
    records = [r for r in diagnostics.records if "bucket" in r]
    assert records and not any(r["sketched"] or r["sketch_size"] for r in records)


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
    for bad, error in [
        (8, ValueError),
        (1 << 21, ValueError),
        (64.0, TypeError),
        (True, TypeError),
    ]:
        with pytest.raises(error, match="sketch_size"):
            SingleDeviceMOO(model.parameters(), sketch_size=bad)


@pytest.mark.slow
def test_engine_leaves_a_globally_unused_parameter_alone_as_ddp_does() -> None:
    results = SPARE_RUNS.results()
    for index, weighting in enumerate(("mgda", None)):
        trajectory = trajectory_with_spare(None, weighting)
        for rank_results in results:
            torch.testing.assert_close(rank_results[index], trajectory)
        spare = WithSpare().spare
        initial = torch.cat([spare.weight.detach().flatten(), spare.bias.detach()])
        torch.testing.assert_close(trajectory[-1, -initial.numel() :], initial)
