"""Interference diagnostics from the Gramians the hook already has: no extra communication."""

import json
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from ._objectives import canonical_objective, objective_key
from .weightings import min_norm_weights


class ScalarWriter(Protocol):
    """What :class:`Diagnostics` needs of a TensorBoard ``SummaryWriter``."""

    def add_scalar(self, tag: str, scalar_value: float, global_step: int) -> object: ...


class Diagnostics:
    r"""Records, per bucket (per parameter with ``granularity="parameter"``) and step, what shows
    interference between objectives, from the all-reduced Gramian ``G`` and the weights ``w``:

    - ``cosine``: ``G_ab / √(G_aa G_bb)``, the cosine similarity of every objective pair;
    - ``norms``: ``‖ḡ_ℓ‖ = √G_ℓℓ``;
    - ``weights``: ``w``;
    - ``update_norm``: ``‖d‖ = √(wᵀGw)``;
    - ``sketched``, ``sketch_size``: whether ``G`` is an estimate from a random sketch of
      ``sketch_size`` numbers per objective (``protocol="sketch"``), else exact (``None``);

    and per step ``global_min_norm``: ``min_{w∈Δ} ‖Σ_ℓ w_ℓ ḡ_ℓ‖`` over the whole model, from the
    sum of the bucket Gramians (the global Gramian, docs/design.md §5). Zero means the model is
    Pareto-stationary; compare it with the per-bucket update norms (docs/design.md §6).

    Recording stays on the device and never synchronises. Every ``log_every`` steps the pending
    records are copied to the host in one asynchronous transfer (pinned memory, on the stream
    that produced them, followed by an event), and the transfers that have completed by then are
    read: appended to :attr:`records` and, with ``path``, to a JSON-lines file (one object per
    bucket and step). On a GPU the records of a transfer are therefore read at a later pull,
    usually ``log_every`` steps later; :meth:`pull` reads everything, waiting for the transfers.

    Args:
        log_every: Steps between automatic pulls to the host (none synchronises the device).
        path: JSON-lines file to append the records to (written by the rank that owns this
            object; pass a path on one rank only, or a per-rank path).
        keep: Keep pulled records in :attr:`records` (bounded memory: set ``False`` for long runs
            that only write the file).
        objectives: Objective ids to show by name. The state adds its ``objective_of_rank`` and
            this rank's ``set_objective`` ids; list here the ids other ranks set per step, or
            they appear as their keys (:func:`bucketmoo_hooks.objective_key`).
        tensorboard: Anything with ``add_scalar(tag, value, step)``, e.g. a
            ``torch.utils.tensorboard.SummaryWriter`` (needs the ``tensorboard`` package).
            Pulled records become scalars ``cosine/b{bucket}/{a}~{b}``,
            ``weight/b{bucket}/{objective}``, ``update_norm/b{bucket}`` (``b{bucket}.p{i}`` per
            parameter, ``model`` for the global problem) and ``global_min_norm``.
    """

    __slots__ = (
        "_pending",
        "_produced",
        "_shipments",
        "_step_gramians",
        "keep",
        "labels",
        "log_every",
        "path",
        "records",
        "tensorboard",
    )

    def __init__(
        self,
        log_every: int = 50,
        path: str | Path | None = None,
        keep: bool = True,
        objectives: Iterable[Hashable] = (),
        tensorboard: ScalarWriter | None = None,
    ) -> None:
        if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1:
            raise ValueError(f"log_every must be a positive int, got {log_every!r}")
        self.log_every = log_every
        self.path = Path(path) if path is not None else None
        self.keep = keep
        if tensorboard is not None and not callable(getattr(tensorboard, "add_scalar", None)):
            raise TypeError(
                "tensorboard must have add_scalar(tag, value, step), e.g. a "
                f"torch.utils.tensorboard.SummaryWriter; got {type(tensorboard).__name__}"
            )
        self.tensorboard = tensorboard
        #: Objective key → readable id.
        self.labels: dict[int, str] = {}
        self.add_labels(objectives)
        self.records: list[dict[str, Any]] = []
        self._pending: list[tuple[dict[str, Any], Tensor]] = []
        self._step_gramians: list[Tensor] = []
        self._shipments: list[_Shipment] = []
        # Recorded on the stream that produced the pending records (CUDA): a copy issued from
        # another stream (a pull() on the default stream while the hook ran on its side stream)
        # waits for it.
        self._produced: torch.cuda.Event | None = None

    def record(
        self,
        step: int,
        bucket: int,
        objectives: tuple[int, ...],
        gramians: Tensor,
        weights: Tensor,
        segmented: bool,
        sketched: tuple[bool, ...] = (),
        sketch_size: int | None = None,
    ) -> None:
        """Queue the numbers of one bucket: ``gramians [S, L, L]``, ``weights [S, L]``;
        ``sketched``: per problem, whether its Gramian is a sketch estimate of ``sketch_size``
        numbers per objective (``protocol="sketch"``)."""
        g = gramians.double()
        diagonal = g.diagonal(dim1=-2, dim2=-1)
        norms = diagonal.clamp_min(0).sqrt()
        cosine = g / (norms[:, :, None] * norms[:, None, :]).clamp_min(1e-300)
        w = weights.double()
        update_norm = torch.einsum("sa,sab,sb->s", w, g, w).clamp_min(0).sqrt()
        packed = torch.cat([cosine.flatten(1), norms, w, update_norm[:, None]], dim=1)
        meta = {
            "step": step,
            "bucket": bucket,
            "objectives": objectives,
            "segmented": segmented,
            "sketched": sketched or (False,) * len(gramians),
            "sketch_size": sketch_size,
        }
        self._pending.append((meta, packed))
        self._step_gramians.append(g.sum(dim=0))
        self._mark_produced(packed)

    def end_step(self, step: int) -> None:
        """Queue the step's global min-norm value; pull to the host every ``log_every`` steps."""
        if self._step_gramians:
            total = torch.stack(self._step_gramians).sum(dim=0)
            weights = min_norm_weights(total, 2 * total.shape[0])
            value = (weights @ total @ weights).clamp_min(0).sqrt()
            self._pending.append(({"step": step, "global": True}, value.reshape(1, 1)))
            self._step_gramians = []
            self._mark_produced(value)
        if (step + 1) % self.log_every == 0:
            self._ship()
            self._read(wait=False)

    def pull(self) -> list[dict[str, Any]]:
        """Copy the pending records to the host, wait for every transfer, and return the records
        read (with those of earlier transfers not read yet)."""
        self._ship()
        return self._read(wait=True)

    def _mark_produced(self, tensor: Tensor) -> None:
        if tensor.is_cuda:
            if self._produced is None:
                self._produced = torch.cuda.Event()
            self._produced.record()

    def _ship(self) -> None:
        """Start the transfer of the pending records to the host (one copy)."""
        if not self._pending:
            return
        device = self._pending[0][1].device
        if device.type == "cuda":
            assert self._produced is not None
            torch.cuda.current_stream(device).wait_event(self._produced)
        flat = torch.cat([packed.flatten() for _, packed in self._pending])
        done = None
        if flat.is_cuda:
            host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
            host.copy_(flat, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        else:
            host = flat
        self._shipments.append(_Shipment(self._pending, host, flat, done))
        self._pending = []

    def _read(self, wait: bool) -> list[dict[str, Any]]:
        """Unpack the transfers that have completed (all of them, waiting, with ``wait``)."""
        pulled: list[dict[str, Any]] = []
        while self._shipments:
            shipment = self._shipments[0]
            if shipment.done is not None:
                if not wait and not shipment.done.query():
                    break
                shipment.done.synchronize()
            self._shipments.pop(0)
            host, offset = shipment.host.tolist(), 0
            for meta, packed in shipment.records:
                values = host[offset : offset + packed.numel()]
                offset += packed.numel()
                pulled += self._unpack(meta, packed.shape, values)
        if not pulled:
            return []
        if self.path is not None:
            with self.path.open("a", encoding="utf-8") as handle:
                handle.writelines(json.dumps(record) + "\n" for record in pulled)
        if self.tensorboard is not None:
            for record in pulled:
                for tag, value in _scalars(record):
                    self.tensorboard.add_scalar(tag, value, record["step"])
        if self.keep:
            self.records += pulled
        return pulled

    def _unpack(
        self, meta: dict[str, Any], shape: torch.Size, values: list[float]
    ) -> list[dict[str, Any]]:
        if meta.get("global"):
            return [{"step": meta["step"], "global_min_norm": values[0]}]
        objectives = [self.labels.get(key, str(key)) for key in meta["objectives"]]
        num = len(objectives)
        rows = [values[i * shape[1] : (i + 1) * shape[1]] for i in range(shape[0])]
        return [
            {
                "step": meta["step"],
                "bucket": meta["bucket"],
                "parameter": index if meta["segmented"] else None,
                "objectives": objectives,
                "cosine": [row[a * num : (a + 1) * num] for a in range(num)],
                "norms": row[num * num : num * num + num],
                "weights": row[num * num + num : num * num + 2 * num],
                "update_norm": row[-1],
                # Whether G is a sketch estimate (protocol="sketch"), and of how many numbers.
                "sketched": meta["sketched"][index],
                "sketch_size": meta["sketch_size"] if meta["sketched"][index] else None,
            }
            for index, row in enumerate(rows)
        ]

    def add_labels(self, objectives: Iterable[Hashable]) -> None:
        """Show these objective ids by name in the records."""
        ids = [canonical_objective(objective) for objective in objectives]  # "0", not "tensor(0)"
        self.labels.update({objective_key(objective): str(objective) for objective in ids})

    def __getstate__(self) -> dict[str, Any]:
        # The TensorBoard writer holds open files and threads: it is not pickled.
        return {
            "log_every": self.log_every,
            "path": self.path,
            "keep": self.keep,
            "labels": self.labels,
            "records": self.records,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            setattr(self, name, value)
        self._pending, self._step_gramians, self.tensorboard = [], [], None
        self._shipments, self._produced = [], None


@dataclass(slots=True)
class _Shipment:
    """Records on their way to the host: ``host`` is complete once ``done`` has completed
    (``None``: already on the host). ``device`` keeps the copy's source alive until then."""

    records: list[tuple[dict[str, Any], Tensor]]
    host: Tensor
    device: Tensor
    done: torch.cuda.Event | None


def _scalars(record: dict[str, Any]) -> list[tuple[str, float]]:
    """TensorBoard scalars of one pulled record."""
    if "global_min_norm" in record:
        return [("global_min_norm", record["global_min_norm"])]
    where = "model" if record["bucket"] < 0 else f"b{record['bucket']}"
    if record["parameter"] is not None:
        where += f".p{record['parameter']}"
    names = record["objectives"]
    scalars = [(f"update_norm/{where}", record["update_norm"])]
    scalars += [(f"weight/{where}/{n}", w) for n, w in zip(names, record["weights"], strict=True)]
    scalars += [
        (f"cosine/{where}/{names[a]}~{names[b]}", record["cosine"][a][b])
        for a in range(len(names))
        for b in range(a + 1, len(names))
    ]
    return scalars
