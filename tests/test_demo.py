"""End-to-end smoke tests of scripts/finetune_multilingual.py, launched by torchrun on 2 CPU ranks.

Each launch costs several seconds (process start-up and ``import torch`` per rank), so every test
runs the script once with a tiny model and checks all it can from that run.
"""

import json
import math
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "finetune_multilingual.py"
TINY = ["--steps", "4", "--batch-size", "4", "--context", "16", "--d-model", "32", "--n-head", "2"]
TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launch(*args: str, nproc: int = 2) -> str:
    """Run the script under torchrun with the tiny settings; return rank 0's output."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV} | {"OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", str(nproc), str(SCRIPT), *TINY, *args]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def loss_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if re.match(r"step +\d+/4 \|", line)]


def assert_eval_table(output: str, seen: list[str], unseen: list[str]) -> None:
    for code, kind in [(c, "seen") for c in seen] + [(c, "unseen") for c in unseen]:
        assert re.search(rf"^{code} +{kind} +\d+\.\d+ +\d+\.\d+$", output, re.M), (code, output)
    assert re.search(r"^mean +seen +\d", output, re.M), output
    if unseen:
        assert re.search(r"^mean +unseen +\d", output, re.M), output


def test_static_languages_mgda_with_json(tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    out = launch(
        "--languages", "eng,rus", "--unseen", "ukr,jpn", "--log-every", "2", "--json", str(path)
    )
    assert "rank -> language: 0:eng  1:rus" in out
    lines = loss_lines(out)
    assert [line.split("|")[0].split()[1] for line in lines] == ["1/4", "2/4", "4/4"], out
    for line in lines:
        assert re.search(r"\| eng \d+\.\d{3}  rus \d+\.\d{3} \|", line), line
    assert_eval_table(out, ["eng", "rus"], ["ukr", "jpn"])
    assert re.search(r"hook sent [\d.]+ kB over \d+ buckets", out), out

    result = json.loads(path.read_text())
    assert [s["step"] for s in result["steps"]] == [1, 2, 3, 4]
    losses = [v for s in result["steps"] for v in s["loss"].values()]
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses), losses
    # An untrained byte model is close to uniform over 256 bytes.
    assert all(abs(v - math.log(256)) < 0.2 for v in result["steps"][0]["loss"].values())
    assert {c: e["set"] for c, e in result["eval"].items()} == {
        "eng": "seen",
        "rus": "seen",
        "ukr": "unseen",
        "jpn": "unseen",
    }
    assert all(math.isfinite(e["bpb"]) for e in result["eval"].values())
    assert result["comm"]["hook_bytes"] > 0


def test_more_languages_than_ranks_rotate(tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    out = launch(
        "--languages",
        "eng,rus,jpn",
        "--unseen",
        "",
        "--weighting",
        "mean",
        "--log-every",
        "1",
        "--json",
        str(path),
    )
    assert "rotating" in out
    lines = loss_lines(out)
    assert len(lines) == 4, out
    assert re.search(r"\| eng \d\.\d{3}  rus \d\.\d{3}  jpn   -   \|", lines[0]), lines[0]
    # Rank r trains languages[(r + 2 t) % 3] at step t: every language gets trained.
    result = json.loads(path.read_text())
    trained = [sorted(s["loss"]) for s in result["steps"]]
    assert trained == [["eng", "rus"], ["eng", "jpn"], ["jpn", "rus"], ["eng", "rus"]]
    assert_eval_table(out, ["eng", "rus", "jpn"], [])
    assert "hook sent" in out


def test_plain_ddp_control() -> None:
    out = launch("--languages", "eng,arb", "--unseen", "heb", "--weighting", "ddp")
    assert len(loss_lines(out)) == 2  # steps 1 and 4 (the last)
    assert_eval_table(out, ["eng", "arb"], ["heb"])
    assert "plain DDP ring all-reduce" in out and "hook sent" not in out


def test_cli_errors(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    parse_args = runpy.run_path(str(SCRIPT), run_name="demo")["parse_args"]
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--languages", "eng,xx"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "unknown language code(s) ['xx']" in error and "eng" in error and "jpn" in error
    with pytest.raises(SystemExit):
        parse_args([])
    error = capsys.readouterr().err
    assert "torchrun --nproc-per-node" in error and "KeyError" not in error
