"""Time one bucket's weighting solve (Gramians → weights), the hook's per-bucket host work.

    python benchmarks/weighting_solve.py [--device cuda] [--segments 1,8] [--graph]
        [--out benchmarks/results]

Times what the core runs per bucket, :func:`~bucketmoo_hooks._absent.solve_weights` on ``S``
Gramians (``S > 1``: ``granularity="parameter"`` with ``S`` parameters in the bucket; every
objective present), each with its own problem key. Prints a Markdown table (median and 90th
percentile over repeats, per weighting, number of objectives ``L`` and ``S``) and writes it with
the machine, date and command to ``--out``.

``--graph`` (CUDA): also the replay of a CUDA graph of the same solve, captured once per
(weighting, L, S) on a static input. The eager solve is launch-bound (hundreds of small kernels,
``benchmarks/solver_ops.py``); a replay launches them all at once. pcgrad, gradvac and nash_mtl
copy host data per call (seeds, state indices): their replays time the same kernels but would
read the captured host data, so the hook could not replay them as they are.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bucketmoo_hooks._absent import solve_weights
from bucketmoo_hooks.weightings import WeightingContext, get_weighting, weighting_names

# Read host data per call (see the module docstring): their graphs replay stale inputs.
HOST_INPUTS = ("gradvac", "nash_mtl", "pcgrad")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def gramians(num_objectives: int, segments: int, device: str) -> torch.Tensor:
    """``[S, L, L]``: languages share a component and differ, the usual shape of multilingual
    gradients."""
    generator = torch.Generator().manual_seed(num_objectives)
    grads = 3 * torch.randn(segments, 1, 4096, generator=generator)
    grads = grads + torch.randn(segments, num_objectives, 4096, generator=generator)
    return (grads @ grads.mT).to(device)


def solver(name: str, g: torch.Tensor) -> Callable[[], object]:
    """One bucket's solve, as the core calls it."""
    weighting = get_weighting(name)
    objectives = tuple(range(g.shape[-1]))
    contexts = [WeightingContext(1, 0, objectives, s, (s,)) for s in range(g.shape[0])]
    problems = list(range(g.shape[0]))
    return lambda: solve_weights(weighting, g, None, contexts, problems)


def graphed(solve: Callable[[], object]) -> Callable[[], object]:
    """``solve`` captured in a CUDA graph (after warm-up on a side stream); returns the replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            solve()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        solve()
    return graph.replay


def time_calls(call: Callable[[], object], cuda: bool, repeats: int) -> list[float]:
    for _ in range(5):
        call()
    samples = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        call()
        if cuda:
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return sorted(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--objectives", default="2,3,4,8,16")
    parser.add_argument("--segments", default="1", help="Gramians per bucket, comma-separated")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--graph", action="store_true", help="CUDA: also replay a CUDA graph")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    cuda = args.device.startswith("cuda")
    if args.graph and not cuda:
        raise SystemExit("--graph needs --device cuda")

    rows = []
    for name in weighting_names():
        for num_objectives in (int(x) for x in args.objectives.split(",")):
            for segments in (int(x) for x in args.segments.split(",")):
                solve = solver(name, gramians(num_objectives, segments, args.device))
                samples = time_calls(solve, cuda, args.repeats)
                row = {
                    "weighting": name,
                    "L": num_objectives,
                    "S": segments,
                    "median_us": 1e6 * statistics.median(samples),
                    "p90_us": 1e6 * samples[int(0.9 * len(samples))],
                    "graph_median_us": None,
                    "graph_error": None,
                }
                if args.graph:
                    try:
                        replay = graphed(solve)
                    except Exception as error:  # a solver op that cannot be captured
                        row["graph_error"] = f"{type(error).__name__}: {error}".splitlines()[0]
                    else:
                        graph_samples = time_calls(replay, cuda, args.repeats)
                        row["graph_median_us"] = 1e6 * statistics.median(graph_samples)
                rows.append(row)

    device_name = torch.cuda.get_device_name() if cuda else cpu_model()
    header = (
        f"Weighting solve time per bucket (S Gramians), device {args.device} ({device_name}), "
        f"torch {torch.__version__}, 1 thread, {args.repeats} repeats\n\n"
        "| weighting | L | S | median µs | p90 µs | graph replay µs |\n"
        "|---|---|---|---|---|---|\n"
    )

    def graph_cell(row: dict) -> str:
        if row["graph_error"] is not None:
            return f"capture failed: {row['graph_error'][:60]}"
        if row["graph_median_us"] is None:
            return "—"
        stale = " (host inputs)" if row["weighting"] in HOST_INPUTS else ""
        return f"{row['graph_median_us']:.0f}{stale}"

    table = header + "\n".join(
        f"| {r['weighting']} | {r['L']} | {r['S']} | {r['median_us']:.0f} | {r['p90_us']:.0f} | "
        f"{graph_cell(r)} |"
        for r in rows
    )
    print(table)

    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"weighting_solve_{args.device.split(':')[0]}"
    load = os.getloadavg()[0]
    meta = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python", *sys.argv]),
        "machine": f"{device_name}, {os.cpu_count()} cores, {platform.machine()}",
        "torch": torch.__version__,
        "load_average_1min": load,
    }
    stem.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    footer = (
        f"\n\nMachine: {meta['machine']}; load average {load:.2f}; date {meta['date']}; "
        f"command `{meta['command']}`\n"
    )
    stem.with_suffix(".md").write_text(table + footer)


if __name__ == "__main__":
    main()
