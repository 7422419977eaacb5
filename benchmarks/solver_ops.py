"""Count the ATen ops of one bucket's weighting solve with the accelerator's code path forced.

    python benchmarks/solver_ops.py [--objectives 2,4,8,16] [--segments 1,8] [--out DIR]

On a GPU every op the solver dispatches (views aside) is a kernel launch, and a bucket's solve
runs on the autograd thread, so the count is the solve's launch cost: ``ops × 5-10 µs``. The
count is taken on the CPU under :func:`~bucketmoo_hooks._device_path.force_device_path` (no early
stop at fixed points: the fixed work a GPU runs), for ``S`` segments solved as the core solves
them with ``granularity="parameter"`` (:func:`~bucketmoo_hooks._absent.solve_weights`, every
objective present). Batching means the count does not grow with ``S``.
"""

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bucketmoo_hooks._absent import solve_weights
from bucketmoo_hooks._device_path import force_device_path
from bucketmoo_hooks.weightings import WeightingContext, get_weighting, weighting_names

# Not flagged as views, but metadata only: no kernel on any device.
_METADATA = frozenset(
    {"aten::_unsafe_view", "aten::lift_fresh", "aten::squeeze_", "aten::unsqueeze_", "aten::t_"}
)


class OpCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched inside the block; ``launches`` leaves out the views
    (``aten.view``, ``aten.t``, ``aten.diagonal``, …) and the metadata-only ops: no kernel on
    any device."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.launches = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops += 1
        if not (func.is_view or func.name().split(".")[0] in _METADATA):
            self.launches += 1
        return func(*args, **(kwargs or {}))


def gramians(num_objectives: int, segments: int) -> torch.Tensor:
    """``[S, L, L]`` float32 Gramians of correlated gradients (a shared component plus noise)."""
    generator = torch.Generator().manual_seed(num_objectives * 1000 + segments)
    grads = 3 * torch.randn(segments, 1, 256, generator=generator)
    grads = grads + torch.randn(segments, num_objectives, 256, generator=generator)
    return grads @ grads.mT


def count_solve(name: str, num_objectives: int, segments: int) -> dict[str, int]:
    """ATen ops of one solve of ``S`` segments (the second solve: warm caches, warm state)."""
    weighting = get_weighting(name)
    g = gramians(num_objectives, segments)
    objectives = tuple(range(num_objectives))
    contexts = [WeightingContext(3, 0, objectives, s, (s,)) for s in range(segments)]
    with force_device_path():
        solve_weights(weighting, g, None, contexts, list(range(segments)))
        with OpCounter() as counter:
            solve_weights(weighting, g, None, contexts, list(range(segments)))
    return {"ops": counter.ops, "launches": counter.launches}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objectives", default="2,4,8,16")
    parser.add_argument("--segments", default="1,8")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    objectives = [int(x) for x in args.objectives.split(",")]
    segments = [int(x) for x in args.segments.split(",")]
    rows: list[dict[str, Any]] = [
        {"weighting": name, "L": num, "S": s, **count_solve(name, num, s)}
        for name in weighting_names()
        for num in objectives
        for s in segments
    ]
    header = "| weighting | L | " + " | ".join(f"launches S={s}" for s in segments) + " |\n"
    header += "|---|---|" + "---|" * len(segments) + "\n"
    table = header + "\n".join(
        f"| {name} | {num} | "
        + " | ".join(
            str(
                next(
                    r["launches"]
                    for r in rows
                    if r["weighting"] == name and r["L"] == num and r["S"] == s
                )
            )
            for s in segments
        )
        + " |"
        for name in weighting_names()
        for num in objectives
    )
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = {
            "date": datetime.date.today().isoformat(),
            "command": " ".join(["python", *sys.argv]),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "torch": torch.__version__,
        }
        (args.out / "solver_ops.json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
        footer = (
            f"\n\nMachine: {meta['machine']}; date {meta['date']}; command `{meta['command']}`\n"
        )
        (args.out / "solver_ops.md").write_text(table + footer)


if __name__ == "__main__":
    main()
