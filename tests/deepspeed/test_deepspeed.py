"""DeepSpeed ZeRO-1/2/3 on gloo processes (DeepSpeed's CPU accelerator): the reduction equals
plain DeepSpeed with ``mean`` and the single-process reference with the MOO weightings, for every
stage, dtype, ``reduce_scatter`` and ``overlap_comm``; gradient accumulation; language-specific
heads; the refusals; the HF Trainer with a DeepSpeed config."""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _deepspeed_workers import config, refusals, trainer_with_deepspeed, zero_cases
from _distributed import run_distributed, shared_spawn

from bucketmoo_hooks import reference
from bucketmoo_hooks._collectives import (
    all_gather_bytes,
    all_reduce_bytes,
    all_to_all_bytes,
    reduce_scatter_bytes,
)

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow  # launches of processes

OBJECTIVES = ["eng", "eng", "rus"]  # uneven groups; 3 ranks partition nothing evenly
WEIGHTINGS = ["mean", "mgda", "upgrad"]
STAGES, DTYPES = (1, 2, 3), ("fp32", "bf16")
ROOT = Path(__file__).resolve().parents[2]

# Per stage, every pair of dtype, reduce_scatter and overlap_comm values (each pair of factors
# meets in all four combinations); the weighting cycles; buckets of 40 elements split the model
# and leave parameters larger than one.
PAIRS = [("fp32", True, True), ("fp32", False, False), ("bf16", True, False), ("bf16", False, True)]
MATRIX = [
    {
        "config": config(stage, dtype=dtype, reduce_scatter=rs, overlap_comm=overlap),
        "state": {
            "objective_of_rank": OBJECTIVES,
            "weighting": WEIGHTINGS[i % 3],
            "granularity": "parameter",
        },
    }
    for i, (stage, (dtype, rs, overlap)) in enumerate(itertools.product(STAGES, PAIRS))
]
# Plain DeepSpeed (its default reduce_scatter: true) per stage and dtype, and one bucket over
# the whole model (granularity "bucket": one problem, the model's Gramian).
PLAIN = [
    {"config": config(s, dtype=d), "state": None} for s, d in itertools.product(STAGES, DTYPES)
]
WHOLE = [
    {
        "config": config(stage, bucket=10**6),
        "state": {"objective_of_rank": OBJECTIVES, "weighting": "mgda"},
    }
    for stage in STAGES
]
# The sketched protocol: every parameter is a problem of at most k elements, so exact; the
# engine's own all-reduce (ZeRO-1/2) or reduce-scatter (ZeRO-3) carries the scaled gradients.
SKETCH = [
    {
        "config": config(stage, dtype=dtype),
        "state": {
            "objective_of_rank": OBJECTIVES,
            "weighting": "upgrad",
            "granularity": "parameter",
            "protocol": "sketch",
            "sketch_size": 64,
        },
    }
    for stage, dtype in itertools.product(STAGES, DTYPES)
]
MAIN = shared_spawn(3).add(zero_cases, MATRIX + PLAIN + WHOLE + SKETCH, timeout=400)

# The hierarchical protocol on 4 ranks as 2 simulated nodes of 2: languages aligned with the
# nodes, and every language on every node.
HIERARCHICAL = [
    {
        "config": config(stage, dtype=dtype),
        "state": {
            "objective_of_rank": objectives,
            "weighting": "mgda",
            "granularity": "parameter",
            "protocol": "hierarchical",
            "ranks_per_node": 2,
        },
    }
    for stage, dtype, objectives in (
        (1, "fp32", ["eng", "eng", "rus", "rus"]),
        (2, "bf16", ["eng", "rus", "eng", "rus"]),
        (3, "fp32", ["eng", "rus", "eng", "rus"]),
    )
]
NODES = shared_spawn(4).add(zero_cases, HIERARCHICAL, timeout=200)

# Two ranks: gradient accumulation (ZeRO-1 combines once per step, ZeRO-2/3 per micro-batch),
# language-specific heads (objectives absent from the other languages' heads), refusals.
ACCUMULATION = [
    {
        "config": config(stage, accumulation=2),
        "state": {"weighting": "mgda", "granularity": "parameter"},
    }
    for stage in STAGES
]
HEADS = [
    {
        "config": config(stage),
        "state": {"weighting": "upgrad", "granularity": "parameter"},
        "heads": 2,
    }
    for stage in (2, 3)
]
# Even groups: the hook's ``mean`` is DeepSpeed's average. The ZeRO-1/2 cases use
# LLaMA-Factory's ZeRO-2 options (overlap_comm, round_robin_gradients; DeepSpeed's own
# safe_get_full_grad fails with round robin on 3 ranks, so it is checked here).
MEAN = [
    {
        "config": config(
            stage,
            dtype=dtype,
            **({"overlap_comm": True, "round_robin_gradients": True} if stage < 3 else {}),
        ),
        "state": state,
        "read_grads": stage == 3,
    }
    for stage, dtype in itertools.product(STAGES, DTYPES)
    for state in (None, {"weighting": "mean"})
]
# Optimizer offload to the host (ZeRO-Offload) with the torch optimizer: the same reduction.
OFFLOAD = [
    {
        "config": config(stage, offload_optimizer={"device": "cpu"})
        | {"zero_force_ds_cpu_optimizer": False},
        "state": {"weighting": "mgda", "granularity": "parameter"},
    }
    for stage in STAGES
]
# ``gradient_allreduce_op: "sum"`` (ZeRO-1/2; DeepSpeed refuses it with ZeRO-3): R times.
SUM = [
    {
        "config": config(stage) | {"gradient_allreduce_op": "sum"},
        "state": {"weighting": "mgda", "granularity": "parameter"},
        "scale": 2,
    }
    for stage in (1, 2)
]
# bf16 training with fp32 communication: the bucket is cast, exchanged in fp32, cast back.
COMM_FP32 = [
    {
        "config": config(stage, dtype="bf16") | {"communication_data_type": "fp32"},
        "state": {"weighting": "mgda", "granularity": "parameter"},
    }
    for stage in STAGES
]
SECOND = shared_spawn(2).add(
    zero_cases, ACCUMULATION + HEADS + MEAN + OFFLOAD + SUM + COMM_FP32, timeout=300
)
REFUSED = [
    (config(0), {}),
    (config(2), {"granularity": "global"}),
    (config(2, contiguous_gradients=False), {}),
    (config(3), {"twice": True}),
    (config(1), {"objective_of_rank": ["eng", "rus", "deu"]}),
    # bf16 with fp32 accumulation on ZeRO-1: DeepSpeed builds its BF16_Optimizer instead.
    (config(1, dtype="bf16") | {"data_types": {"grad_accum_dtype": "fp32"}}, {}),
]
REFUSALS = shared_spawn(2).add(refusals, REFUSED, timeout=120)


def _tolerance(case: dict) -> dict[str, float]:
    if case["config"].get("bf16", {}).get("enabled"):
        return {"atol": 2e-3, "rtol": 2e-2}
    return {"atol": 1e-6, "rtol": 1e-5}


def _expected(case: dict, own: torch.Tensor, sizes: list[int], step: int) -> torch.Tensor:
    """What the hook must reduce from every rank's own gradient ``own`` ``[R, N]``."""
    state = case["state"]
    pieces = sizes if state.get("granularity") == "parameter" else [sum(sizes)]
    return reference.model_update(
        own,
        pieces,
        state.get("objective_of_rank"),
        state["weighting"],
        step=step,
        parameter_sizes=sizes,
    )


def _check_case(case: dict, per_rank: list[dict]) -> None:
    first = per_rank[0]
    for result in per_rank[1:]:  # replicas: bitwise identical
        assert torch.equal(result["params"], first["params"])
        assert torch.equal(result["reduced"], first["reduced"])
    own = torch.stack([r["own"] for r in per_rank])  # [R, steps, micro-batches, N]
    for step in range(own.shape[1]):
        expected = _expected(case, own[:, step].mean(1), first["sizes"], step)
        expected = expected * case.get("scale", 1)
        torch.testing.assert_close(first["reduced"][step], expected, **_tolerance(case))


@pytest.mark.parametrize("index", range(len(MATRIX)))
def test_zero_matrix_equals_the_reference(index: int) -> None:
    case, per_rank = MATRIX[index], [r[index] for r in MAIN.results()]
    _check_case(case, per_rank)
    first = per_rank[0]
    stage = case["config"]["zero_optimization"]["stage"]
    assert (first["engine"], first["stage"], first["iter"]) == ("deepspeed", stage, 2)
    # The path bucket-MOO serves: the all-reduce for ZeRO-1/2, the reduce-scatter for ZeRO-3.
    assert first["reduce_scatter"] == (stage == 3)
    assert first["buckets"] > 2  # 40-element buckets split the model


@pytest.mark.parametrize("index", range(len(PLAIN)))
def test_plain_deepspeed_reduces_the_average(index: int) -> None:
    """The baseline the hook's ``mean`` cases are held to: plain DeepSpeed's reduction."""
    case = PLAIN[index]
    results = [r[len(MATRIX) + index] for r in MAIN.results()]
    own = torch.stack([r["own"] for r in results])
    for step in range(own.shape[1]):
        torch.testing.assert_close(
            results[0]["reduced"][step], own[:, step].mean(1).mean(0), **_tolerance(case)
        )


@pytest.mark.parametrize("index", range(len(WHOLE)))
def test_one_bucket_is_one_problem_over_the_model(index: int) -> None:
    position = len(MATRIX) + len(PLAIN) + index
    per_rank = [r[position] for r in MAIN.results()]
    _check_case(WHOLE[index], per_rank)
    first = per_rank[0]
    assert first["buckets"] == 1
    stage = WHOLE[index]["config"]["zero_optimization"]["stage"]
    sizes, world_size = first["sizes"], 3
    # Besides the gradient: the L×L Gramian with the P×L presence counts (fp32, one
    # all-reduce), and the step's objective exchange (3 int64 per rank).
    statistics = all_reduce_bytes(4 * (2 * 2 + len(sizes) * 2), world_size)
    exchange = all_gather_bytes(8 * 3 * world_size, world_size)
    if stage == 3:  # a reduce-scatter of the [R, c] rows, each parameter padded to R chunks
        rows = world_size * sum(-(-s // world_size) for s in sizes) * 4
        gradient = reduce_scatter_bytes(rows, world_size)
    else:  # all-to-all and all-gather of the bucket padded to R slices: an all-reduce's bytes
        padded = -(-sum(sizes) // world_size) * world_size * 4
        gradient = all_to_all_bytes(padded, world_size) + all_gather_bytes(padded, world_size)
    assert first["sent"] == gradient + statistics + exchange


@pytest.mark.parametrize("index", range(len(SKETCH)))
def test_sketch_protocol_serves_every_stage(index: int) -> None:
    position = len(MATRIX) + len(PLAIN) + len(WHOLE) + index
    per_rank = [r[position] for r in MAIN.results()]
    _check_case(SKETCH[index], per_rank)
    first = per_rank[0]
    assert first["iter"] == 2 and first["buckets"] > 2
    # The gradient travels once, through the engine's own collective; no all-to-all.
    stage = SKETCH[index]["config"]["zero_optimization"]["stage"]
    for numel, element_size, sent in first["traffic"]:
        assert "all_to_all" not in sent
        if stage == 3:
            assert sent["reduce_scatter"] == reduce_scatter_bytes(numel * element_size, 3)
        else:
            assert sent["all_reduce"] >= all_reduce_bytes(numel * element_size, 3)


@pytest.mark.parametrize("stage", STAGES)
def test_gradient_accumulation(stage: int) -> None:
    """ZeRO-1 reduces at the boundary only: one combination of the accumulated gradient per
    step. ZeRO-2 and ZeRO-3 reduce every micro-batch: one combination per micro-batch, and the
    optimizer steps on their mean (DeepSpeed divides each micro-batch's loss by their number)."""
    case = ACCUMULATION[STAGES.index(stage)]
    per_rank = [r[STAGES.index(stage)] for r in SECOND.results()]
    first = per_rank[0]
    own = torch.stack([r["own"] for r in per_rank])  # [R, steps, 2, N]
    sizes = first["sizes"]
    for step in range(own.shape[1]):
        if stage == 1:
            expected = _expected(case, own[:, step].mean(1), sizes, step)
        else:
            expected = torch.stack(
                [_expected(case, own[:, step, k], sizes, 2 * step + k) for k in range(2)]
            ).mean(0)
        torch.testing.assert_close(first["reduced"][step], expected, atol=1e-6, rtol=1e-5)
    assert first["iter"] == (2 if stage == 1 else 4)  # hook steps: optimizer steps or micro-batches
    assert torch.equal(per_rank[1]["params"], first["params"])


@pytest.mark.parametrize("stage", (2, 3))
def test_language_heads_leave_absent_objectives_out(stage: int) -> None:
    index = len(ACCUMULATION) + (2, 3).index(stage)
    case = HEADS[index - len(ACCUMULATION)]
    per_rank = [r[index] for r in SECOND.results()]
    _check_case(case, per_rank)
    # Each head is its language's alone: its update is that language's gradient, at full scale
    # (an average over both ranks would halve it).
    first, own = per_rank[0], torch.stack([r["own"] for r in per_rank])
    sizes = first["sizes"]
    head = sum(sizes[:2]), sum(sizes[:4])  # the first head's weight and bias
    torch.testing.assert_close(
        first["reduced"][0][head[0] : head[1]], own[0, 0, 0][head[0] : head[1]]
    )


def test_refusals_name_the_configuration_key() -> None:
    per_rank = REFUSALS.results()
    assert per_rank[0] == per_rank[1]  # every rank raises alike
    stage0, global_moo, noncontiguous, twice, objectives, bf16_optimizer = per_rank[0]
    assert stage0.startswith("ValueError: DeepSpeed zero_optimization.stage: stage 0")
    assert "granularity='global'" in global_moo
    assert "zero_optimization.contiguous_gradients" in noncontiguous
    assert "already has bucket-MOO installed" in twice
    assert objectives.startswith("ValueError: objective_of_rank")
    assert bf16_optimizer.startswith("ValueError: DeepSpeed built a BF16_Optimizer for ZeRO-1")


@pytest.mark.parametrize("stage", STAGES)
def test_optimizer_offload(stage: int) -> None:
    index = len(ACCUMULATION) + len(HEADS) + len(MEAN) + STAGES.index(stage)
    _check_case(OFFLOAD[STAGES.index(stage)], [r[index] for r in SECOND.results()])


def test_trainer_with_a_deepspeed_config() -> None:
    pytest.importorskip("transformers")
    per_rank = run_distributed(2, trainer_with_deepspeed, 2, timeout=300)
    first = per_rank[0]
    assert (first["engine"], first["stage"]) == ("deepspeed", 2)
    assert first["iter"] == 6  # ZeRO-2: one hook step per micro-batch (3 steps × 2)
    assert len(first["losses"]) == 3
    assert torch.equal(first["params"], per_rank[1]["params"])
    assert first["allreduce"] < first["sent"] <= 1.02 * first["allreduce"] + 4096


@pytest.mark.parametrize(("stage", "dtype"), list(itertools.product(STAGES, DTYPES)))
def test_mean_is_plain_deepspeed(stage: int, dtype: str) -> None:
    index = len(ACCUMULATION) + len(HEADS) + 2 * (STAGES.index(stage) * 2 + DTYPES.index(dtype))
    plain, hooked = ([r[index + k] for r in SECOND.results()] for k in (0, 1))
    tolerance = _tolerance(MEAN[index - len(ACCUMULATION) - len(HEADS)])
    for ours, theirs in zip(hooked, plain, strict=True):
        if stage == 3:
            torch.testing.assert_close(ours["reduced"], theirs["reduced"], **tolerance)
        torch.testing.assert_close(ours["params"], theirs["params"], **tolerance)


@pytest.mark.parametrize("stage", (1, 2))
def test_sum_op_gets_the_combination_times_r(stage: int) -> None:
    constants = pytest.importorskip("deepspeed.runtime.constants")
    if not hasattr(constants, "GRADIENT_ALLREDUCE_OP"):
        pytest.skip("this DeepSpeed has no gradient_allreduce_op (it always averages)")
    index = len(ACCUMULATION) + len(HEADS) + len(MEAN) + len(OFFLOAD) + stage - 1
    _check_case(SUM[stage - 1], [r[index] for r in SECOND.results()])


@pytest.mark.parametrize("stage", STAGES)
def test_bf16_training_with_fp32_communication(stage: int) -> None:
    index = len(ACCUMULATION) + len(HEADS) + len(MEAN) + len(OFFLOAD) + len(SUM)
    index += STAGES.index(stage)
    per_rank = [r[index] for r in SECOND.results()]
    _check_case(COMM_FP32[STAGES.index(stage)], per_rank)
    for _, element_size, _ in per_rank[0]["traffic"]:
        assert element_size == 4  # the bucket travelled in fp32


@pytest.mark.parametrize("index", range(len(HIERARCHICAL)))
def test_hierarchical_protocol_serves_every_stage(index: int) -> None:
    per_rank = [r[index] for r in NODES.results()]
    _check_case(HIERARCHICAL[index], per_rank)
    assert per_rank[0]["iter"] == 2
    # The ledger splits the bytes by link class with the state's ranks_per_node.
    assert per_rank[0]["links"]["cross_node"] > 0
    assert per_rank[0]["links"]["intra_node"] > 0


def test_overhead_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    """``benchmarks/deepspeed_overhead.py`` on a tiny model: every stage and method, the hook's
    bytes those of DeepSpeed's own collective for its buckets (plus the Gramians)."""
    out = tmp_path / "overhead.json"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        str(ROOT / "benchmarks" / "deepspeed_overhead.py"),
        *("--layers=1", "--d-model=32", "--context=16", "--batch=1"),
        *("--steps=1", "--warmup=1", "--rounds=1", f"--out={out}"),
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=environment)
    assert done.returncode == 0, done.stderr[-5000:]
    result = json.loads(out.read_text())
    assert set(result["stages"]) == {"1", "2", "3"}
    for methods in result["stages"].values():
        assert set(methods) == {"plain", "mgda", "sketch"}
        ratio = methods["mgda"]["ledger_per_step"] / methods["mgda"]["engine_equivalent"]
        assert 1.0 <= ratio < 1.01
    assert "| 3 | sketch |" in out.with_suffix(".md").read_text()
