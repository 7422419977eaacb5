"""Time one weighting solve (Gramian → weights) per bucket, the hook's per-bucket host work.

    python benchmarks/weighting_solve.py [--device cuda] [--out benchmarks/results]

Prints a Markdown table (median and 90th percentile over repeats, per weighting and number of
objectives L) and writes it with the machine, date and command to ``--out``.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from bucketmoo_hooks.weightings import duality_gap, get_weighting, weighting_names


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def gramian(num_objectives: int, device: str) -> torch.Tensor:
    """Languages share a component and differ: the usual shape of multilingual gradients."""
    generator = torch.Generator().manual_seed(num_objectives)
    grads = 3 * torch.randn(1, 4096, generator=generator)
    grads = grads + torch.randn(num_objectives, 4096, generator=generator)
    return (grads @ grads.T).to(device)


def time_solve(name: str, g: torch.Tensor, repeats: int) -> list[float]:
    weighting = get_weighting(name)
    for _ in range(5):
        weighting(g)
    samples = []
    for _ in range(repeats):
        if g.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        weighting(g)
        if g.is_cuda:
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--objectives", default="2,3,4,8,16")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    rows = []
    for name in weighting_names():
        for num_objectives in (int(x) for x in args.objectives.split(",")):
            g = gramian(num_objectives, args.device)
            samples = sorted(time_solve(name, g, args.repeats))
            # Only MGDA solves the min-norm problem; its duality gap is its accuracy.
            gap = duality_gap(g, get_weighting(name)(g)).item() if name == "mgda" else None
            rows.append(
                {
                    "weighting": name,
                    "L": num_objectives,
                    "median_us": 1e6 * statistics.median(samples),
                    "p90_us": 1e6 * samples[int(0.9 * len(samples))],
                    "min_norm_gap": gap,
                }
            )

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else cpu_model()
    header = (
        f"Weighting solve time per bucket, device {args.device} ({device_name}), "
        f"torch {torch.__version__}, 1 thread, {args.repeats} repeats\n\n"
        "| weighting | L | median µs | p90 µs | MGDA duality gap |\n|---|---|---|---|---|\n"
    )
    table = header + "\n".join(
        f"| {r['weighting']} | {r['L']} | {r['median_us']:.0f} | {r['p90_us']:.0f} | "
        f"{'—' if r['min_norm_gap'] is None else format(r['min_norm_gap'], '.1e')} |"
        for r in rows
    )
    print(table)

    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"weighting_solve_{args.device}"
    meta = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python", *sys.argv]),
        "machine": f"{device_name}, {os.cpu_count()} cores, {platform.machine()}",
        "torch": torch.__version__,
    }
    stem.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    footer = f"\n\nMachine: {meta['machine']}; date {meta['date']}; command `{meta['command']}`\n"
    stem.with_suffix(".md").write_text(table + footer)


if __name__ == "__main__":
    main()
