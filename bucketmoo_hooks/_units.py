"""What the FSDP paths share: a unit's identity, where a hook step begins and ends, and the solve.

A *unit* is one FSDP parameter group (an FSDP2 ``fully_shard`` module, an FSDP1 instance); it
plays the part of a DDP bucket. FSDP reduces units in reverse module order, only units that have
gradients, and may reduce the root in its own end-of-backward callback, so "bucket 0" and "the
last bucket" of DDP have no FSDP equivalent: :class:`BackwardSteps` takes their place.
"""

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import Tensor

from ._ledger import BucketTraffic
from ._objectives import ObjectiveMap
from ._protocol import BucketComm, Segment, solve_shards
from ._state import BucketMOOState
from .weightings import WeightingContext


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
            self.state._begin_step(group)
            self._task = task
            torch.autograd.Variable._execution_engine.queue_callback(self._close)
        objective_map = self.state._step_map
        assert objective_map is not None  # set by _begin_step
        return objective_map

    def _close(self) -> None:
        if self._task is not None:
            self._task = None
            self.state._end_step()


class UnitComm(BucketComm):
    """:class:`BucketComm` whose Gramian all-reduce also sums over a second group.

    HSDP: the protocol runs over the replicate group on one shard of the unit, so the Gramian of
    the whole unit is the sum of the replicate-group Gramians over the shard group.
    """

    __slots__ = ("outer",)

    def __init__(
        self, group: dist.ProcessGroup, traffic: BucketTraffic, outer: dist.ProcessGroup
    ) -> None:
        super().__init__(group, traffic)
        self.outer = outer

    def all_reduce(self, tensor: Tensor) -> dist.Work:
        super().all_reduce(tensor).wait()
        nbytes = tensor.numel() * tensor.element_size()
        self.traffic.add("all_reduce", 2 * (self.outer.size() - 1) * nbytes // self.outer.size())
        return dist.all_reduce(tensor, group=self.outer, async_op=True)


def row_segments(sizes: Sequence[int]) -> list[Segment]:
    """Segments of consecutive pieces of ``sizes`` elements in a row that holds all of them."""
    bounds = [0, *itertools.accumulate(sizes)]
    return list(itertools.pairwise(bounds))


def solve_unit(
    state: BucketMOOState,
    unit: FSDPUnit,
    comm: BucketComm,
    shards: Tensor,
    averaging: Tensor,
    objective_map: ObjectiveMap,
    parameters: Sequence[Segment],
) -> Tensor:
    """Steps 2–6 of the protocol on one unit; returns this rank's combined slice ``d_j``.

    ``shards`` is ``S_j ∈ ℝ^{R×c}``. ``parameters``: where each of the unit's parameters lies in
    the slice, one per entry of ``unit.parameter_problems`` (the problems with
    ``granularity="parameter"``; where objectives may be absent, in any case).
    Records diagnostics like the DDP hook; the state's ``kernels`` choose the fused CUDA kernels
    or the torch path, as for DDP.
    """
    context = WeightingContext(state.iter, unit.index, objective_map.objectives)
    segments = parameters if state.granularity == "parameter" else None
    if segments is None:
        contexts = [replace(context, problem=unit.problem)]
    else:
        contexts = [
            replace(context, segment=s, problem=problem)
            for s, problem in enumerate(unit.parameter_problems)
        ]
    return solve_problems(
        state, unit.index, unit.label, comm, shards, averaging, contexts, segments, parameters
    )


def solve_problems(
    state: BucketMOOState,
    index: int,
    label: str,
    comm: BucketComm,
    shards: Tensor,
    averaging: Tensor,
    contexts: Sequence[WeightingContext],
    segments: Sequence[Segment] | None,
    parameters: Sequence[Segment],
) -> Tensor:
    """Steps 2–6 of one bucket or unit with the state's weighting, kernels, non-finite check,
    presence check and diagnostics (bucket id ``index``); returns the combined slice ``d_j``.

    ``segments``: the problems (``None``: one for the slice); ``parameters``: where each
    parameter lies in the slice.
    """
    objectives = contexts[0].objectives
    check = state._gramian_check(f"{label} at step {state.iter}", objectives, averaging)
    combination = solve_shards(
        comm,
        shards,
        averaging,
        state.weighting,
        contexts,
        segments,
        state.kernels,
        check,
        state._parameter_layout(parameters),
    )
    if state.diagnostics is not None:
        state.diagnostics.record(
            state.iter,
            index,
            objectives,
            combination.gramians,
            combination.weights,
            segmented=segments is not None,
        )
    return combination.update
