#!/usr/bin/env python
"""Plot the interference diagnostics that ``bucketmoo_hooks.Diagnostics`` writes as JSON lines.

    python scripts/plot_diagnostics.py diag_rank0.jsonl [more.jsonl ...] --out plots/ \\
        [--last-steps N] [--conflict-threshold 0.0]

Writes four PNGs to ``--out``:

- ``cosine_heatmap.png``: per bucket, the cosine similarity of every objective pair averaged over
  the selected steps (each pair over the steps where both objectives were present; grey where
  they never were together);
- ``weights_over_time.png``: per objective, its weight over steps (mean over buckets; band:
  min–max across buckets);
- ``conflict_share.png``: per step, the share of buckets in conflict (some pair cosine below
  ``--conflict-threshold``), with the global min-norm value and the mean per-bucket update norm on
  a second axis;
- ``pair_cosine_over_time.png``: per objective pair, its mean cosine over steps (the 15 pairs
  with the lowest mean cosine named in the legend, the others in grey);

and prints a short summary. Records of several files are pooled; records with the same step,
bucket and parameter count once, the later one winning (every rank records the same all-reduced
numbers, so the per-rank files of one run can be passed together). Per-parameter records
(``granularity="parameter"``) count towards their bucket; the record of ``granularity="global"``
(bucket -1) is shown as "whole model". ``--last-steps`` restricts every plot and the summary.

Needs matplotlib (the ``plots`` extra).
"""

import argparse
import io
import json
import math
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import matplotlib
    import numpy as np
    from matplotlib.axes import Axes
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator, PercentFormatter
except ImportError as error:  # pragma: no cover - depends on the environment
    sys.exit(
        f"plot_diagnostics.py needs matplotlib ({error}): pip install 'bucketmoo_hooks[plots]'"
    )

WHOLE_MODEL = -1
LEGEND_PAIRS = 15
#: Series longer than this many steps are drawn as a trailing mean over their faint raw values.
SMOOTH_FROM = 100
DPI = 120
# "parameter" may be left out of hand-written records (read as null).
BUCKET_KEYS = ("bucket", "objectives", "cosine", "norms", "weights", "update_norm")

Pair = tuple[str, str]


class InputError(Exception):
    """A file that cannot be read as diagnostics; the message names the file (and line)."""


# --------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class BucketRecord:
    """One bucket's (or parameter's, or the whole model's) numbers at one step."""

    step: int
    bucket: int
    parameter: int | None
    objectives: tuple[str, ...]
    cosine: np.ndarray  # [L, L]
    weights: np.ndarray  # [L]
    update_norm: float


@dataclass
class Run:
    records: list[BucketRecord]
    global_min_norm: dict[int, float]  # step → value
    files: int = 0
    duplicates: int = 0


def _integer(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f'"{name}" must be an integer, got {value!r}')
    return value


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f'"{name}" must be a number, got {value!r}')
    return float(value)


def _numbers(value: Any, length: int, name: str) -> list[float]:
    if not isinstance(value, list) or len(value) != length:
        raise ValueError(f'"{name}" must be a list of {length} numbers, one per objective')
    return [_number(item, name) for item in value]


def parse_record(data: Any) -> BucketRecord | tuple[int, float]:
    """A bucket record, or ``(step, global_min_norm)``; ``ValueError`` says what is wrong."""
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    if "step" not in data:
        raise ValueError('missing "step"')
    step = _integer(data["step"], "step")
    if "global_min_norm" in data:
        return step, _number(data["global_min_norm"], "global_min_norm")
    missing = [f'"{key}"' for key in BUCKET_KEYS if key not in data]
    if missing:
        raise ValueError(f"missing {', '.join(missing)} (neither a bucket nor a global record)")
    bucket = _integer(data["bucket"], "bucket")
    if bucket < WHOLE_MODEL:
        raise ValueError(f'"bucket" must be >= -1, got {bucket}')
    parameter = data.get("parameter")
    if parameter is not None and _integer(parameter, "parameter") < 0:
        raise ValueError(f'"parameter" must be null or >= 0, got {parameter}')
    names = data["objectives"]
    if (
        not isinstance(names, list)
        or not names
        or not all(isinstance(n, str | int) and not isinstance(n, bool) for n in names)
    ):
        raise ValueError(f'"objectives" must be a non-empty list of names, got {names!r}')
    objectives = tuple(str(name) for name in names)
    if len(set(objectives)) != len(objectives):
        raise ValueError(f'"objectives" has a repeated name: {names!r}')
    num = len(objectives)
    cosine = data["cosine"]
    if not isinstance(cosine, list) or len(cosine) != num:
        raise ValueError(f'"cosine" must be a {num}×{num} list of lists ({num} objectives)')
    rows = [_numbers(row, num, "cosine") for row in cosine]
    _numbers(data["norms"], num, "norms")
    return BucketRecord(
        step=step,
        bucket=bucket,
        parameter=parameter,
        objectives=objectives,
        cosine=np.array(rows, dtype=float),
        weights=np.array(_numbers(data["weights"], num, "weights"), dtype=float),
        update_norm=_number(data["update_norm"], "update_norm"),
    )


def _clip(text: str, width: int = 80) -> str:
    text = text.strip()
    return text if len(text) <= width else text[: width - 1] + "…"


def load(paths: Sequence[Path]) -> Run:
    """Read and check every line; raises :class:`InputError` naming the file and line."""
    records: dict[tuple[int, int, int | None], BucketRecord] = {}
    global_min_norm: dict[int, float] = {}
    duplicates = 0
    for path in paths:
        if not path.exists():
            raise InputError(f"{path}: no such file")
        if not path.is_file():
            raise InputError(f"{path}: not a file")
        count = 0
        try:
            with path.open(encoding="utf-8") as handle:
                for number, line in enumerate(handle, start=1):
                    if not line.strip():
                        continue
                    try:
                        record = parse_record(json.loads(line))
                    except json.JSONDecodeError as error:
                        raise InputError(
                            f"{path}:{number}: malformed line, not JSON "
                            f"({error.msg}, column {error.colno}): {_clip(line)}"
                        ) from None
                    except ValueError as error:
                        raise InputError(f"{path}:{number}: malformed record: {error}") from None
                    count += 1
                    if isinstance(record, BucketRecord):
                        key = (record.step, record.bucket, record.parameter)
                        duplicates += key in records
                        records[key] = record
                    else:
                        duplicates += record[0] in global_min_norm
                        global_min_norm[record[0]] = record[1]
        except UnicodeDecodeError as error:
            raise InputError(f"{path}: not UTF-8 text ({error.reason})") from None
        except OSError as error:
            raise InputError(f"{path}: cannot read ({error.strerror or error})") from None
        if count == 0:
            raise InputError(f"{path}: empty file (no diagnostics records)")
    if not records:
        names = ", ".join(str(path) for path in paths)
        raise InputError(f"{names}: no bucket records (only global min-norm lines)")
    return Run(list(records.values()), global_min_norm, len(paths), duplicates)


def last_steps(run: Run, count: int | None) -> Run:
    """The records of the last ``count`` steps (all with ``None``)."""
    if count is None:
        return run
    steps = sorted({r.step for r in run.records} | set(run.global_min_norm))
    keep = set(steps[-count:])
    return Run(
        [r for r in run.records if r.step in keep],
        {step: value for step, value in run.global_min_norm.items() if step in keep},
        run.files,
        run.duplicates,
    )


# --------------------------------------------------------------------------------------------
# Statistics


@dataclass
class Mean:
    total: float = 0.0
    count: int = 0

    def add(self, value: float) -> None:
        if math.isfinite(value):
            self.total += value
            self.count += 1

    @property
    def value(self) -> float:
        return self.total / self.count if self.count else math.nan


@dataclass
class Stats:
    """Everything the plots and the summary show, in one pass over the records."""

    objectives: list[str]  # sorted by name
    steps: list[int]
    buckets: list[int]
    threshold: float
    # bucket → [N, N] sum and count of the pair cosines (N = all objectives)
    cosine_sum: dict[int, np.ndarray] = field(default_factory=dict)
    cosine_count: dict[int, np.ndarray] = field(default_factory=dict)
    bucket_steps: dict[int, set[int]] = field(default_factory=lambda: defaultdict(set))
    bucket_parameters: dict[int, set[int]] = field(default_factory=lambda: defaultdict(set))
    pair_mean: dict[Pair, Mean] = field(default_factory=lambda: defaultdict(Mean))
    pair_step_mean: dict[Pair, dict[int, Mean]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(Mean))
    )
    weights: dict[str, dict[int, list[float]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(list))
    )
    update_norm: dict[int, Mean] = field(default_factory=lambda: defaultdict(Mean))
    conflict: dict[tuple[int, int], bool] = field(default_factory=dict)  # (step, bucket) → bool
    global_min_norm: dict[int, float] = field(default_factory=dict)


def compute(run: Run, threshold: float) -> Stats:
    objectives = sorted({name for r in run.records for name in r.objectives}, key=_natural)
    index = {name: i for i, name in enumerate(objectives)}
    steps = sorted({r.step for r in run.records} | set(run.global_min_norm))
    buckets = sorted({r.bucket for r in run.records})
    stats = Stats(objectives, steps, buckets, threshold, global_min_norm=run.global_min_norm)
    num = len(objectives)
    for bucket in buckets:
        stats.cosine_sum[bucket] = np.zeros((num, num))
        stats.cosine_count[bucket] = np.zeros((num, num), dtype=int)
    for r in sorted(run.records, key=lambda r: (r.step, r.bucket, r.parameter or 0)):
        stats.bucket_steps[r.bucket].add(r.step)
        if r.parameter is not None:
            stats.bucket_parameters[r.bucket].add(r.parameter)
        at = [index[name] for name in r.objectives]
        finite = np.isfinite(r.cosine)
        grid = np.ix_(at, at)
        stats.cosine_sum[r.bucket][grid] += np.where(finite, r.cosine, 0.0)
        stats.cosine_count[r.bucket][grid] += finite
        in_conflict = False
        for a, b in zip(*np.triu_indices(len(at), k=1), strict=True):
            value = float(r.cosine[a, b])
            pair = _pair(r.objectives[a], r.objectives[b], index)
            stats.pair_mean[pair].add(value)
            stats.pair_step_mean[pair][r.step].add(value)
            in_conflict |= value < threshold
        key = (r.step, r.bucket)
        stats.conflict[key] = stats.conflict.get(key, False) or in_conflict
        for name, weight in zip(r.objectives, r.weights, strict=True):
            stats.weights[name][r.step].append(float(weight))
        stats.update_norm[r.step].add(r.update_norm)
    return stats


def _natural(name: str) -> tuple[bool, int, str]:
    """Names alphabetically, numeric ids (the default objective ids) by value and first."""
    return (not name.isdigit(), int(name) if name.isdigit() else 0, name)


def _pair(a: str, b: str, index: dict[str, int]) -> Pair:
    return (a, b) if index[a] < index[b] else (b, a)


def ranked_pairs(stats: Stats) -> list[tuple[Pair, float]]:
    """Pairs by mean cosine, most conflicting first (pairs with no finite value left out)."""
    means = [(pair, mean.value) for pair, mean in stats.pair_mean.items() if mean.count]
    return sorted(means, key=lambda item: item[1])


def pair_label(pair: Pair) -> str:
    return f"{pair[0]}–{pair[1]}"


def bucket_label(stats: Stats, bucket: int) -> str:
    name = "whole model" if bucket == WHOLE_MODEL else f"bucket {bucket}"
    parameters = len(stats.bucket_parameters.get(bucket, ()))
    return f"{name} ({parameters} params)" if parameters else name


def step_range(steps: Sequence[int]) -> str:
    return f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}–{steps[-1]}"


# --------------------------------------------------------------------------------------------
# Plots


def new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)  # render with Agg, independent of any pyplot backend
    return figure


def save(figure: Figure, path: Path) -> None:
    figure.savefig(path, dpi=DPI)


def plot_cosine_heatmap(stats: Stats, path: Path) -> None:
    num = len(stats.objectives)
    panels = len(stats.buckets)
    cols = panels if panels <= 4 else math.ceil(math.sqrt(panels))
    rows = math.ceil(panels / cols)
    # Panel side in inches: ~0.45 in a cell for a few objectives, smaller for many, and the
    # whole grid at most ~28 in wide.
    side = min(6.0, max(2.4, (0.45 if num <= 8 else 0.3) * num + 1.1), max(1.2, 28 / cols))
    figure = new_figure(cols * side + 1.4, rows * side + 0.9)
    axes = figure.subplots(rows, cols, squeeze=False)
    colormap = matplotlib.colormaps["RdBu_r"].copy()
    colormap.set_bad("#d9d9d9")  # pairs never present together
    cell = 72 * (side - 1.0) / num  # points
    tick_font = min(9.0, max(4.0, 0.6 * cell))
    annotate = num <= 8 and cell >= 18
    same_steps = len({len(stats.bucket_steps[bucket]) for bucket in stats.buckets}) == 1
    means = {}
    for bucket in stats.buckets:
        count = stats.cosine_count[bucket]
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(count > 0, stats.cosine_sum[bucket] / np.maximum(count, 1), np.nan)
        np.fill_diagonal(mean, np.nan)  # always 1: it would set the scale and say nothing
        means[bucket] = mean
    # One symmetric scale for every panel, set by the off-diagonal values.
    finite = [abs(v) for m in means.values() for v in m.ravel() if math.isfinite(v)]
    limit = min(1.0, max(0.05, max(finite, default=1.0)))
    image = None
    for position, (ax, bucket) in enumerate(zip(axes.flat, stats.buckets, strict=False)):
        mean = means[bucket]
        image = ax.imshow(
            np.ma.masked_invalid(mean),
            cmap=colormap,
            vmin=-limit,
            vmax=limit,
            interpolation="none",
        )
        # Names on the outer panels only: the left column and the lowest panel of each column.
        ax.set_xticks(range(num), stats.objectives, rotation=90 if num > 6 else 45)
        ax.set_yticks(range(num), stats.objectives)
        ax.tick_params(
            length=0,
            labelsize=tick_font,
            labelbottom=position + cols >= panels,
            labelleft=position % cols == 0,
        )
        title = bucket_label(stats, bucket)
        if not same_steps:
            title += f", {len(stats.bucket_steps[bucket])} steps"
        ax.set_title(title, fontsize=min(10.0, max(5.0, 3.5 * side)))
        if annotate:
            for (i, j), value in np.ndenumerate(mean):
                if math.isfinite(value):
                    color = "white" if abs(value) > 0.6 * limit else "black"
                    ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color=color)
    for ax in axes.flat[panels:]:
        ax.set_axis_off()
    if image is not None:
        colorbar = figure.colorbar(
            image, ax=axes.ravel().tolist(), shrink=min(0.9, 3 / rows), aspect=25
        )
        colorbar.set_label(f"mean cosine similarity (scale ±{limit:.2g})")
    figure.suptitle(
        f"Objective-pair cosine similarity per bucket, mean over {step_range(stats.steps)}"
        "\n(grey: the diagonal, and pairs never present together)",
        fontsize=11,
    )
    save(figure, path)


def _colors(count: int) -> list[Any]:
    if count <= 10:
        return [matplotlib.colormaps["tab10"](i) for i in range(count)]
    if count <= 20:
        dark_first = [*range(0, 20, 2), *range(1, 20, 2)]
        return [matplotlib.colormaps["tab20"](i) for i in dark_first[:count]]
    return list(matplotlib.colormaps["nipy_spectral"](np.linspace(0.02, 0.95, count)))


def _smoothing_note(stats: Stats) -> str:
    steps = len(stats.steps)
    if steps <= SMOOTH_FROM:
        return ""
    return f"\ntrailing mean over {max(3, steps // 25)} steps (faint: per step)"


def _legend_outside(ax: Axes, count: int, title: str | None = None) -> None:
    ax.legend(
        title=title,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=8,
        ncols=max(1, math.ceil(count / 25)),
        frameon=False,
    )


def _smoothed(values: Sequence[float], steps: int) -> list[float] | None:
    """A trailing mean over ``max(3, steps // 25)`` points when a series is too long to read
    point by point (over ``SMOOTH_FROM`` steps), else ``None``. NaNs are skipped."""
    if steps <= SMOOTH_FROM:
        return None
    window = max(3, steps // 25)
    series = np.asarray(values, dtype=float)
    out = []
    for end in range(1, len(series) + 1):
        part = series[max(0, end - window) : end]
        part = part[np.isfinite(part)]
        out.append(float(part.mean()) if part.size else math.nan)
    return out


def _plot_series(
    ax: Axes, steps: Sequence[int], values: Sequence[float], **style: Any
) -> list[Any]:
    """``values`` over ``steps``: as they are, or faint beneath their trailing mean when long."""
    smooth = _smoothed(values, len(steps))
    if smooth is None:
        return ax.plot(steps, values, marker="o" if len(steps) <= 40 else None, **style)
    faint = {k: v for k, v in style.items() if k in ("color", "zorder")}
    ax.plot(steps, values, alpha=0.25, linewidth=0.6, **faint)
    return ax.plot(steps, smooth, **style)


def _time_axis(ax: Axes) -> None:
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def plot_weights(stats: Stats, path: Path) -> None:
    figure = new_figure(10, 5)
    ax = figure.subplots()
    band = min(0.2, 0.9 / len(stats.objectives))  # fainter bands when there are many
    for name, color in zip(stats.objectives, _colors(len(stats.objectives)), strict=True):
        steps, mean, low, high = [], [], [], []
        for step, values in sorted(stats.weights[name].items()):
            finite = [v for v in values if math.isfinite(v)]
            if finite:
                steps.append(step)
                mean.append(sum(finite) / len(finite))
                low.append(min(finite))
                high.append(max(finite))
        _plot_series(ax, steps, mean, color=color, label=name, markersize=3, linewidth=1.4)
        ax.fill_between(steps, low, high, color=color, alpha=band, linewidth=0)
    _time_axis(ax)
    ax.set_ylabel("weight")
    ax.set_title(
        "Weight per objective: mean over buckets (band: min–max across buckets)"
        + _smoothing_note(stats)
    )
    _legend_outside(ax, len(stats.objectives), "objective")
    save(figure, path)


def plot_conflict_share(stats: Stats, path: Path) -> None:
    figure = new_figure(10, 5)
    ax = figure.subplots()
    flags: dict[int, list[bool]] = defaultdict(list)
    for (step, _), in_conflict in stats.conflict.items():
        flags[step].append(in_conflict)
    steps = sorted(flags)
    share = [sum(flags[step]) / len(flags[step]) for step in steps]
    red = "tab:red"
    ax.fill_between(steps, share, color=red, alpha=0.15, linewidth=0)
    handles = _plot_series(
        ax, steps, share, color=red, markersize=3, label="share of buckets in conflict"
    )
    ax.set_ylim(0, 1.05)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_ylabel(f"buckets with a pair cosine < {stats.threshold:g}", color=red)
    ax.tick_params(axis="y", colors=red)
    _time_axis(ax)

    right = ax.twinx()
    norms: list[float] = []
    if stats.global_min_norm:
        global_steps = sorted(stats.global_min_norm)
        values = [stats.global_min_norm[step] for step in global_steps]
        norms += values
        handles += _plot_series(
            right,
            global_steps,
            values,
            color="black",
            markersize=3,
            linewidth=1.4,
            label="global min-norm  min‖Σ w g‖ (whole model)",
        )
    update_steps = [step for step in sorted(stats.update_norm) if stats.update_norm[step].count]
    values = [stats.update_norm[step].value for step in update_steps]
    norms += values
    handles += _plot_series(
        right,
        update_steps,
        values,
        color="tab:blue",
        linestyle="--",
        markersize=3,
        label="mean per-bucket update norm ‖d‖",
    )
    right.set_ylabel("norm")
    finite = [v for v in norms if math.isfinite(v)]
    if finite and min(finite) > 0 and max(finite) / min(finite) >= 100:
        right.set_yscale("log")
    else:
        right.set_ylim(bottom=0)
    ax.set_title(
        f"Buckets in conflict (some pair cosine < {stats.threshold:g}) and update norms per step"
        + _smoothing_note(stats)
    )
    ax.legend(
        handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncols=3, frameon=False
    )
    save(figure, path)


def plot_pair_cosine(stats: Stats, path: Path) -> None:
    figure = new_figure(10, 5.5)
    ax = figure.subplots()
    ranked = ranked_pairs(stats)
    named, others = ranked[:LEGEND_PAIRS], ranked[LEGEND_PAIRS:]

    def series(pair: Pair) -> tuple[list[int], list[float]]:
        by_step = stats.pair_step_mean[pair]
        steps = [step for step in sorted(by_step) if by_step[step].count]
        return steps, [by_step[step].value for step in steps]

    for pair, _ in others:
        _plot_series(ax, *series(pair), color="0.75", linewidth=0.8, zorder=1)
    for (pair, mean), color in zip(named, _colors(len(named)), strict=True):
        _plot_series(
            ax,
            *series(pair),
            color=color,
            markersize=3,
            linewidth=1.4,
            zorder=2,
            label=f"{pair_label(pair)}  ({mean:+.2f})",
        )
    if others:
        ax.plot([], [], color="0.75", linewidth=0.8, label=f"{len(others)} other pairs")
    ax.axhline(stats.threshold, color="black", linestyle=":", linewidth=1)
    if not ranked:
        ax.text(0.5, 0.5, "no pair with a finite cosine", transform=ax.transAxes, ha="center")
    _time_axis(ax)
    ax.set_ylabel("cosine similarity (mean over buckets)")
    ax.set_title(
        "Cosine per objective pair over steps (mean over buckets; dotted: conflict threshold)"
        + _smoothing_note(stats)
    )
    if ranked:
        _legend_outside(ax, len(named) + bool(others), "pair (mean cosine)")
    save(figure, path)


PLOTS = {
    "cosine_heatmap.png": plot_cosine_heatmap,
    "weights_over_time.png": plot_weights,
    "conflict_share.png": plot_conflict_share,
    "pair_cosine_over_time.png": plot_pair_cosine,
}


# --------------------------------------------------------------------------------------------
# Summary and command line


def _ids(ids: Sequence[int]) -> str:
    if len(ids) > 3 and list(ids) == list(range(ids[0], ids[-1] + 1)):
        return f"{ids[0]}–{ids[-1]}"
    return ", ".join(str(i) for i in ids)


def _names(names: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names) - limit} more)" if len(names) > limit else "")


def summary(run: Run, stats: Stats, selected: int | None) -> str:
    duplicates = f"; {run.duplicates} repeated records counted once" if run.duplicates else ""
    selection = f" (the last {selected} selected)" if selected is not None else ""
    buckets = [b for b in stats.buckets if b != WHOLE_MODEL]
    bucket_text = f"{len(buckets)} ({_ids(buckets)})" if buckets else "0"
    if WHOLE_MODEL in stats.buckets:
        bucket_text += " + whole model (global granularity)"
    if stats.bucket_parameters:
        bucket_text += (
            f"; per-parameter records in bucket(s) {_ids(sorted(stats.bucket_parameters))}"
        )
    in_conflict = sum(stats.conflict.values())
    share = in_conflict / len(stats.conflict)
    ranked = ranked_pairs(stats)
    if ranked:
        pair, mean = ranked[0]
        most = (
            f"{pair_label(pair)}, mean cosine {mean:+.3f} "
            f"over {stats.pair_mean[pair].count} bucket records"
        )
    else:
        most = "none (no pair with a finite cosine)"
    return "\n".join(
        [
            f"records: {len(run.records)} bucket records, {len(run.global_min_norm)} global "
            f"min-norm values, from {run.files} file(s){duplicates}",
            f"steps: {len(stats.steps)} ({step_range(stats.steps)}){selection}",
            f"buckets: {bucket_text}",
            f"objectives: {len(stats.objectives)} ({_names(stats.objectives)})",
            f"buckets in conflict (some pair cosine < {stats.threshold:g}): {share:.1%} "
            f"({in_conflict} of {len(stats.conflict)} bucket-steps)",
            f"most conflicting pair: {most}",
        ]
    )


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Plot bucketmoo_hooks.Diagnostics JSON lines (per-bucket cosine heatmaps, "
        "weights, conflict share, pair cosines over time) and print a summary.",
    )
    parser.add_argument(
        "files", nargs="+", type=Path, metavar="FILE", help="diagnostics JSON-lines file(s)"
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="folder for the PNGs (created if missing)"
    )
    parser.add_argument(
        "--last-steps",
        type=_positive,
        metavar="N",
        help="only the last N steps (every plot and the summary; default: all steps)",
    )
    parser.add_argument(
        "--conflict-threshold",
        type=_finite,
        default=0.0,
        metavar="C",
        help="a bucket is in conflict when some pair cosine is below C (default: 0)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    if isinstance(sys.stdout, io.TextIOWrapper):  # names and dashes on any terminal
        sys.stdout.reconfigure(errors="replace")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run = last_steps(load(args.files), args.last_steps)
    except InputError as error:
        parser.error(str(error))
    if not run.records:
        parser.error(f"no bucket records in the last {args.last_steps} steps")
    stats = compute(run, args.conflict_threshold)
    written = []
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        for name, plot in PLOTS.items():
            plot(stats, args.out / name)
            written.append(str(args.out / name))
    except OSError as error:
        parser.error(f"{args.out}: cannot write the plots ({error.strerror or error})")
    print(summary(run, stats, args.last_steps))
    print(f"wrote: {', '.join(written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
