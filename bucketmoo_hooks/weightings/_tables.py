"""Per-problem, per-objective state of the stateful weightings (GradVac's targets, Nash-MTL's warm
starts), keyed by objective key so that it survives per-step language sampling, DDP's bucket
rebuild and checkpoints."""

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._device_path import to_device

Problem = tuple[int, ...] | None


@dataclass(slots=True)
class ObjectiveTable:
    """Values of one problem over every objective it has seen: ``[K]`` or ``[K, K]``, float64.

    Attributes:
        objectives: Objective keys, in the order of the table's rows (and columns).
        values: The table, on the device of the last lookup.
    """

    objectives: list[int]
    values: Tensor

    @classmethod
    def empty(cls, ndim: int) -> "ObjectiveTable":
        return cls([], torch.zeros((0,) * ndim, dtype=torch.float64))

    def index(self, objectives: tuple[int, ...], device: torch.device, fill: float) -> Tensor:
        """Rows of ``objectives`` in the table, which grows by ``fill`` for objectives it lacks.

        The index is built on the host and copied without synchronising (pinned, non-blocking).
        """
        if self.values.device != device:
            self.values = self.values.to(device)
        new = [key for key in objectives if key not in self.objectives]
        if new:
            self.objectives += new
            pad = (0, len(new)) * self.values.ndim
            self.values = torch.nn.functional.pad(self.values, pad, value=fill)
        return to_device(torch.tensor([self.objectives.index(key) for key in objectives]), device)


def tables_state(tables: dict[Problem, ObjectiveTable], field: str) -> list[dict[str, Any]]:
    """``tables`` as lists, ints and CPU tensors (safe for ``torch.load(weights_only=True)``)."""
    return [
        {
            "problem": None if problem is None else list(problem),
            "objectives": list(table.objectives),
            field: table.values.cpu(),
        }
        for problem, table in tables.items()
    ]


def load_tables(
    entries: list[dict[str, Any]], field: str, ndim: int, owner: str
) -> dict[Problem, ObjectiveTable]:
    """Inverse of :func:`tables_state`, checking every entry's keys and shape."""
    tables: dict[Problem, ObjectiveTable] = {}
    for entry in entries:
        if not isinstance(entry, dict) or set(entry) != {"problem", "objectives", field}:
            raise ValueError(
                f"{owner} state: every entry must be a dict with keys 'problem', 'objectives' "
                f"and {field!r}, got {entry!r}"
            )
        objectives, values = list(entry["objectives"]), entry[field]
        shape = (len(objectives),) * ndim
        if not isinstance(values, Tensor) or values.shape != shape:
            got = list(values.shape) if isinstance(values, Tensor) else type(values).__name__
            raise ValueError(
                f"{owner} state for problem {entry['problem']}: {field} must be a tensor of "
                f"shape {list(shape)} (one row per objective), got {got}"
            )
        problem = None if entry["problem"] is None else tuple(entry["problem"])
        tables[problem] = ObjectiveTable(objectives, values.to(torch.float64))
    return tables
