"""Time the fused CUDA kernels against the torch path, per (R, L, c, dtype).

    python benchmarks/kernel_bench.py [--quick] [--out benchmarks/results]

Needs a CUDA device and CuPy. For each configuration, with S ∈ [R, c] and the MGDA weighting:

- kernel 1 (partial Gramians: one pass over S, plus the reduction of the partials) and kernel 2
  (MGDA on the device + combine: one more pass over S, writes d), and both together;
- the device time per call (CUDA events, the stream kept busy while the calls are queued, so host
  launch overhead is excluded) and the wall time per call (eager loop: what a lone hook sees);
- the achieved bandwidth, bytes that must move / device time (kernel 1 reads R·c·b bytes, kernel 2
  reads R·c·b and writes c·b), and its ratio to the device's copy bandwidth, measured here as a
  1 GiB device-to-device copy (bytes read + written);
- the speed-up of both kernels over the torch path (objective_shards, partial_gramians, MGDA,
  combine_segments: what ``kernels="torch"`` runs), in device time and in wall time.

S is rotated among copies totalling ≥ 4× the L2 cache, so no pass is served from L2. Targets (the
CUDA kernels issue): ≥ 80 % of copy bandwidth for c ≥ 2²², and both kernels ≥ 2× faster than the
torch path at 25 MB buckets (DDP's default ``bucket_cap_mb``). Writes JSON and Markdown, with the
device and date, to ``--out``.
"""

import argparse
import datetime
import itertools
import json
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bucketmoo_hooks import ObjectiveMap
from bucketmoo_hooks._absent import solve_weights
from bucketmoo_hooks._kernels import fused_kernels
from bucketmoo_hooks._linalg import combine_segments, objective_shards, partial_gramians
from bucketmoo_hooks.weightings import MGDA, WeightingContext

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BUCKET_BYTES = 25 * 2**20


def config(ranks: int, objectives: int, columns: int, dtype: str, bucket: str = "") -> dict:
    return {"ranks": ranks, "objectives": objectives, "columns": columns, "dtype": dtype,
            "bucket": bucket}  # fmt: skip


def sweep(quick: bool) -> list[dict]:
    """The configurations: a grid over (R, L), c and dtype, the largest slices, 25 MB buckets."""
    pairs = [(2, 2), (8, 2), (8, 4), (8, 8), (16, 4), (16, 16), (64, 8), (64, 16)]
    exponents = [16, 20, 22, 24]
    dtypes = list(DTYPES)
    largest = [(2, 2), (8, 4)]
    if quick:
        pairs, exponents, dtypes, largest = [(8, 4), (16, 16)], [20, 22], ["bf16"], [(2, 2)]
    configs = [
        config(*pair, 2**exponent, dtype)
        for pair, exponent, dtype in itertools.product(pairs, exponents, dtypes)
    ]
    configs += [config(*pair, 2**26, "bf16") for pair in largest]
    for pair, dtype in itertools.product(pairs, dtypes):
        numel = BUCKET_BYTES // DTYPES[dtype].itemsize
        configs.append(config(*pair, -(-numel // pair[0]), dtype, "25MB"))
    return configs


class Timer:
    """Device time (stream kept busy by a sleep kernel while calls are queued) and wall time."""

    def __init__(self) -> None:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        cycles = 50_000_000
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        self.cycles_per_second = cycles / (start.elapsed_time(end) / 1e3)

    def __call__(self, fn: Callable[[], object], repeats: int) -> tuple[float, float]:
        fn()
        torch.cuda.synchronize()
        wall = time.perf_counter()
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - wall) / repeats
        samples = []
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(int(2 * wall * repeats * self.cycles_per_second))
            start.record()
            for _ in range(repeats):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3 / repeats)
        return statistics.median(samples), wall


def copy_bandwidth(timer: Timer) -> float:
    """Bytes read + written per second by a 1 GiB device-to-device copy."""
    source = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    seconds, _ = timer(lambda: target.copy_(source), 10)
    return 2 * source.numel() / seconds


def measure(config: dict, timer: Timer, copy_bw: float, l2_bytes: int) -> dict:
    ranks, num, columns = config["ranks"], config["objectives"], config["columns"]
    dtype = DTYPES[config["dtype"]]
    ids = [r % num for r in range(ranks)]
    objective_map = ObjectiveMap.from_ids(ids)
    averaging = objective_map.averaging_matrix("cuda")
    nbytes = ranks * columns * dtype.itemsize
    copies = [
        torch.randn(ranks, columns, device="cuda").to(dtype)
        for _ in range(min(64, -(-4 * l2_bytes // nbytes)))
    ]
    rotation = itertools.cycle(copies)
    weighting = MGDA()
    contexts = [WeightingContext(0, 0, objective_map.objectives)]
    gramians = {id(s): fused_kernels("cuda", s, averaging, None).partial_gramians() for s in copies}

    def kernel1() -> object:
        return fused_kernels("cuda", next(rotation), averaging, None).partial_gramians()

    def kernel2() -> object:
        shards = next(rotation)
        fused = fused_kernels("cuda", shards, averaging, None)
        return fused.combine(gramians[id(shards)], weighting, None)

    def both() -> object:
        fused = fused_kernels("cuda", next(rotation), averaging, None)
        return fused.combine(fused.partial_gramians(), weighting, None)

    def torch_path() -> torch.Tensor:
        objectives = objective_shards(next(rotation), averaging)
        segment = [(0, columns)]
        gramians = partial_gramians(objectives, segment)
        weights, _ = solve_weights(weighting, gramians, None, contexts, [0])
        return combine_segments(weights, objectives, segment, dtype)

    repeats = 20 if nbytes < 2**28 else 5
    result = dict(config)
    for name, fn in [("k1", kernel1), ("k2", kernel2), ("both", both), ("torch", torch_path)]:
        result[f"{name}_us"], result[f"{name}_wall_us"] = (1e6 * t for t in timer(fn, repeats))
    moved = {"k1": nbytes, "k2": nbytes + columns * dtype.itemsize}
    moved["both"] = moved["k1"] + moved["k2"]
    for name, count in moved.items():
        bandwidth = count / (result[f"{name}_us"] / 1e6)
        result[f"{name}_gbps"] = bandwidth / 1e9
        result[f"{name}_of_copy"] = bandwidth / copy_bw
    result["speedup"] = result["torch_us"] / result["both_us"]
    result["speedup_wall"] = result["torch_wall_us"] / result["both_wall_us"]
    # Sanity: the two paths agree on one copy (the rotation makes both start from the same one).
    rotation = itertools.cycle(copies)
    fused_update = both()[1].float()
    rotation = itertools.cycle(copies)
    reference = torch_path().float()
    scale = reference.abs().max().clamp_min(1e-30)
    result["max_rel_diff"] = ((fused_update - reference).abs().max() / scale).item()
    return result


COLUMNS = [
    ("R", "ranks"), ("L", "objectives"), ("c", "columns"), ("dtype", "dtype"), ("bucket", "bucket"),
    ("k1 µs", "k1_us"), ("k1 GB/s", "k1_gbps"), ("k1/copy", "k1_of_copy"),
    ("k2 µs", "k2_us"), ("k2 GB/s", "k2_gbps"), ("k2/copy", "k2_of_copy"),
    ("both µs", "both_us"), ("both/copy", "both_of_copy"), ("both wall µs", "both_wall_us"),
    ("torch µs", "torch_us"), ("torch wall µs", "torch_wall_us"),
    ("speed-up", "speedup"), ("speed-up wall", "speedup_wall"), ("max rel diff", "max_rel_diff"),
]  # fmt: skip


def cell(value: object) -> str:
    if isinstance(value, float):
        return (
            f"{value:.3g}"
            if abs(value) < 1e-2 or abs(value) >= 1e4
            else f"{value:.3f}".rstrip("0").rstrip(".")
        )
    return str(value)


def summary(rows: list[dict]) -> list[str]:
    large = [r for r in rows if r["columns"] >= 2**22]
    bucket = [r for r in rows if r["bucket"] == "25MB"]
    lines = []
    if large:
        worst = min(large, key=lambda r: min(r["k1_of_copy"], r["k2_of_copy"]))
        ratio = min(worst["k1_of_copy"], worst["k2_of_copy"])
        lines.append(
            f"- c ≥ 2²²: lowest kernel bandwidth {ratio:.0%} of copy (target ≥ 80 %: "
            f"{'met' if ratio >= 0.8 else 'NOT met'}), at R={worst['ranks']}, "
            f"L={worst['objectives']}, c={worst['columns']}, {worst['dtype']}"
        )
    if bucket:
        worst = min(bucket, key=lambda r: r["speedup"])
        lines.append(
            f"- 25 MB buckets: lowest speed-up over the torch path {worst['speedup']:.1f}× in "
            f"device time, {min(r['speedup_wall'] for r in bucket):.1f}× in wall time (target "
            f"≥ 2×: {'met' if worst['speedup'] >= 2 else 'NOT met'}), at R={worst['ranks']}, "
            f"L={worst['objectives']}, {worst['dtype']}"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few configurations only")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("kernel_bench needs a CUDA device")
    import cupy

    torch.manual_seed(0)
    properties = torch.cuda.get_device_properties(0)
    timer = Timer()
    copy_bw = copy_bandwidth(timer)
    meta = {
        "device": properties.name,
        "multiprocessors": properties.multi_processor_count,
        "l2_bytes": properties.L2_cache_size,
        "copy_gbps": copy_bw / 1e9,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cupy": cupy.__version__,
        "command": " ".join(["python", *sys.argv]),
    }
    print(f"{meta['device']}: copy bandwidth {meta['copy_gbps']:.0f} GB/s (read + write)")
    rows = []
    for config in sweep(args.quick):
        row = measure(config, timer, copy_bw, properties.L2_cache_size)
        rows.append(row)
        print(" ".join(f"{head}={cell(row[key])}" for head, key in COLUMNS), flush=True)
        torch.cuda.empty_cache()
    lines = summary(rows)
    print("\n".join(lines))

    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / (
        "kernel_bench_" + re.sub(r"[^a-z0-9]+", "_", meta["device"].lower()).strip("_")
    )
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    table = [
        "| " + " | ".join(head for head, _ in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
        *("| " + " | ".join(cell(row[key]) for _, key in COLUMNS) + " |" for row in rows),
    ]
    stem.with_suffix(".md").write_text(
        f"# Fused kernels vs the torch path on {meta['device']}\n\n"
        f"{meta['date']}, torch {meta['torch']}, CuPy {meta['cupy']}, `{meta['command']}`. "
        f"Copy bandwidth {meta['copy_gbps']:.0f} GB/s (1 GiB device-to-device, read + write). "
        "µs: device time per call; wall: eager loop per call. MGDA weighting.\n\n"
        + "\n".join(lines) + "\n\n" + "\n".join(table) + "\n"
    )  # fmt: skip
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
