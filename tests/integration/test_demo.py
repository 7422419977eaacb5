"""End-to-end smoke tests of scripts/finetune_multilingual.py at toy scale.

Each torchrun launch costs several seconds (process start-up and ``import torch`` per rank), so
the uninterrupted reference run is shared (module fixture) and every test checks all it can.
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
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "finetune_multilingual.py"
TINY = ["--steps", "4", "--batch-size", "4", "--context", "16", "--d-model", "32", "--n-head", "2"]
TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# The reference run: 2 ranks, MGDA, gradient accumulation, a checkpoint every 2 steps.
REFERENCE = [
    *("--languages", "eng,rus", "--unseen", "ukr,jpn", "--log-every", "2", "--grad-accum", "2"),
    *("--eval-every", "2", "--probe", "--probe-windows", "4"),
]


def launch(*args: str, nproc: int | None = 2) -> str:
    """Run the script with the tiny settings (under torchrun unless ``nproc`` is None)."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV} | {"OMP_NUM_THREADS": "1"}
    command = [sys.executable]
    if nproc is not None:
        command += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    command += [str(SCRIPT), *TINY, *args]
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


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp("reference")
    return launch(*REFERENCE, "--out", str(out), "--ckpt-every", "2"), out


@pytest.mark.slow
def test_static_languages_mgda_logs_diagnostics_and_checkpoints(
    reference: tuple[str, Path],
) -> None:
    output, out = reference
    assert "rank -> language: 0:eng  1:rus" in output
    lines = loss_lines(output)
    assert [line.split("|")[0].split()[1] for line in lines] == ["1/4", "2/4", "4/4"], output
    for line in lines:
        assert re.search(r"\| eng \d+\.\d{3}  rus \d+\.\d{3} \|", line), line
    assert_eval_table(output, ["eng", "rus"], ["ukr", "jpn"])
    assert re.search(r"hook sent [\d.]+ kB over \d+ buckets", output), output
    assert re.search(r"language separability per layer .*: 0:\d\.\d\d/\d\.\d\d  1:", output)

    summary = json.loads((out / "summary.json").read_text())
    assert [s["step"] for s in summary["steps"]] == [1, 2, 3, 4]
    losses = [v for s in summary["steps"] for v in s["loss"].values()]
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses), losses
    # An untrained byte model is close to uniform over 256 bytes.
    assert all(abs(v - math.log(256)) < 0.2 for v in summary["steps"][0]["loss"].values())
    assert {c: e["set"] for c, e in summary["eval"].items()} == {
        "eng": "seen",
        "rus": "seen",
        "ukr": "unseen",
        "jpn": "unseen",
    }
    assert all(
        abs(e["bpb_start"] - 8) < 0.3 and e["bpb"] < e["bpb_start"]
        for e in summary["eval"].values()
    )
    assert len(summary["probe"]) == 3  # embeddings + 2 blocks
    assert summary["comm"]["hook_bytes"] > 0

    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["split"]) for r in log if r["kind"] == "eval"]
    assert evals == [(0, "test"), (0, "valid"), (2, "valid"), (4, "valid"), (4, "test")]
    assert [r["step"] for r in log if r["kind"] == "train"] == [1, 2, 4]

    diagnostics = [
        json.loads(line) for line in (out / "diagnostics.jsonl").read_text().splitlines()
    ]
    buckets = json.loads((out / "buckets.json").read_text())
    per_bucket = [d for d in diagnostics if "bucket" in d]
    assert {d["step"] for d in per_bucket} == {0, 1, 2, 3}
    assert {d["bucket"] for d in per_bucket} == set(range(len(buckets)))
    assert per_bucket[0]["objectives"] == ["eng", "rus"]
    assert any("global_min_norm" in d for d in diagnostics)
    assert "blocks.1.mlp.2.bias" in buckets[0]  # DDP reduces the last layers first

    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 4 and len(ckpt["generators"]) == 2 and ckpt["moo"]["iter"] == 4


@pytest.mark.slow
def test_layer_conflicts_of_a_finished_run(reference: tuple[str, Path], tmp_path: Path) -> None:
    _, out = reference
    script = ROOT / "scripts" / "layer_conflicts.py"
    command = [sys.executable, str(script), str(out), "--out", str(tmp_path), "--windows", "2"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert re.search(r"start: .*block 0 [+-]\d\.\d\d/[+-]\d\.\d\d", result.stdout), result.stdout
    report = json.loads((tmp_path / "layer_conflicts.json").read_text())
    assert report["pairs"] == ["eng~rus"]
    assert list(report["states"]) == ["start", f"{out.name} @ 4"]
    final = report["states"][f"{out.name} @ 4"]
    assert "blocks.1.mlp.2.weight" in final and all(-1 <= c[0] <= 1 for c in final.values())
    assert final != report["states"]["start"]  # the trained model's gradients differ
    assert (tmp_path / "layer_conflicts.png").stat().st_size > 0
    missing = subprocess.run(
        [sys.executable, str(script), str(tmp_path), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2 and "has no summary.json or ckpt.pt" in missing.stderr


@pytest.mark.slow
def test_resume_from_a_checkpoint_is_bitwise_the_uninterrupted_run(
    reference: tuple[str, Path], tmp_path: Path
) -> None:
    _, out = reference
    first = launch(*REFERENCE, "--out", str(tmp_path), "--ckpt-every", "1", "--stop-after", "2")
    assert "stopped after step 2" in first and not (tmp_path / "summary.json").exists()
    second = launch(*REFERENCE, "--out", str(tmp_path), "--ckpt-every", "1", "--resume")
    assert f"resumed from {tmp_path / 'ckpt.pt'} at step 2" in second
    resumed = json.loads((tmp_path / "summary.json").read_text())
    uninterrupted = json.loads((out / "summary.json").read_text())
    assert resumed["resumed_at"] == 2
    assert resumed["steps"] == uninterrupted["steps"]
    assert resumed["evals"] == uninterrupted["evals"]
    assert resumed["eval"] == uninterrupted["eval"]


@pytest.mark.slow
def test_single_device_engine_reproduces_the_ddp_run(
    reference: tuple[str, Path], tmp_path: Path
) -> None:
    _, out = reference
    output = launch(*REFERENCE, "--engine", "single", "--out", str(tmp_path), nproc=None)
    assert "2 emulated ranks on cpu (single-device engine)" in output
    engine = json.loads((tmp_path / "summary.json").read_text())
    ddp = json.loads((out / "summary.json").read_text())
    for mine, theirs in zip(engine["steps"], ddp["steps"], strict=True):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
    for code, result in ddp["eval"].items():
        assert engine["eval"][code]["bpb"] == pytest.approx(result["bpb"], rel=1e-5)


@pytest.mark.slow
def test_more_languages_than_ranks_rotate(tmp_path: Path) -> None:
    # The sketch protocol rides along (the mean weighting ignores the Gramians it estimates).
    out = launch(
        *("--languages", "eng,rus,jpn", "--unseen", "", "--weighting", "mean"),
        *(
            "--log-every",
            "1",
            "--out",
            str(tmp_path),
            "--protocol",
            "sketch",
            "--sketch-size",
            "16",
        ),
    )
    assert "rotating" in out and "protocol=sketch (k=16)" in out
    lines = loss_lines(out)
    assert len(lines) == 4, out
    assert re.search(r"\| eng \d\.\d{3}  rus \d\.\d{3}  jpn   -   \|", lines[0]), lines[0]
    # Rank r trains languages[(r + 2 t) % 3] at step t: every language gets trained.
    result = json.loads((tmp_path / "summary.json").read_text())
    trained = [sorted(s["loss"]) for s in result["steps"]]
    assert trained == [["eng", "rus"], ["eng", "jpn"], ["jpn", "rus"], ["eng", "rus"]]
    assert_eval_table(out, ["eng", "rus", "jpn"], [])
    assert "hook sent" in out
    assert (result["config"]["protocol"], result["config"]["sketch_size"]) == ("sketch", 16)
    records = [json.loads(line) for line in (tmp_path / "diagnostics.jsonl").open()]
    per_bucket = [r for r in records if "bucket" in r]
    assert per_bucket and all(r["sketched"] and r["sketch_size"] == 16 for r in per_bucket)


@pytest.mark.slow
def test_language_adapters_train_under_ddp_and_the_single_device_engine(tmp_path: Path) -> None:
    """One adapter per language: each rank's forward leaves the other language's unused. With
    MGDA per parameter, an unused adapter counted as a zero gradient would never train (the
    min-norm point of {0, g} is 0; checked: with ``absent="zero"`` every ``up`` stays 0), so
    trained adapters on both languages show the absent-objective rule at work; the
    single-device engine must reproduce the torchrun run."""
    args = ("--languages", "eng,rus", "--unseen", "ukr", "--adapters", "4", "--log-every", "4")
    args += ("--granularity", "parameter")
    ddp = launch(*args, "--out", str(tmp_path / "ddp"), "--ckpt-every", "4")
    # d_model 32, width 4, 2 blocks: 2 x (32*4 + 4 + 4*32 + 32) = 584 parameters per language.
    assert "(2 x 0.001M in language adapters)" in ddp, ddp
    assert_eval_table(ddp, ["eng", "rus"], ["ukr"])
    launch(*args, "--engine", "single", "--out", str(tmp_path / "single"), nproc=None)
    runs = [json.loads((tmp_path / d / "summary.json").read_text()) for d in ("ddp", "single")]
    for mine, theirs in zip(runs[1]["steps"], runs[0]["steps"], strict=True):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
    for code, result in runs[0]["eval"].items():
        assert runs[1]["eval"][code]["bpb"] == pytest.approx(result["bpb"], rel=1e-5)
    model = torch.load(tmp_path / "ddp" / "ckpt.pt", weights_only=True)["model"]
    for code in ("eng", "rus"):
        for block in (0, 1):
            up = model[f"adapters.per_language.{code}.{block}.up.weight"]
            assert up.abs().max() > 0, (code, block)  # zero-initialised: it trained


@pytest.mark.slow
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
    assert "torchrun --nproc-per-node" in error and "--engine single" in error
    assert "KeyError" not in error
    with pytest.raises(SystemExit):
        parse_args(["--engine", "single", "--resume"])
    assert "need --out" in capsys.readouterr().err
    args = parse_args(["--engine", "single", "--languages", "eng,rus,jpn"])
    assert args.ranks == 3 and args.unseen == ["ukr", "deu_1996"]
    assert (args.protocol, args.sketch_size) == ("shard", None)
    args = parse_args(["--engine", "single", "--protocol", "sketch"])
    assert args.sketch_size == 4096  # the default, resolved so that the summary records it
    for bad, message in [
        (["--sketch-size", "64"], "protocol='sketch' only"),
        (["--protocol", "sketch", "--sketch-size", "8"], "sketch_size must be in"),
        (["--protocol", "sketch", "--weighting", "ddp"], "needs a MOO weighting"),
        (["--adapters", "-1"], "--adapters must be >= 0"),
    ]:
        with pytest.raises(SystemExit):
            parse_args(["--engine", "single", *bad])
        assert message in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """A converted-model directory: a 2-layer random Llama with a byte-level tokeniser made here
    (no download), and the parameter count of one of its blocks."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    path = tmp_path_factory.mktemp("tiny_llama")
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE({c: i for i, c in enumerate(alphabet)} | {"<s>": 256}, []))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="<s>"
    )
    fast.save_pretrained(path)
    config = transformers.LlamaConfig(
        vocab_size=257,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(path)
    return path, sum(p.numel() for p in model.model.layers[1].parameters())


@pytest.mark.slow
def test_pretrained_model_path_with_a_tiny_random_llama(tiny_llama: tuple[Path, int]) -> None:
    """The transformers path (tokeniser, top-block training, bits per byte, hidden states) on a
    2-layer random Llama: a few seconds."""
    path, layer = tiny_llama
    output = launch(
        *("--engine", "single", "--model", "smollm2-135m", "--model-dir", str(path)),
        *("--train-layers", "1", "--languages", "eng,rus", "--unseen", "ukr", "--lr", "1e-2"),
        *("--probe", "--probe-windows", "4"),
        nproc=None,
    )
    trainable = float(re.search(r"([\d.]+)M trainable params", output).group(1))
    assert trainable == pytest.approx((layer + 32) / 1e6, abs=1e-3)  # top block + final norm
    assert_eval_table(output, ["eng", "rus"], ["ukr"])
    start, final = (
        float(v) for v in re.search(r"^eng +seen +(\S+) +(\S+)$", output, re.M).groups()
    )
    assert abs(start - math.log2(257)) < 0.2 and final < start  # bits per byte: 1 token per byte
    assert len(re.findall(r" \d:\d\.\d\d/\d\.\d\d", output)) == 3  # embeddings + 2 blocks


@pytest.mark.slow
def test_gpu_grid_on_a_few_cpu_steps_then_the_analysis(
    tiny_llama: tuple[Path, int], tmp_path: Path
) -> None:
    """``benchmarks/finetune_grid.sh gpu`` as written (full fine-tuning, checkpoints, a method
    with variants), moved to the CPU, the tiny Llama and UDHR through EXTRA; a second call
    skips the finished runs; then scripts/analyze_finetune.py on its output."""
    path, _ = tiny_llama
    extra = f"--device cpu --dtype fp32 --model-dir {path} --data udhr --languages eng,rus"
    extra += " --unseen ukr --steps 2 --warmup 1 --batch-size 2 --context 16 --eval-bytes 300"
    extra += " --eval-every 1 --probe-windows 2 --ckpt-every 1"
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV} | {
        "OMP_NUM_THREADS": "1",
        "OUT": str(tmp_path / "runs"),
        "SEEDS": "1",
        "METHODS": "ddp upgrad-global-sketch",
        "PYTHON": sys.executable,
        "EXTRA": extra,
    }
    grid = ["bash", str(ROOT / "benchmarks" / "finetune_grid.sh"), "gpu"]
    for attempt in range(2):
        result = subprocess.run(grid, cwd=ROOT, env=env, capture_output=True, text=True)
        assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
        assert ("== gpu" in result.stdout) == (attempt == 0), result.stdout  # then: all done
    runs = tmp_path / "runs" / "gpu"
    summaries = {
        m: json.loads((runs / f"{m}-s1" / "summary.json").read_text())
        for m in ("ddp", "upgrad-global-sketch")
    }
    config = summaries["upgrad-global-sketch"]["config"]
    assert (config["weighting"], config["granularity"], config["protocol"]) == (
        "upgrad",
        "global",
        "sketch",
    )
    assert (config["train_layers"], config["train_embeddings"], config["device"]) == (
        0,
        True,
        "cpu",
    )
    assert summaries["ddp"]["eval"]["eng"]["bpb_start"] is not None  # step 0: only in ddp-s1
    assert summaries["upgrad-global-sketch"]["eval"]["eng"]["bpb_start"] is None

    analysis = tmp_path / "analysis"
    command = [sys.executable, str(ROOT / "scripts" / "analyze_finetune.py"), str(runs)]
    command += ["--out", str(analysis), "--cosine-method", "ddp"]
    command += ["--cosine-method", "upgrad-global-sketch"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = (analysis / "results.md").read_text()
    assert "| ddp | 1 |" in report and "| upgrad-global-sketch | 1 |" in report, report
    assert "`†`: the paired difference" in report and "‖d‖/‖mean‖" in report, report
    for name in ("loss_curves", "cosine_heatmaps", "cosine_heatmaps_upgrad-global-sketch"):
        assert (analysis / f"{name}.png").stat().st_size > 0, name
    assert (analysis / "separability.png").is_file()
