"""Per-problem, per-objective state of the stateful weightings (GradVac's targets, Nash-MTL's warm
starts), keyed by objective key so that it survives per-step language sampling, DDP's bucket
rebuild and checkpoints."""

from collections.abc import Sequence
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

    def rows(self, objectives: tuple[int, ...], device: torch.device, fill: float) -> list[int]:
        """Rows of ``objectives`` in the table, which grows by ``fill`` for objectives it lacks
        and moves to ``device`` (from the host, as a checkpoint loads it: pinned and
        non-blocking, so the first solve after a resume does not wait for the device)."""
        if self.values.device != device:
            host = self.values.device.type == "cpu"
            self.values = to_device(self.values, device) if host else self.values.to(device)
        new = [key for key in objectives if key not in self.objectives]
        if new:
            self.objectives += new
            pad = (0, len(new)) * self.values.ndim
            self.values = torch.nn.functional.pad(self.values, pad, value=fill)
        return [self.objectives.index(key) for key in objectives]


@dataclass(slots=True)
class Lookup:
    """The entries of a batch of problems' tables, read in one gather: ``values`` is ``[S, L]``
    (1-D tables) or ``[S, L, L]`` (2-D), row ``s`` from ``tables[s]`` at its objectives.

    The tables' values are concatenated into one flat buffer (one copy), read and written back
    through one flat index built on the host (copied pinned, non-blocking), and then become views
    of that buffer: a batch costs the same few device ops whatever its size. A table listed twice
    is read twice from the same entries, and the last write wins.
    """

    tables: list[ObjectiveTable]
    buffer: Tensor
    index: Tensor
    values: Tensor

    @classmethod
    def read(
        cls,
        tables: Sequence[ObjectiveTable],
        objectives: Sequence[tuple[int, ...]],
        device: torch.device,
        fill: float,
    ) -> "Lookup":
        rows = [t.rows(keys, device, fill) for t, keys in zip(tables, objectives, strict=True)]
        unique = list({id(t): t for t in tables}.values())
        offsets, total = {}, 0
        for table in unique:
            offsets[id(table)] = total
            total += table.values.numel()
        flat: list[int] = []
        for table, table_rows in zip(tables, rows, strict=True):
            base, size = offsets[id(table)], len(table.objectives)
            if table.values.ndim == 1:
                flat += [base + r for r in table_rows]
            else:
                flat += [base + r * size + c for r in table_rows for c in table_rows]
        buffer = torch.cat([t.values.reshape(-1) for t in unique])
        index = to_device(torch.tensor(flat), device)
        shape = (len(tables), *(len(objectives[0]),) * tables[0].values.ndim)
        return cls(unique, buffer, index, buffer[index].reshape(shape))

    def write(self, values: Tensor) -> None:
        """Store ``values`` (the shape of :attr:`values`) back into the tables."""
        self.buffer[self.index] = values.reshape(-1)
        offset = 0
        for table in self.tables:
            size = table.values.numel()
            table.values = self.buffer[offset : offset + size].view(table.values.shape)
            offset += size


def tables_state(tables: dict[Problem, ObjectiveTable], field: str) -> list[dict[str, Any]]:
    """``tables`` as lists, ints and CPU tensors (safe for ``torch.load(weights_only=True)``)."""
    return [
        {
            "problem": None if problem is None else list(problem),
            "objectives": list(table.objectives),
            field: table.values.cpu().clone(),  # a view of a batch's buffer would save it all
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
