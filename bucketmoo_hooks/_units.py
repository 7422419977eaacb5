"""What the FSDP adapters share: a unit's identity, and where a hook step begins and ends.

A *unit* is one FSDP parameter group (an FSDP2 ``fully_shard`` module, an FSDP1 instance); it
plays the part of a DDP bucket. FSDP reduces units in reverse module order, only units that have
gradients, and may reduce the root in its own end-of-backward callback, so "bucket 0" and "the
last bucket" of DDP have no FSDP equivalent: :class:`BackwardSteps` takes their place.
"""

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from . import _core
from ._linalg import Segment
from ._objectives import ObjectiveMap
from ._protocol import Bucket
from ._state import BucketMOOState


@dataclass(frozen=True, slots=True)
class FSDPUnit:
    """One FSDP unit, as the hook sees it.

    Attributes:
        index: Position among the model's FSDP units in ``model.modules()`` order: the bucket id
            in weighting contexts, diagnostics and the ledger (stable across steps and restarts).
        name: The module's qualified name (``""`` for the root), for messages.
        problem: Stable key of the unit's problem (:attr:`WeightingContext.problem`): positions in
            ``model.parameters()`` of the parameters it covers.
        parameter_problems: One key per parameter of the unit (``granularity="parameter"``).
        segment_sizes: Elements of each parameter in one rank's row of the unit's flat gradient,
            in layout order (padding included), for ``granularity="parameter"``.
        frozen: ``(lo, hi)`` in the unit's flat gradient of the parameters that need no gradient
            but that FSDP1 (``use_orig_params=True``) computes one for anyway: zeroed before
            the exchange, so that they weigh in no Gramian.
    """

    index: int
    name: str
    problem: tuple[int, ...]
    parameter_problems: tuple[tuple[int, ...], ...]
    segment_sizes: tuple[int, ...]
    frozen: tuple[Segment, ...] = ()

    @property
    def label(self) -> str:
        return f"FSDP unit {self.index} ({self.name or 'root'!r})"

    @property
    def bucket(self) -> Bucket:
        """The unit as the core names and keys it."""
        return Bucket(self.index, self.label, self.problem, self.parameter_problems)

    def only(self, kept: Sequence[int]) -> "FSDPUnit":
        """The unit restricted to its parameters at positions ``kept`` (e.g. those FSDP reduces);
        the problem key stays the unit's."""
        return replace(
            self,
            parameter_problems=tuple(self.parameter_problems[i] for i in kept),
            segment_sizes=tuple(self.segment_sizes[i] for i in kept),
        )


class BackwardSteps:
    """One hook step per backward pass that reduces gradients.

    The step opens at the first unit that a backward pass reduces (autograd's graph-task id tells
    passes apart): all ranks exchange ``(step, config digest, objective)`` there, as DDP does at
    bucket 0. It closes in an autograd final callback queued at that moment; autograd runs final
    callbacks in the order they were queued, so it runs after FSDP's own end-of-backward callback
    (queued before backward started), which may still reduce the root unit. Backward passes that
    reduce nothing (``set_requires_gradient_sync(False)``, ``no_sync()``) open no step. A nested
    backward pass (reentrant activation checkpointing) is a graph task of its own and so a step
    of its own: every rank splits alike, so the combination stays right, only the step count
    grows.
    """

    __slots__ = ("_task", "state")

    def __init__(self, state: BucketMOOState) -> None:
        self.state = state
        self._task: int | None = None

    def objective_map(self, group: dist.ProcessGroup, unit: FSDPUnit) -> ObjectiveMap:
        """The map of the step in progress, opening the step at a backward pass's first unit."""
        task = torch._C._current_graph_task_id()
        if task < 0:
            raise RuntimeError(
                f"{unit.label}: the bucket-MOO reduction ran outside a backward pass; FSDP calls "
                "it from its post-backward hooks, which is the only place it can run"
            )
        if task != self._task:
            if self._task is not None:
                # The previous backward pass raised before its final callback: close its step
                # (its bytes were sent, and every rank counts it alike) before opening this one.
                self._close()
            objective_map = _core.open_step(self.state, group)
            self._task = task
            torch.autograd.Variable._execution_engine.queue_callback(self._close)
            return objective_map
        return _core.step_map(self.state, unit.bucket)

    def _close(self) -> None:
        if self._task is not None:
            self._task = None
            _core.close_step(self.state)
