#!/usr/bin/env python
"""Tables and plots of a fine-tuning grid written by ``benchmarks/finetune_grid.sh``.

    python scripts/analyze_finetune.py runs/finetune/tiny --out benchmarks/results/finetune/tiny
    python scripts/analyze_finetune.py runs/repro/tiny runs/finetune/tiny --variant sketch \
        --out benchmarks/results/finetune/tiny-sketch        # METHOD-sketch against METHOD

Reads the ``<root>/<method>-s<seed>/`` run directories of every root (a method's seeds may be
spread over roots; ``summary.json``, ``log.jsonl``, ``diagnostics.jsonl``, ``buckets.json`` from
``finetune_multilingual.py --out``) and writes:

- ``results.md`` / ``results.json``: final held-out bits per byte per language (mean ± standard
  deviation over seeds), seen and unseen means, each method's difference from plain DDP (marked
  where it exceeds the seed spread and where the paired difference over seeds is significant),
  per bucket the control's pair cosines and how far each method's weights are from uniform, and
  per method each language's mean weight and gradient norm;
- ``loss_curves.png``: per language, the training loss per method (mean over seeds; band: min–max)
  and, when the runs evaluated periodically, the validation bits per byte;
- ``cosine_heatmaps.png``: language-pair gradient cosine per bucket (≈ layer group) in the
  early, middle and late thirds of training (method given by ``--cosine-method``, default DDP:
  the control's Gramians, which no weighting has shaped; each further ``--cosine-method M``
  writes ``cosine_heatmaps_M.png`` and ``pair_cosine_M.png``);
- ``pair_cosine.png``: every pair's cosine over training, averaged over buckets;
- with ``--variant V`` (repeatable), in ``results.md``/``results.json``: every method ``M``
  that has runs ``M-V`` too against them, language by language: both means ± standard
  deviations, the difference of the means, and the paired difference over the seeds both have
  (a seed fixes the initialisation and the batches, so pairs share everything but the variant);
- ``separability.png`` (runs with ``--probe``): per layer, how linearly separable the languages
  are in the hidden states (probe accuracy and between-language variance ratio) per method.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ORDER = ["ddp", "mean", "mgda", "pcgrad", "gradvac", "cagrad", "imtl_g", "upgrad", "dualproj"]
ORDER += ["aligned_mtl", "nash_mtl"]


def load_runs(root: Path) -> dict[str, list[dict[str, Any]]]:
    """method -> runs (summary + parsed logs), in seed order; runs without a summary skipped."""
    runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for directory in sorted(root.iterdir()):
        match = re.fullmatch(r"(.+)-s(\d+)", directory.name)
        if not match or not (directory / "summary.json").is_file():
            continue
        run = json.loads((directory / "summary.json").read_text())
        run["seed"] = int(match.group(2))
        run["diagnostics"] = _jsonl(directory / "diagnostics.jsonl")
        buckets = directory / "buckets.json"
        run["buckets"] = json.loads(buckets.read_text()) if buckets.is_file() else []
        runs[match.group(1)].append(run)
    return dict(sorted(runs.items(), key=lambda kv: (_rank(kv[0]), kv[0])))


def _rank(method: str) -> int:
    """Methods in ORDER's order, each variant (``mgda-sketch``) after its base method."""
    base = method.split("-")[0]
    return ORDER.index(base) if base in ORDER else len(ORDER)


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _t95(n: int) -> float:
    """Two-sided 95 % quantile of Student's t with n − 1 degrees of freedom (n ≥ 2 pairs): the
    table to 10 pairs, then the Cornish–Fisher expansion (within 0.002 from 10 pairs on)."""
    if n in _T95:
        return _T95[n]
    z, df = 1.959964, n - 1
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def _value(run: dict[str, Any], column: str) -> float:
    """Final test bits per byte of a language, or the ``seen``/``unseen`` mean."""
    if column in ("seen", "unseen"):
        return run["mean_bpb"][column]
    return run["eval"][column]["bpb"]


def delta_table(data: dict[str, Any]) -> str:
    """The main table's differences from DDP alone, with the means: one short row per method."""
    columns = data["columns"]
    header = "| method | mean seen | mean unseen | " + " | ".join(columns[:-2]) + " |"
    lines = [header, "|" + " --- |" * (len(columns) + 1)]
    for method, entry in data["methods"].items():
        if method == "ddp":
            cells = [f"{entry[c]['mean']:.3f} ± {entry[c]['std']:.3f}" for c in columns[-2:]]
            cells += ["–"] * (len(columns) - 2)
        else:
            marked = {
                c: f"{entry[c]['vs_ddp']['delta']:+.3f}{_marks(entry[c]['vs_ddp'])}"
                for c in columns
            }
            cells = [f"{entry[c]['mean']:.3f} ({marked[c]})" for c in columns[-2:]]
            cells += [marked[c] for c in columns[:-2]]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# Two-sided 95 % quantile of Student's t with n − 1 degrees of freedom, for n = 2..10 pairs.
_T95 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262}
MARKS = (
    "`*`: the difference of the means exceeds the larger of the two seed standard deviations; "
    "`†`: the paired difference over the seeds both have (a seed fixes the initialisation and "
    "the batches) has a t statistic beyond the two-sided 95 % quantile (3 seeds: |t| > 4.30). "
    "Neither with a single seed."
)


def compare(
    base_runs: list[dict[str, Any]], other_runs: list[dict[str, Any]], column: str
) -> dict[str, Any]:
    """``other`` against ``base`` on one column: both means ± standard deviations, the difference
    of the means, and the paired difference over the seeds both have, with the flags of MARKS."""
    base = _stats([_value(r, column) for r in base_runs])
    mine = _stats([_value(r, column) for r in other_runs])
    base_by_seed = {r["seed"]: r for r in base_runs}
    differences = [
        _value(r, column) - _value(base_by_seed[r["seed"]], column)
        for r in other_runs
        if r["seed"] in base_by_seed
    ]
    pair = _stats(differences) if differences else (float("nan"), float("nan"))
    n = len(differences)
    if n > 1 and pair[1] > 0:
        t = pair[0] / (pair[1] / n**0.5)
    else:  # identical differences: no spread, so any nonzero one is beyond chance
        t = float("nan") if n < 2 else math.copysign(math.inf, pair[0]) if pair[0] else 0.0
    delta = mine[0] - base[0]
    seeded = len(base_runs) > 1 and len(other_runs) > 1  # a spread to compare with
    return {
        "base": {"mean": base[0], "std": base[1]},
        "variant": {"mean": mine[0], "std": mine[1]},
        "delta": delta,
        "paired": {"mean": pair[0], "std": pair[1], "t": t, "n": n},
        "beyond_spread": seeded and abs(delta) > max(base[1], mine[1]),
        "paired_significant": n > 1 and abs(t) > _t95(n),
    }


def _marks(comparison: dict[str, Any]) -> str:
    marks = "*" * comparison["beyond_spread"] + "†" * comparison["paired_significant"]
    return f" {marks}" if marks else ""


def table(runs: dict[str, list[dict[str, Any]]]) -> tuple[str, dict[str, Any]]:
    """Markdown table of final test bits per byte, and the same numbers as a dict."""
    first = next(iter(runs.values()))[0]
    codes = list(first["eval"])
    kinds = {c: first["eval"][c]["set"] for c in codes}
    start = next(
        (r["eval"] for rs in runs.values() for r in rs if r["eval"][codes[0]]["bpb_start"]), None
    )
    columns = [*codes, "seen", "unseen"]
    data: dict[str, Any] = {"columns": columns, "sets": kinds, "methods": {}}
    header = "| method | seeds | " + " | ".join(
        f"{c} ({kinds[c]})" if c in kinds else f"mean {c}" for c in columns
    )
    lines = [header + " |", "|" + " --- |" * (len(columns) + 2)]
    if start is not None:
        start_row = [start[c]["bpb_start"] for c in codes]
        seen = [start[c]["bpb_start"] for c in codes if kinds[c] == "seen"]
        unseen = [start[c]["bpb_start"] for c in codes if kinds[c] == "unseen"]
        start_row += [statistics.fmean(seen), statistics.fmean(unseen) if unseen else float("nan")]
        lines.append("| start (step 0) | – | " + " | ".join(f"{v:.3f}" for v in start_row) + " |")
        data["start"] = dict(zip(columns, start_row, strict=True))
    for method, method_runs in runs.items():
        cells, entry = [], {}
        for column in columns:
            mean, std = _stats([_value(r, column) for r in method_runs])
            entry[column] = {"mean": mean, "std": std}
            delta = ""
            if "ddp" in runs and method != "ddp":
                entry[column]["vs_ddp"] = against = compare(runs["ddp"], method_runs, column)
                delta = f" ({against['delta']:+.3f}{_marks(against)})"
            cells.append(f"{mean:.3f} ± {std:.3f}{delta}")
        seeds = ",".join(str(r["seed"]) for r in method_runs)
        lines.append(f"| {method} | {seeds} | " + " | ".join(cells) + " |")
        data["methods"][method] = entry | {"seeds": [r["seed"] for r in method_runs]}
    return "\n".join(lines) + "\n", data


def variant_table(
    runs: dict[str, list[dict[str, Any]]], variant: str, columns: list[str]
) -> tuple[str, dict[str, Any]]:
    """Every method ``M`` with runs ``M-<variant>`` against them (module docstring), flagged
    as MARKS says (``*`` on the ``Δ`` row, ``†`` on the paired row)."""
    header = "| weighting | runs | " + " | ".join(columns) + " |"
    lines = [header, "|" + " --- |" * (len(columns) + 2)]
    data: dict[str, Any] = {}
    for method, base_runs in runs.items():
        variant_runs = runs.get(f"{method}-{variant}")
        if variant_runs is None:
            continue
        rows: dict[str, list[str]] = {"base": [], "variant": [], "delta": [], "paired": []}
        entry: dict[str, Any] = {}
        for column in columns:
            entry[column] = c = compare(base_runs, variant_runs, column)
            rows["base"].append(f"{c['base']['mean']:.3f} ± {c['base']['std']:.3f}")
            rows["variant"].append(f"{c['variant']['mean']:.3f} ± {c['variant']['std']:.3f}")
            rows["delta"].append(f"{c['delta']:+.3f}" + (" *" if c["beyond_spread"] else ""))
            pair, mark = c["paired"], " †" if c["paired_significant"] else ""
            rows["paired"].append(f"{pair['mean']:+.3f} ± {pair['std']:.3f}{mark}")
        both = {r["seed"] for r in base_runs} & {r["seed"] for r in variant_runs}
        seeds = ",".join(str(seed) for seed in sorted(both))
        names = {
            "base": f"{method} ({','.join(str(r['seed']) for r in base_runs)})",
            "variant": f"{method}-{variant} ({','.join(str(r['seed']) for r in variant_runs)})",
            "delta": "Δ of the means",
            "paired": f"paired Δ, seeds {seeds}",
        }
        for kind, cells in rows.items():
            lines.append(f"| {method} | {names[kind]} | " + " | ".join(cells) + " |")
        data[method] = entry
    return "\n".join(lines) + "\n", data


def _colors(methods: list[str]) -> dict[str, Any]:
    cmap = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
    return {m: cmap(i % cmap.N) for i, m in enumerate(methods)}


def plot_loss_curves(runs: dict[str, list[dict[str, Any]]], path: Path) -> None:
    first = next(iter(runs.values()))[0]
    seen = [c for c, e in first["eval"].items() if e["set"] == "seen"]
    codes = list(first["eval"])
    has_valid = any(e["split"] == "valid" for e in first["evals"])
    rows = 2 if has_valid else 1
    figure, axes = plt.subplots(
        rows, len(codes), figsize=(3.2 * len(codes), 3.0 * rows), squeeze=False
    )
    colors = _colors(list(runs))
    for method, method_runs in runs.items():
        for j, code in enumerate(codes):
            if code in seen:
                curves = [[s["loss"].get(code) for s in r["steps"]] for r in method_runs]
                steps = range(1, len(curves[0]) + 1)
                smooth = [_smooth(curve) for curve in curves]
                mean = [statistics.fmean(v) for v in zip(*smooth, strict=True)]
                low = [min(v) for v in zip(*smooth, strict=True)]
                high = [max(v) for v in zip(*smooth, strict=True)]
                ax = axes[0][j]
                ax.plot(steps, mean, color=colors[method], label=method, lw=1.2)
                ax.fill_between(steps, low, high, color=colors[method], alpha=0.15, lw=0)
            if has_valid:
                points = defaultdict(list)
                for r in method_runs:
                    for e in r["evals"]:
                        if e["split"] == "valid":
                            points[e["step"]].append(e["bpb"][code])
                xs = sorted(points)
                axes[rows - 1][j].plot(
                    xs,
                    [statistics.fmean(points[x]) for x in xs],
                    "o-",
                    ms=3,
                    color=colors[method],
                    label=method,
                    lw=1.2,
                )
    for j, code in enumerate(codes):
        axes[0][j].set_title(f"{code} ({first['eval'][code]['set']})")
        if code not in seen:
            axes[0][j].text(0.5, 0.95, "not trained", ha="center", transform=axes[0][j].transAxes)
            axes[0][j].set_axis_off()
        axes[0][j].set_xlabel("step")
        if has_valid:
            axes[1][j].set_xlabel("step")
    axes[0][0].set_ylabel("train loss (nats/token, smoothed)")
    if has_valid:
        axes[1][0].set_ylabel("valid bits per byte")
    handles, labels = axes[0][0].get_legend_handles_labels()
    unseen = [j for j, code in enumerate(codes) if code not in seen]
    if unseen:  # in the empty panel of an untrained language, clear of the curves
        axes[0][unseen[0]].legend(handles, labels, loc="center", fontsize=7, ncol=2)
    else:
        axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _smooth(values: list[float | None], width: int = 10) -> list[float]:
    """Trailing mean over the last ``width`` defined values (rotation leaves gaps)."""
    out, window = [], []
    for value in values:
        if value is not None:
            window = [*window[-(width - 1) :], value]
        out.append(statistics.fmean(window) if window else float("nan"))
    return out


def bucket_label(names: list[str]) -> str:
    """``L2–3`` for a bucket of transformer blocks 2 and 3, else its first parameter's name."""
    layers = sorted(
        {int(m.group(1)) for n in names if (m := re.search(r"(?:blocks|layers)\.(\d+)\.", n))}
    )
    rest = [n for n in names if not re.search(r"(?:blocks|layers)\.\d+\.", n)]
    label = ""
    if layers:
        label = f"L{layers[0]}" if len(layers) == 1 else f"L{layers[0]}–{layers[-1]}"
    if rest:
        short = rest[0].removeprefix("lm.").removeprefix("model.")
        label = f"{label}+{short}" if label else short
    return label


def problem_records(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs' diagnostics records of whole problems: buckets (or the model), not parameters."""
    return [d for r in runs for d in r["diagnostics"] if "bucket" in d and d["parameter"] is None]


def cosine_by_phase(
    runs: list[dict[str, Any]],
) -> tuple[list[str], list[int], list[list[list[list[float]]]], list[str]]:
    """Mean pair-cosine matrix per (phase, bucket) over the runs' diagnostics."""
    records = problem_records(runs)
    objectives = records[0]["objectives"]
    buckets = sorted({d["bucket"] for d in records})
    last = max(d["step"] for d in records) + 1
    phases = ["early", "middle", "late"]
    sums = defaultdict(lambda: [[0.0] * len(objectives) for _ in objectives])
    counts: dict[tuple[int, int], int] = defaultdict(int)
    for d in records:
        phase = min(2, 3 * d["step"] // last)
        order = [d["objectives"].index(o) for o in objectives]
        for a, ia in enumerate(order):
            for b, ib in enumerate(order):
                sums[phase, d["bucket"]][a][b] += d["cosine"][ia][ib]
        counts[phase, d["bucket"]] += 1
    grid = [
        [[[v / max(counts[p, b], 1) for v in row] for row in sums[p, b]] for b in buckets]
        for p in range(3)
    ]
    return objectives, buckets, grid, phases


def plot_cosine_heatmaps(runs: list[dict[str, Any]], method: str, path: Path) -> dict[str, Any]:
    objectives, buckets, grid, phases = cosine_by_phase(runs)
    names = runs[0]["buckets"]
    labels = [bucket_label(names[b]) if b < len(names) else f"b{b}" for b in buckets]
    figure, axes = plt.subplots(
        3, len(buckets), figsize=(1.7 * len(buckets) + 1, 5.6), squeeze=False
    )
    image = None
    for p in range(3):
        for j in range(len(buckets)):
            ax = axes[p][j]
            image = ax.imshow(grid[p][j], vmin=-1, vmax=1, cmap="RdBu_r")
            ax.set_xticks(range(len(objectives)), objectives, fontsize=6, rotation=90)
            ax.set_yticks(range(len(objectives)), objectives if j == 0 else [], fontsize=6)
            if p == 0:
                ax.set_title(f"b{buckets[j]} {labels[j]}", fontsize=7)
        axes[p][0].set_ylabel(phases[p], fontsize=9)
    figure.suptitle(
        f"language-pair gradient cosine per bucket ({method}; rows: thirds of training)"
    )
    figure.colorbar(image, ax=axes, shrink=0.6)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    pairs = {}
    for a in range(len(objectives)):
        for b in range(a + 1, len(objectives)):
            pairs[f"{objectives[a]}~{objectives[b]}"] = statistics.fmean(
                grid[p][j][a][b] for p in range(3) for j in range(len(buckets))
            )
    return {"buckets": dict(zip([f"b{b}" for b in buckets], labels, strict=True)), "pairs": pairs}


def plot_pair_cosine(runs: list[dict[str, Any]], method: str, path: Path) -> None:
    per_step: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        for d in run["diagnostics"]:
            if "bucket" not in d:
                continue
            names = d["objectives"]
            for a in range(len(names)):
                for b in range(a + 1, len(names)):
                    pair = "~".join(sorted((names[a], names[b])))
                    per_step[pair][d["step"]].append(d["cosine"][a][b])
    figure, ax = plt.subplots(figsize=(7, 3.6))
    for pair, steps in sorted(per_step.items()):
        xs = sorted(steps)
        ax.plot(xs, _smooth([statistics.fmean(steps[x]) for x in xs], 5), label=pair, lw=1.2)
    ax.axhline(0, color="grey", lw=0.6)
    ax.set_xlabel("step")
    ax.set_ylabel("cosine (mean over buckets)")
    ax.set_title(f"language-pair gradient cosine over training ({method})")
    ax.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_separability(runs: dict[str, list[dict[str, Any]]], path: Path) -> dict[str, Any]:
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    colors = _colors(list(runs))
    data = {}
    for method, method_runs in runs.items():
        probes = [r["probe"] for r in method_runs if r.get("probe")]
        if not probes:
            continue
        data[method] = {}
        for ax, key in zip(axes, ("probe_accuracy", "variance_ratio"), strict=True):
            per_layer = list(zip(*[[layer[key] for layer in p] for p in probes], strict=True))
            means = [statistics.fmean(v) for v in per_layer]
            ax.errorbar(
                range(len(means)),
                means,
                yerr=[_stats(list(v))[1] for v in per_layer],
                color=colors[method],
                label=method,
                marker="o",
                ms=3,
                capsize=2,
                lw=1.2,
            )
            data[method][key] = means
    axes[0].set_ylabel("linear probe accuracy (language ID)")
    axes[1].set_ylabel("between-language variance / total")
    for ax in axes:
        ax.set_xlabel("layer (0 = embeddings)")
    axes[0].legend(fontsize=8)
    figure.suptitle("language separability of mean-pooled hidden states (test windows)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return data


def _mean_norm(record: dict[str, Any]) -> float:
    """‖(1/L) Σ_ℓ ḡ_ℓ‖ from a diagnostics record's cosines and norms."""
    norms, cosine = record["norms"], record["cosine"]
    total = sum(
        cosine[a][b] * norms[a] * norms[b] for a in range(len(norms)) for b in range(len(norms))
    )
    return max(total, 0.0) ** 0.5 / len(norms)


def bucket_table(runs: dict[str, list[dict[str, Any]]], cosine_method: str) -> str:
    """Per bucket: how much the languages conflict (the control's Gramians) and, per MOO method,
    how far its weights are from uniform (mean over steps of max_ℓ w_ℓ / min_ℓ w_ℓ) and how long
    its update is against the plain mean of the same gradients (‖d‖ / ‖mean‖)."""
    records = problem_records(runs.get(cosine_method, []))
    if not records:
        return ""
    names = runs[cosine_method][0]["buckets"]
    methods = [m for m in runs if m != cosine_method and any(r["diagnostics"] for r in runs[m])]
    header = "| bucket | mean pair cosine | min pair cosine | steps with a negative pair |"
    header += "".join(f" {m}: max/min weight, ‖d‖/‖mean‖ |" for m in methods)
    lines = [header, "|" + " --- |" * (4 + len(methods))]
    for bucket in sorted({d["bucket"] for d in records}):
        mine = [d for d in records if d["bucket"] == bucket]
        pairs = [
            [d["cosine"][a][b] for a in range(len(d["cosine"])) for b in range(a)] for d in mine
        ]
        flat = [c for row in pairs for c in row]
        negative = sum(min(row) < 0 for row in pairs) / len(pairs)
        label = bucket_label(names[bucket]) if bucket < len(names) else f"b{bucket}"
        cells = [f"b{bucket} {label}", f"{statistics.fmean(flat):+.3f}", f"{min(flat):+.3f}"]
        cells.append(f"{negative:.0%}")
        for method in methods:
            theirs = [d for d in problem_records(runs[method]) if d["bucket"] == bucket]
            ratios = [max(d["weights"]) / max(min(d["weights"]), 1e-3) for d in theirs]
            shrink = [d["update_norm"] / max(_mean_norm(d), 1e-30) for d in theirs]
            cells.append(
                f"{statistics.fmean(ratios):.2f} / {statistics.fmean(shrink):.2f}"
                if theirs
                else "–"
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def weights_table(runs: dict[str, list[dict[str, Any]]]) -> tuple[str, dict[str, Any]]:
    """Per method, averaged over buckets, steps and seeds: each language's weight and gradient
    norm (as the method's diagnostics recorded them), and ‖d‖/‖mean‖ (why a method trains a
    language more or less than the average does)."""
    data: dict[str, Any] = {}
    for method, method_runs in runs.items():
        records = problem_records(method_runs)
        if not records:
            continue
        objectives = records[0]["objectives"]
        weights, norms = defaultdict(list), defaultdict(list)
        for d in records:
            for i, code in enumerate(d["objectives"]):
                weights[code].append(d["weights"][i])
                norms[code].append(d["norms"][i])
        shrink = [d["update_norm"] / max(_mean_norm(d), 1e-30) for d in records]
        data[method] = {
            "weight": {c: statistics.fmean(weights[c]) for c in objectives},
            "norm": {c: statistics.fmean(norms[c]) for c in objectives},
            "update_over_mean": statistics.fmean(shrink),
        }
    if not data:
        return "", data
    objectives = list(next(iter(data.values()))["weight"])
    header = "| method | " + " | ".join(f"{c}: weight / ‖ḡ‖" for c in objectives)
    lines = [header + " | ‖d‖/‖mean‖ |", "|" + " --- |" * (len(objectives) + 2)]
    for method, entry in data.items():
        cells = [f"{entry['weight'][c]:.3f} / {entry['norm'][c]:.3f}" for c in objectives]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {entry['update_over_mean']:.2f} |")
    return "\n".join(lines) + "\n", data


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "root", type=Path, nargs="+", help="grid directories with <method>-s<seed>/ runs"
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--cosine-method",
        action="append",
        default=None,
        help="whose Gramians the heatmaps show (repeatable; default ddp; the first one's in the "
        "per-bucket table, the others' heatmaps in cosine_heatmaps_<method>.png)",
    )
    parser.add_argument(
        "--variant", action="append", default=[], help="compare METHOD-VARIANT with METHOD"
    )
    args = parser.parse_args(argv)
    runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for root in args.root:  # a method's runs may come from several roots (other seeds)
        for method, method_runs in load_runs(root).items():
            runs[method] += method_runs
    if not runs:
        raise SystemExit(f"no finished runs (summary.json) under {args.root}")
    for method, method_runs in runs.items():
        seeds = [r["seed"] for r in method_runs]
        if len(set(seeds)) != len(seeds):
            raise SystemExit(f"{method}: a seed has runs under more than one of {args.root}")
        method_runs.sort(key=lambda r: r["seed"])
    runs = dict(sorted(runs.items(), key=lambda kv: (_rank(kv[0]), kv[0])))
    args.out.mkdir(parents=True, exist_ok=True)
    markdown, data = table(runs)
    if "ddp" in runs:
        markdown += f"\nThe same against DDP, differences only:\n\n{delta_table(data)}"
    if "ddp" in runs or args.variant:
        markdown += f"\n{MARKS}\n"
    for variant in args.variant:
        comparison, data.setdefault("variants", {})[variant] = variant_table(
            runs, variant, data["columns"]
        )
        markdown += f"\n{variant} against the base method:\n\n{comparison}"
    plot_loss_curves(runs, args.out / "loss_curves.png")
    plotted = 0  # the first method with diagnostics gets the unsuffixed files and the table
    for method in args.cosine_method or ["ddp"]:
        cosine_runs = [r for r in runs.get(method, []) if r["diagnostics"]]
        if not cosine_runs:
            continue
        suffix = "" if plotted == 0 else f"_{method}"
        cosine = plot_cosine_heatmaps(
            cosine_runs, method, args.out / f"cosine_heatmaps{suffix}.png"
        )
        data.setdefault("cosine_by_method", {})[method] = cosine
        plot_pair_cosine(cosine_runs, method, args.out / f"pair_cosine{suffix}.png")
        pairs = ", ".join(
            f"{p} {v:+.3f}" for p, v in sorted(cosine["pairs"].items(), key=lambda kv: -kv[1])
        )
        markdown += f"\nMean pair cosine ({method}, all buckets and steps): {pairs}\n"
        if plotted == 0:
            data["cosine"] = cosine
            markdown += "\nPer bucket (weight ratio capped at 1000 where a weight is ~0):\n\n"
            markdown += bucket_table(runs, method)
        plotted += 1
    weights, data["weights"] = weights_table(runs)
    if weights:
        markdown += (
            "\nMean weight and gradient norm per language (over the bucket- and model-level "
            "problems of every step and seed; runs at parameter granularity are left out; weights "
            "as each method scales them), and the update's length against the mean's:"
            f"\n\n{weights}"
        )
    if any(r.get("probe") for rs in runs.values() for r in rs):
        data["separability"] = plot_separability(runs, args.out / "separability.png")
    data["train_seconds"] = {m: [r["train_seconds"] for r in rs] for m, rs in runs.items()}
    (args.out / "results.md").write_text(markdown)
    (args.out / "results.json").write_text(json.dumps(data, indent=1) + "\n")
    print(markdown)


if __name__ == "__main__":
    main()
