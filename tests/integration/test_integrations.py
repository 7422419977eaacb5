"""accelerate and transformers: the example launched with ``accelerate launch``, the installer
that dispatches on the wrapper, and the Trainer callback, on gloo processes."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from _distributed import run_distributed
from _integration_workers import train_with_trainer

from bucketmoo_hooks._collectives import all_reduce_bytes

pytestmark = pytest.mark.slow  # launches of processes

pytest.importorskip("accelerate")
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_accelerate_example_runs_end_to_end_with_fsdp2(tmp_path: Path) -> None:
    """``accelerate launch`` (its torchrun launcher), 2 CPU processes, FSDP2 units, gradient
    accumulation: the example trains both languages and sends what a reduce-scatter sends."""
    results = tmp_path / "results.json"
    command = [
        str(Path(sys.executable).with_name("accelerate")),
        "launch",
        "--multi_gpu",
        "--num_processes=2",
        f"--main_process_port={free_port()}",
        str(ROOT / "scripts" / "accelerate_example.py"),
        "--fsdp=2",
        "--steps=8",
        f"--json={results}",
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "eng: held-out bits per byte" in done.stdout
    report = json.loads(results.read_text())
    assert report["path"] == "fsdp2"
    assert report["steps"] == 8  # 2 micro-batches per step: accumulation opened no step
    assert report["languages"] == ["eng", "rus"]
    for before, after in report["losses"]:
        assert after < before - 1.0  # bits per byte, from ~8 (uniform over bytes)
    gramians = report["buckets"] * all_reduce_bytes(4 * 4, 2)
    assert report["plain"] < report["sent"] <= 1.02 * report["plain"] + gramians


def test_trainer_callback_trains_a_tiny_model_and_installer_dispatches() -> None:
    pytest.importorskip("transformers")
    per_rank = run_distributed(2, train_with_trainer, 3, timeout=240)
    for result in per_rank:
        assert result["path"] == "ddp"  # the Trainer prepared DDP through accelerate
        assert result["iter"] == 3  # one hook step per optimizer step (2 micro-batches each)
        assert len(result["losses"]) == 3
        assert result["allreduce"] < result["sent"] <= 1.02 * result["allreduce"] + 4096
    assert per_rank[0]["params"].equal(per_rank[1]["params"])
    paths = per_rank[0]["installed_paths"]  # install_bucket_moo on every wrapper
    assert {k: v for k, v in paths.items() if k != "plain"} == {
        "ddp": "ddp",
        "fsdp1": "fsdp1",
        "fsdp2": "fsdp2",
    }
    assert paths["plain"].startswith("TypeError: model (Sequential) is not wrapped")
