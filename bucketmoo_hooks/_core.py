"""The one path every bucket takes, whatever the engine: phase 1, the weights, phase 2.

An engine adapter (:mod:`._ddp`, :mod:`._fsdp2`, :mod:`._fsdp1`) opens a step, hands each bucket
or unit to :func:`reduce` as a :class:`~._protocol.Gradient` with its
:class:`~._protocol.Bucket` description, and closes the step. :func:`reduce` runs the state's
protocol (phase 1: exchange and all-reduced Gramians), checks them, solves the weights of every
problem over the objectives present on it (step 5), runs phase 2 (combination and the engine's
output) and records diagnostics. Global MOO runs phase 1 per bucket and the rest once, at the
last bucket.
"""

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

from ._absent import solve_weights
from ._collectives import Collectives
from ._groups import node_layout_error
from ._hierarchical import HierarchicalProtocol
from ._nonfinite import raise_if_nonfinite
from ._objectives import ObjectiveMap, objective_key
from ._protocol import Bucket, Exchange, ExchangeProtocol, Gradient, Request
from ._shard import ShardProtocol
from ._sketch import SketchProtocol
from ._worker import unwrap_outcome
from .weightings import Weighting, WeightingContext

if TYPE_CHECKING:
    from ._state import BucketMOOState

#: ``BucketMOOState(protocol=...)``: the exchange protocols, by name (a new protocol: a sibling of
#: ``_shard.py`` and one entry here, and its options in :func:`protocol_of`).
PROTOCOLS: dict[str, type[ExchangeProtocol]] = {
    p.name: p for p in (ShardProtocol, SketchProtocol, HierarchicalProtocol)
}


def protocol_of(state: "BucketMOOState") -> ExchangeProtocol:
    """The state's protocol object, built from its configuration on first use (it may keep
    device buffers, e.g. the sketch's sign table: runtime, never pickled)."""
    runtime = state._runtime
    if runtime.protocol is None:
        if state.protocol == "sketch":
            assert state.sketch_size is not None
            runtime.protocol = SketchProtocol(state.sketch_size)
        elif state.protocol == "hierarchical":
            if state.ranks_per_node is None:  # register_comm_hook: no registration checked it
                raise ValueError(node_layout_error(None, []))
            runtime.protocol = HierarchicalProtocol(state.ranks_per_node)
        else:
            runtime.protocol = PROTOCOLS[state.protocol]()
    return runtime.protocol


def open_step(state: "BucketMOOState", group: dist.ProcessGroup) -> ObjectiveMap:
    """Start a step: the ranks' agreement (:class:`._steps.StepAgreement`); its objective map."""
    objective_map = state._steps.begin(state, group)
    state._runtime.held = []  # global MOO: buckets of an interrupted step are stale
    return objective_map


def step_map(state: "BucketMOOState", bucket: Bucket) -> ObjectiveMap:
    """The objective map of the step in progress."""
    objective_map = state._steps.objective_map
    if objective_map is None:
        raise RuntimeError(f"bucket-MOO saw {bucket.label} before the first bucket of a step")
    return objective_map


def close_step(state: "BucketMOOState") -> None:
    """End the step: diagnostics, ``state.iter``, the ledger."""
    state._steps.end(state)


def reduce(
    state: "BucketMOOState",
    comm: Collectives,
    bucket: Bucket,
    gradient: Gradient,
    objective_map: ObjectiveMap,
    averaging: Tensor,
    *,
    last: bool = False,
) -> torch.futures.Future[Tensor] | None:
    """Reduce one bucket with the state's protocol, weighting and checks.

    ``averaging``: ``M`` of ``objective_map`` over ``comm``'s ranks (an adapter may rescale it).
    ``last``: the step's last bucket (global MOO solves there). Returns what
    :meth:`Exchange.deliver` returns: a future of the reduced bucket for an all-reduce, ``None``
    for a reduce-scatter.
    """
    is_global = state.granularity == "global"
    runtime = state._runtime
    request = Request(
        step=state.iter,
        bucket=bucket,
        per_parameter=state.granularity == "parameter",
        presence=checks_presence(state),
        kernels=state.kernels,
        workspace=None if is_global else runtime.workspace,  # global MOO keeps the exchange
    )
    exchange = protocol_of(state).exchange(comm, gradient, averaging, request)
    objectives = objective_map.objectives
    check = _gramian_check(state, f"{bucket.label} at step {state.iter}", objectives, averaging)
    if is_global:
        if check is not None:
            check(exchange.gramians)
        return _hold(state, bucket, gradient, exchange, objectives, last)
    if request.per_parameter:
        contexts = [
            WeightingContext(state.iter, bucket.index, objectives, s, problem)
            for s, problem in enumerate(bucket.parameter_problems)
        ]
        problems = list(range(len(contexts)))
    else:
        contexts = [WeightingContext(state.iter, bucket.index, objectives, None, bucket.problem)]
        problems = [0] * len(gradient.sizes)
    weights, combined = weigh_and_combine(state.weighting, exchange, contexts, problems, check)
    if state.diagnostics is not None:
        state.diagnostics.record(
            state.iter,
            bucket.index,
            objectives,
            exchange.gramians,
            weights,
            segmented=request.per_parameter,
            sketched=exchange.sketched,
            sketch_size=state.sketch_size,
        )
    return exchange.deliver(combined)


def weigh_and_combine(
    weighting: Weighting,
    exchange: Exchange,
    contexts: Sequence[WeightingContext],
    problems: Sequence[int],
    check: Callable[[Tensor], None] | None = None,
) -> tuple[Tensor, Tensor]:
    """Step 5 and phase 2's compute on one exchange: ``(weights, combined)``.

    ``contexts``: one per problem (Gramian); ``problems``: the problem of each parameter;
    ``check``: run on the all-reduced Gramians first (``nonfinite="raise"``).
    """
    if check is not None:
        check(exchange.gramians)
    weights, parameter_weights = solve_weights(
        weighting,
        exchange.gramians,
        exchange.counts,
        contexts,
        problems,
        solved_later=exchange.solves(weighting),
    )
    return exchange.combine(weighting, weights, parameter_weights)


def checks_presence(state: "BucketMOOState") -> bool:
    """Whether phase 1 counts which objectives are present on each parameter: with
    ``absent="exclude"``, unless the engine guarantees every rank uses every parameter."""
    return state.absent == "exclude" and not state._runtime.every_parameter_used


@dataclass(slots=True)
class _Held:
    """A bucket waiting for the model's weights (``granularity="global"``)."""

    exchange: Exchange
    parameters: int
    # Completed with the reduced bucket or an error; the engine holds ``outcome.then(unwrap)``.
    outcome: torch.futures.Future[Tensor]


def _hold(
    state: "BucketMOOState",
    bucket: Bucket,
    gradient: Gradient,
    exchange: Exchange,
    objectives: tuple[int, ...],
    last: bool,
) -> torch.futures.Future[Tensor]:
    """Global MOO: hold each bucket after phase 1, and at the last one weight the sum of the
    Gramians (the model's Gramian) once and run phase 2 of every bucket. With presence counts,
    the model is one problem: an objective is left out of the solve only if it is absent from
    every parameter, and parameters lacking some get weights of their own.

    DDP waits for the buckets' futures only after backward, so the earlier ones can complete
    when the last bucket has been seen.
    """
    held = state._runtime.held
    exchange.hold()
    devices = [gradient.flat.device] if gradient.flat.is_cuda else None
    held.append(_Held(exchange, len(gradient.sizes), torch.futures.Future(devices=devices)))
    if not last:
        return held[-1].outcome.then(unwrap_outcome)
    state.held_bytes = sum(h.exchange.held_bytes for h in held)
    total = torch.stack([h.exchange.gramians for h in held]).sum(dim=0)
    counts = [h.exchange.counts for h in held]
    present = None if any(c is None for c in counts) else torch.cat(counts)  # type: ignore[arg-type]
    problem = () if bucket.problem is not None else None
    context = WeightingContext(state.iter, -1, objectives, None, problem)
    problems = [0] * sum(h.parameters for h in held)
    weights, parameter_weights = solve_weights(state.weighting, total, present, [context], problems)
    parts = [None] * len(held)
    if parameter_weights is not None:
        parts = list(parameter_weights.split([h.parameters for h in held]))
    futures = []
    for h, part in zip(held, parts, strict=True):
        _, combined = h.exchange.combine(state.weighting, weights, part)
        futures.append(h.exchange.deliver(combined))
    if state.diagnostics is not None:  # one record: the whole model is one problem
        sketched = (any(s for h in held for s in h.exchange.sketched),)
        state.diagnostics.record(
            context.step,
            -1,
            objectives,
            total,
            weights,
            segmented=False,
            sketched=sketched,
            sketch_size=state.sketch_size,
        )
    state._runtime.held = []
    # The earlier buckets' futures, already handed to the engine, complete with their gathers.
    for h, future in zip(held[:-1], futures[:-1], strict=True):
        future.add_done_callback(functools.partial(_complete, h.outcome))
    return futures[-1]


def _complete(target: torch.futures.Future[Tensor], source: torch.futures.Future[Tensor]) -> None:
    """Give the outcome future ``target`` the outcome of the completed ``source``."""
    try:
        value = source.value()
    except BaseException as error:
        target.set_result(error)
    else:
        target.set_result(value)


def _gramian_check(
    state: "BucketMOOState", where: str, objectives: tuple[int, ...], averaging: Tensor
) -> Callable[[Tensor], None] | None:
    """What runs on the all-reduced Gramians with ``nonfinite="raise"``."""
    if state.nonfinite != "raise":
        return None
    ids = state.objective_of_rank or range(averaging.shape[1])
    names = {objective_key(i): i for i in ids}
    if state._steps.objective is not None:
        names[state._steps.objective[1]] = state._steps.objective[0]
    return functools.partial(
        raise_if_nonfinite, where=where, objectives=objectives, averaging=averaging, names=names
    )
