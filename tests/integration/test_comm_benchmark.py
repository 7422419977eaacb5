"""``benchmarks/comm_overhead.py`` end to end on a tiny model (2 and 3 gloo ranks, a few steps),
and its measured byte counts against the cost model (``bucketmoo_hooks.cost_model``)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from bucketmoo_hooks import cost_model
from bucketmoo_hooks._collectives import all_reduce_bytes

pytestmark = pytest.mark.slow  # launches of the benchmarks

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "comm_overhead.py"
TINY = [
    *("--layers=1", "--d-model=32", "--context=16", "--batch=1"),
    # 2 warm-up steps: PowerSGD (start_powerSGD_iter=2) compresses from the third step on.
    *("--steps=2", "--warmup=2", "--memory-steps=1"),
]
_spec = importlib.util.spec_from_file_location("comm_overhead", BENCHMARK)
assert _spec is not None and _spec.loader is not None
_benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_benchmark)
METHODS: tuple[str, ...] = _benchmark.METHODS
HOOK = set(_benchmark.HOOK_METHODS)
#: The library's methods of each protocol (DDP hook and FSDP2).
SKETCH = {m for m, options in _benchmark.HOOK_METHODS.items() if options[3] == "sketch"} | {
    m for m, protocol in _benchmark.FSDP_MOO_METHODS.items() if protocol == "sketch"
}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("comm_overhead")
    command = [
        sys.executable,
        str(BENCHMARK),
        "sweep",
        *TINY,
        "--worlds=2,3",
        "--sizes=1",
        "--size-world=2",
        f"--out={out}",
        "--name=smoke",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if done.returncode:
        pytest.fail(f"{' '.join(command)} failed:\n{done.stderr[-5000:]}")
    return out, json.loads((out / "smoke.json").read_text())


def rows(result: dict[str, Any], world_size: int) -> dict[str, dict[str, Any]]:
    return {r["method"]: r for r in result["rows"] if r["world_size"] == world_size}


def test_sweep_writes_the_table_the_json_and_the_plot(sweep: tuple[Path, dict]) -> None:
    out, result = sweep
    assert (out / "smoke.png").stat().st_size > 10_000
    table = (out / "smoke.md").read_text()
    assert result["command"] in table
    assert {"cpu", "cores", "torch"} <= set(result["machine"])
    assert set(result["load_average_1min"]) == {"before", "after"}
    # Every method at the table's world size, the blocking hook only there.
    assert set(rows(result, 2)) == set(METHODS)
    assert set(rows(result, 3)) == set(METHODS) - {"mean-blocking", "mgda-blocking"}
    for row in result["rows"]:
        assert row["timed_steps"] == 2 * 2  # --rounds=2 (the default) × --steps=2
        assert row["step_ms"]["p10"] <= row["step_ms"]["median"] <= row["step_ms"]["p90"]
        assert row["time_ratio"] > 0
        # The memory pass runs at the size sweep's world size only.
        assert (row["transient_mb"] is not None) == (row["world_size"] == 2)


@pytest.mark.parametrize("world_size", [2, 3])
def test_measured_bytes_meet_the_budget(sweep: tuple[Path, dict], world_size: int) -> None:
    measured = rows(sweep[1], world_size)
    num_objectives = world_size  # every rank its own language
    buckets = len(measured["mgda"]["buckets"])
    gramians = buckets * all_reduce_bytes(num_objectives**2 * 4, world_size)
    allreduce = measured["allreduce"]["algorithm_bytes"]
    for method in HOOK & set(measured):
        row = measured[method]
        # The library's ledger and the independent counter agree; the budget holds.
        assert row["ledger_bytes"] == row["algorithm_bytes"]
        if method in SKETCH:  # DDP's own all-reduce, plus the sketch exchange (costed exactly
            # below): on this tiny model k = 4096 numbers are a tenth of a bucket.
            assert row["algorithm_by_collective"]["all_reduce"] == allreduce
            continue
        assert row["algorithm_bytes"] <= 1.02 * allreduce + gramians + world_size * 24
    assert measured["naive"]["bytes_ratio"] == pytest.approx(world_size / 2, rel=0.01)
    assert measured["powersgd"]["bytes_ratio"] < 0.5
    fsdp, ours, sketch = measured["fsdp2"], measured["fsdp2-moo"], measured["fsdp2-sketch"]
    assert (
        ours["algorithm_by_collective"]["all_to_all"]
        == fsdp["algorithm_by_collective"]["reduce_scatter"]
        == sketch["algorithm_by_collective"]["reduce_scatter"]
    )
    # The ledger counts the library's collectives: everything but FSDP's parameter all-gathers.
    for row in (ours, sketch):
        parameters = fsdp["algorithm_by_collective"]["all_gather"]
        assert row["ledger_bytes"] == row["algorithm_bytes"] - parameters


def gloo_wire_bytes(row: dict[str, Any]) -> int:
    """What gloo writes for the counted collectives: the bandwidth-optimal bytes, except its
    reduce-scatter, which sends as much as an all-reduce."""
    sent = row["algorithm_by_collective"]
    return sum(sent.values()) + sent.get("reduce_scatter", 0)


@pytest.mark.parametrize("world_size", [2, 3])
def test_counted_bytes_are_what_the_kernel_saw_gloo_write(
    sweep: tuple[Path, dict], world_size: int
) -> None:
    for method, row in rows(sweep[1], world_size).items():
        expected = gloo_wire_bytes(row)
        assert abs(row["wire_bytes"] - expected) <= 0.01 * expected + 8192, method


def predicted(
    method: str, row: dict[str, Any], world_size: int, fsdp_gathers: int
) -> dict[str, int]:
    """What the cost model says ``row`` sent; ``fsdp_gathers``: FSDP's own parameter
    all-gathers, as measured under plain FSDP2 (the same model, counted too)."""
    buckets = [b["numel"] for b in row["buckets"]]
    if method in HOOK:
        name = "bucket_moo_sketch" if method in SKETCH else "bucket_moo"
        return cost_model.step_bytes(name, buckets, world_size, world_size)
    if method == "powersgd":
        shapes = [b["shapes"] for b in row["buckets"]]
        return cost_model.step_bytes("powersgd", buckets, world_size, world_size, shapes=shapes)
    if method == "fsdp2":
        sent = cost_model.step_bytes("fsdp_reduce_scatter", buckets, world_size, world_size)
        return sent | {"all_gather": fsdp_gathers}
    if method in _benchmark.FSDP_MOO_METHODS:
        parameters = [b["parameters"] for b in row["buckets"]]
        name = "fsdp_moo_sketch" if method in SKETCH else "fsdp_moo"
        sent = cost_model.step_bytes(name, buckets, world_size, world_size, parameters=parameters)
        sent["all_gather"] = sent.get("all_gather", 0) + fsdp_gathers
        return sent
    return cost_model.step_bytes(method, buckets, world_size, world_size)


@pytest.mark.parametrize("world_size", [2, 3])
def test_cost_model_predicts_the_measured_bytes_exactly(
    sweep: tuple[Path, dict], world_size: int
) -> None:
    measured_rows = rows(sweep[1], world_size)
    fsdp_gathers = measured_rows["fsdp2"]["algorithm_by_collective"]["all_gather"]
    assert {"sketch", "sketch-global", "fsdp2-sketch"} <= set(measured_rows)
    for method, row in measured_rows.items():
        expected = predicted(method, row, world_size, fsdp_gathers)
        assert row["algorithm_by_collective"] == expected, method


def test_protocol_phases_prints_every_phase() -> None:
    """``benchmarks/protocol_phases.py`` on 2 gloo ranks and a small bucket (odd length: padded)."""
    script = BENCHMARK.with_name("protocol_phases.py")
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"),
        *(str(script), "--numel=1001", "--repeats=2"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.endswith("×")]
    assert [line.split("  ")[1].strip() for line in lines] == [
        "all-reduce (DDP allreduce_hook)",
        "1 all-to-all",
        "2-3 averages, partial Gramian",
        "4 Gramian all-reduce",
        "5 MGDA solve",
        "6 combination",
        "7 all-gather",
        "bucket end to end",
        "presence counts",
        "bucket end to end, presence checked",
    ]
    assert all(float(line.split()[-2]) > 0 for line in lines)


def test_run_prints_a_table_and_help_lists_methods_and_defaults(
    sweep: tuple[Path, dict],
) -> None:
    measured = [r for r in sweep[1]["rows"] if r["world_size"] == 2 and r["parameters"]]
    summary = {"world_size": 2, "backend": "gloo", "device": "cpu", "parameters": 1234}
    lines = _benchmark.table(measured, summary).splitlines()
    assert lines[0].startswith("R = 2 (gloo, cpu), 1,234 parameters")
    assert [line.split()[0] for line in lines[2:]] == [r["method"] for r in measured]
    assert all(line.split()[2].endswith("x") for line in lines[2:])  # bytes ratio
    done = subprocess.run(
        [sys.executable, str(BENCHMARK), "run", "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    assert all(method in text for method in METHODS)
    assert "(default: 6)" in text  # --steps
    assert "--model {gpt,mlp}" in done.stdout and "--sketch-size" in done.stdout


def test_mlp_model_counts_its_parameters() -> None:
    """``--model mlp`` (no launch: the model, its parameter count and its loss)."""
    for layers, d_model, context in ((3, 512, 64), (1, 32, 16), (2, 100, 64)):
        model = _benchmark.make_model("mlp", layers, d_model, context)
        count = sum(p.numel() for p in model.parameters())
        assert count == _benchmark.parameter_count(layers, d_model, context, "mlp")
    assert _benchmark.parameter_count(3, 512, 64, "mlp") == 6_436_352
    assert _benchmark.parameter_count(8, 512, 64) == 25_515_008  # the default transformer
    tokens = torch.randint(0, _benchmark.VOCAB, (4, 17))
    loss = _benchmark.loss_of(_benchmark.make_model("mlp", 1, 32, 16), tokens)
    assert loss.dim() == 0 and loss.item() > 0
