"""scripts/plot_diagnostics.py on diagnostics recorded by Diagnostics from synthetic Gramians."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bucketmoo_hooks import Diagnostics, objective_key

pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "plot_diagnostics.py"
PLOTS = (
    "cosine_heatmap.png",
    "weights_over_time.png",
    "conflict_share.png",
    "pair_cosine_over_time.png",
)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STEPS = 12
# The objective set changes per step (per-step language sampling), order included.
EVEN_STEP_OBJECTIVES = ("en", "de", "fr", "ja")
ODD_STEP_OBJECTIVES = ("zh", "ja", "en")


def synthetic_gradients(
    objectives: tuple[str, ...], problems: int, conflict: bool, gen: torch.Generator
) -> torch.Tensor:
    """``[problems, L, 16]`` gradients: a shared direction plus a language-specific one (pair
    cosines ≈ 0.6); with ``conflict``, ``ja`` points against ``en`` (cosine ≈ -0.9), which makes
    en–ja the most conflicting pair on purpose."""
    shared = torch.randn(problems, 1, 16, generator=gen, dtype=torch.float64)
    own = torch.randn(problems, len(objectives), 16, generator=gen, dtype=torch.float64)
    grads = shared + 0.8 * own
    if conflict and "ja" in objectives and "en" in objectives:
        en, ja = objectives.index("en"), objectives.index("ja")
        grads[:, ja] = -grads[:, en] + 0.5 * own[:, ja]
    scale = 0.5 + torch.rand(problems, len(objectives), 1, generator=gen, dtype=torch.float64)
    return grads * scale


def record(
    diagnostics: Diagnostics, step: int, bucket: int, problems: int, gen: torch.Generator
) -> None:
    objectives = EVEN_STEP_OBJECTIVES if step % 2 == 0 else ODD_STEP_OBJECTIVES
    conflict = (step + bucket) % 3 != 0  # the share of buckets in conflict varies per step
    grads = synthetic_gradients(objectives, problems, conflict, gen)
    gramians = grads @ grads.transpose(1, 2)
    inverse_norms = 1 / gramians.diagonal(dim1=1, dim2=2).sqrt()
    weights = inverse_norms / inverse_norms.sum(dim=1, keepdim=True)
    keys = tuple(objective_key(name) for name in objectives)
    diagnostics.record(step, bucket, keys, gramians, weights, segmented=problems > 1)


@pytest.fixture(scope="module")
def diagnostics_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Rank 0's file and an identical rank-1 copy: 3 buckets (0 and 1 per bucket, 2 per
    parameter with 2 parameters) every step, plus a whole-model record every 4th step."""
    folder = tmp_path_factory.mktemp("diagnostics")
    path = folder / "diag_rank0.jsonl"
    languages = sorted(set(EVEN_STEP_OBJECTIVES + ODD_STEP_OBJECTIVES))
    diagnostics = Diagnostics(log_every=5, path=path, objectives=languages)
    gen = torch.Generator().manual_seed(0)
    for step in range(STEPS):
        for bucket, problems in ((0, 1), (1, 1), (2, 2)):
            record(diagnostics, step, bucket, problems, gen)
        if step % 4 == 0:
            record(diagnostics, step, -1, 1, gen)
        diagnostics.end_step(step)
    diagnostics.pull()
    copy = folder / "diag_rank1.jsonl"
    copy.write_text(path.read_text())
    return [path, copy]


def run_script(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        encoding="utf-8",
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
        timeout=300,
    )


def mean_pair_cosine(path: Path, a: str, b: str) -> float:
    values: list[float] = []
    for line in path.read_text().splitlines():
        data = json.loads(line)
        if "cosine" in data and a in data["objectives"] and b in data["objectives"]:
            names = data["objectives"]
            values.append(data["cosine"][names.index(a)][names.index(b)])
    return sum(values) / len(values)


def share_in_conflict(path: Path) -> tuple[int, int]:
    """(bucket-steps with some pair cosine < 0, bucket-steps), parameters pooled per bucket."""
    conflict: dict[tuple[int, int], bool] = {}
    for line in path.read_text().splitlines():
        data = json.loads(line)
        if "cosine" in data:
            cosine = data["cosine"]
            pairs = [cosine[a][b] for a in range(len(cosine)) for b in range(a + 1, len(cosine))]
            key = (data["step"], data["bucket"])
            conflict[key] = conflict.get(key, False) or min(pairs) < 0
    return sum(conflict.values()), len(conflict)


def test_writes_four_pngs_and_names_the_most_conflicting_pair(
    diagnostics_files: list[Path], tmp_path: Path
) -> None:
    lines = [json.loads(line) for line in diagnostics_files[0].read_text().splitlines()]
    assert {line.get("parameter") for line in lines} == {None, 0, 1}
    assert {line.get("bucket") for line in lines} == {None, -1, 0, 1, 2}
    assert {len(line["objectives"]) for line in lines if "objectives" in line} == {3, 4}

    out = tmp_path / "plots"
    result = run_script(*diagnostics_files, "--out", out)
    assert result.returncode == 0, result.stderr
    for name in PLOTS:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE), name
        assert len(data) > 5_000, (name, len(data))
    summary = result.stdout
    assert f"steps: {STEPS} (steps 0–{STEPS - 1})" in summary
    assert "buckets: 3 (0, 1, 2) + whole model" in summary
    assert "objectives: 5 (de, en, fr, ja, zh)" in summary
    expected = mean_pair_cosine(diagnostics_files[0], "en", "ja")
    assert expected < -0.2
    assert f"most conflicting pair: en–ja, mean cosine {expected:+.3f}" in summary
    in_conflict, units = share_in_conflict(diagnostics_files[0])
    assert 0 < in_conflict < units
    assert f"{in_conflict / units:.1%} ({in_conflict} of {units} bucket-steps)" in summary
    # The rank-1 copy repeats every record: counted once.
    assert f"{len(lines)} repeated records counted once" in summary


def test_last_steps_and_threshold_restrict_the_summary(
    diagnostics_files: list[Path], tmp_path: Path
) -> None:
    args = ("--out", tmp_path, "--last-steps", 3, "--conflict-threshold", -2)
    result = run_script(diagnostics_files[0], *args)
    assert result.returncode == 0, result.stderr
    assert "steps: 3 (steps 9–11) (the last 3 selected)" in result.stdout
    # No cosine is below -2: no bucket is in conflict.
    assert "buckets in conflict (some pair cosine < -2): 0.0%" in result.stdout
    assert all((tmp_path / name).is_file() for name in PLOTS)


def test_a_malformed_line_is_reported_with_its_file_and_line(
    diagnostics_files: list[Path], tmp_path: Path
) -> None:
    good = diagnostics_files[0].read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([*good[:3], good[3][:40]]) + "\n")  # a truncated 4th line
    result = run_script(bad, "--out", tmp_path / "plots")
    assert result.returncode != 0
    assert f"{bad}:4: malformed line" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "plots").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, ": no such file"),
        ("", ": empty file"),
        ('{"step": 0, "global_min_norm": 1.0}\n{"step": 1, "bucket": 0}\n', ":2: malformed record"),
        (
            '{"step": 0, "bucket": 0, "parameter": null, "objectives": ["en", "de"], '
            '"cosine": [[1.0, 0.5]], "norms": [1, 1], "weights": [0.5, 0.5], "update_norm": 1}',
            ':1: malformed record: "cosine" must be a 2×2',
        ),
    ],
)
def test_unreadable_input_exits_with_a_message_not_a_traceback(
    tmp_path: Path, content: str | None, message: str
) -> None:
    path = tmp_path / "diag.jsonl"
    if content is not None:
        path.write_text(content)
    result = run_script(path, "--out", tmp_path / "plots")
    assert result.returncode != 0
    assert f"{path}{message}" in result.stderr
    assert "Traceback" not in result.stderr


def test_long_series_are_drawn_as_a_trailing_mean() -> None:
    """Over 100 steps a series becomes a trailing mean over steps // 25 points (NaNs skipped);
    shorter ones are drawn as they are."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("plot_diagnostics", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module._smoothed([1.0, 2.0], 2) is None
    values = [float(i % 2) for i in range(200)]
    values[5] = float("nan")
    smooth = module._smoothed(values, len(values))
    assert len(smooth) == 200 and smooth[0] == 0.0
    assert smooth[7] == pytest.approx((0 + 1 + 0 + 1 + 0 + 0 + 1) / 7)  # window 8, NaN skipped
    assert smooth[-1] == pytest.approx(0.5)
