# No ``from __future__ import annotations`` here: DDP inspects the hook's annotations and only
# accepts the real ``dist.GradBucket`` / ``Future[Tensor]`` objects, not strings.
import functools
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ._absent import ParameterLayout, partly_present, solve_present
from ._ledger import BucketTraffic
from ._objectives import ObjectiveMap
from ._protocol import (
    BucketComm,
    all_reduce_gramians,
    combine_segments,
    objective_shards,
    partial_gramians,
    scatter_shards,
    segment_weights,
    shard_segments,
)
from ._state import BucketMOOState
from ._units import solve_problems
from ._worker import unwrap_outcome
from .weightings import WeightingContext


def bucket_moo_hook(
    state: BucketMOOState, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: conflict-aware combination of the ranks' objective gradients per bucket.

    Runs the shard-Gramian protocol of docs/design.md §3 on the bucket: all-to-all of the (padded)
    bucket, group-average by objective, fp32 partial Gramian, all-reduce of the ``L×L`` Gramian,
    weights on the device, combined slice, all-gather of the slices into the bucket. Per rank it
    sends ``2(R−1)/R · n · b`` bytes, as a ring all-reduce, plus ``L²`` fp32 numbers; it never
    holds the ``L`` objective gradients of the whole bucket. Every slice of the result is produced
    by exactly one rank, so replicas stay bitwise identical.

    With ``state.overlap`` (default) the hook returns at once, as ``allreduce_hook`` does, and
    backward goes on while the bucket is reduced: CUDA buckets are reduced on a side stream, CPU
    (gloo) buckets on the state's worker thread (README, "Overlap"). An error there is raised by
    ``backward()`` as a ``RuntimeError`` naming the bucket, the step and the original error.

    Example::

        >>> state = BucketMOOState(objective_of_rank=[0, 0, 1, 1], weighting="mgda")
        >>> ddp_model.register_comm_hook(state, bucket_moo_hook)
    """
    group = state.group
    buffer = bucket.buffer()
    if not buffer.is_floating_point():
        raise TypeError(
            f"bucket_moo_hook needs floating-point gradients, got a {buffer.dtype} bucket"
        )
    # Everything the reduction needs from the bucket is read here, on the autograd thread, so
    # that the reduction can run elsewhere.
    job = _Bucket(
        buffer=buffer,
        index=bucket.index(),
        is_last=bucket.is_last(),
        # DDP's reducer launches buckets strictly in index order, so bucket 0 opens every step.
        opens_step=bucket.index() == 0,
        sizes=[p.numel() for p in bucket.parameters()],
        positions=state._parameter_positions(bucket),
        traffic=state.ledger.open_bucket(bucket.index(), buffer.numel(), buffer.element_size()),
    )
    if not state.overlap:
        return _reduce(state, group, job)
    if buffer.is_cuda:
        # ``work.wait()`` on NCCL makes the current stream wait: on the side stream, backward's
        # stream runs on while the bucket is exchanged; DDP's wait on the future orders it after.
        side = state._side_stream(buffer.device)
        side.wait_stream(torch.cuda.current_stream(buffer.device))
        with torch.cuda.stream(side):
            return _reduce(state, group, job)
    # The step's objective exchange runs on the worker too (over its group, in order with its
    # collectives): done here, it would stall backward until the slowest rank reached bucket 0.
    worker = state._overlap_worker(group)
    return worker.submit(
        state.iter, job.index, job.opens_step, lambda: _reduce(state, worker.group, job)
    )


@dataclass(frozen=True, slots=True)
class _Bucket:
    """One bucket to reduce, as read from DDP's ``GradBucket`` and the state at hook time."""

    buffer: torch.Tensor
    index: int
    is_last: bool
    opens_step: bool  # bucket 0: exchanges the step's objective map first
    sizes: list[int]  # elements of each parameter, in bucket order
    positions: tuple[int, ...] | None  # the parameters' positions in model.parameters()
    traffic: BucketTraffic


def _reduce(
    state: BucketMOOState, group: dist.ProcessGroup, job: _Bucket
) -> torch.futures.Future[torch.Tensor]:
    """Steps 1–7 on one bucket over ``group``; the future resolves to the combined bucket.

    Opens the step (the objective exchange) at bucket 0 and closes it after the last bucket's
    collectives are issued (and counted).
    """
    try:
        objective_map = state._begin_step(group) if job.opens_step else state._step_map
        if objective_map is None:
            raise RuntimeError(f"bucket_moo_hook saw bucket {job.index} before bucket 0 of a step")
        return _reduce_bucket(state, group, job, objective_map)
    except BaseException as error:
        # Global MOO: the held buckets' futures would never complete, and DDP waits on them.
        held, state._held = state._held, []
        for h in held:
            h.outcome.set_result(error)
        raise


def _reduce_bucket(
    state: BucketMOOState, group: dist.ProcessGroup, job: _Bucket, objective_map: ObjectiveMap
) -> torch.futures.Future[torch.Tensor]:
    step, objectives = state.iter, objective_map.objectives
    averaging = state._averaging_matrix(objective_map, job.buffer.device)  # M, [L, R]
    comm = BucketComm(group, job.traffic)
    # Global MOO holds every bucket's slices: they cannot share the workspace.
    workspace = None if state.granularity == "global" else state._workspace
    shards = scatter_shards(comm, job.buffer, workspace)
    context = WeightingContext(step, job.index, objectives)
    parameters = shard_segments(job.sizes, group.rank(), shards.shape[1])
    if state.granularity == "global":
        context = replace(context, problem=() if job.positions is not None else None)
        layout = state._parameter_layout(parameters)
        future = _hold_until_last_bucket(state, job, comm, shards, averaging, context, layout)
    else:
        if state.granularity == "parameter":
            segments = parameters
            problems = job.positions or [None] * len(job.sizes)
            contexts = [
                replace(context, segment=s, problem=None if p is None else (p,))
                for s, p in enumerate(problems)
            ]
        else:
            segments, contexts = None, [replace(context, problem=job.positions)]
        update = solve_problems(
            state,
            job.index,
            f"bucket {job.index}",
            comm,
            shards,
            averaging,
            contexts,
            segments,
            parameters,
        )
        future = _gather_into(job.buffer, comm, update)
    if job.is_last:
        state._end_step()
    return future


def _gather_into(
    buffer: torch.Tensor, comm: BucketComm, update: torch.Tensor
) -> torch.futures.Future[torch.Tensor]:
    """Step 7: all-gather every rank's slice into the bucket; the future resolves to it."""
    numel = buffer.numel()
    if update.numel() * comm.world_size == numel:  # no padding: gather straight into the bucket
        return comm.all_gather(buffer, update).get_future().then(lambda _: buffer)
    padded = buffer.new_empty(update.numel() * comm.world_size)
    future = comm.all_gather(padded, update).get_future()

    def unpad(_: torch.futures.Future) -> torch.Tensor:
        if padded.is_cuda:  # read on the callback's stream: keep the block until that is done
            padded.record_stream(torch.cuda.current_stream(padded.device))
        return buffer.copy_(padded[:numel])

    return future.then(unpad)


@dataclass(slots=True)
class _HeldBucket:
    """A bucket waiting for the global weights (``granularity="global"``)."""

    buffer: torch.Tensor
    comm: BucketComm
    objectives: torch.Tensor  # A_j, [L, c]
    gramian: torch.Tensor  # the bucket's all-reduced Gramian, [1, L, L]
    layout: ParameterLayout | None  # its parameters in the slice, when objectives may be absent
    counts: torch.Tensor | None  # their all-reduced presence counts, [P, L]
    # Completed with the combined bucket or an error; DDP holds ``outcome.then(unwrap_outcome)``.
    outcome: torch.futures.Future


def _hold_until_last_bucket(
    state: BucketMOOState,
    job: _Bucket,
    comm: BucketComm,
    shards: torch.Tensor,
    averaging: torch.Tensor,
    context: WeightingContext,
    layout: ParameterLayout | None,
) -> torch.futures.Future[torch.Tensor]:
    """Global MOO: all-reduce each bucket's Gramian as it comes, hold its slice, and at the last
    bucket weight the sum (the model's Gramian) once and send every bucket's combined slice.
    Absent objectives (``layout``): the model is one problem, so an objective is left out of the
    solve only if it is absent from every parameter.

    DDP waits for the buckets' futures only after backward, so the earlier ones can complete
    when the last bucket has been seen.
    """
    buffer = job.buffer
    objectives = objective_shards(shards, averaging)
    gramian = partial_gramians(objectives, [(0, objectives.shape[1])])
    gramian, counts = all_reduce_gramians(comm, gramian, shards, averaging, layout)
    check = state._gramian_check(
        f"bucket {job.index} at step {context.step}", context.objectives, averaging
    )
    if check is not None:
        check(gramian)
    devices = [buffer.device] if buffer.is_cuda else None
    state._held.append(
        _HeldBucket(
            buffer,
            comm,
            objectives,
            gramian,
            layout,
            counts,
            torch.futures.Future(devices=devices),
        )
    )
    if not job.is_last:
        return state._held[-1].outcome.then(unwrap_outcome)

    held = state._held  # cleared once every gather is issued: an error fails them all
    state.held_bytes = sum(h.objectives.numel() * h.objectives.element_size() for h in held)
    total = torch.stack([h.gramian for h in held]).sum(dim=0)
    present = None
    if all(h.counts is not None for h in held):
        present = partly_present(torch.cat([h.counts for h in held]))
    if present is None:
        weights, parameter_weights = segment_weights(state.weighting, total, [context]), None
    else:
        weights, parameter_weights = solve_present(
            state.weighting, total, [context], present, [0] * len(present)
        )
    if parameter_weights is None:
        updates = [
            combine_segments(weights, h.objectives, [(0, h.objectives.shape[1])], h.buffer.dtype)
            for h in held
        ]
    else:  # some parameters lack some of the model's objectives: weights of their own
        parts = parameter_weights.split([len(h.layout.segments) for h in held])
        updates = [
            combine_segments(part, h.objectives, h.layout.segments, h.buffer.dtype)
            for h, part in zip(held, parts, strict=True)
        ]
    if state.diagnostics is not None:  # one record: the whole model is one problem
        state.diagnostics.record(
            context.step, -1, context.objectives, total, weights, segmented=False
        )
    gathers = [
        _gather_into(h.buffer, h.comm, update) for h, update in zip(held, updates, strict=True)
    ]
    state._held = []
    # The earlier buckets' futures, already handed to DDP, complete with their gathers.
    for h, gather in zip(held[:-1], gathers[:-1], strict=True):
        gather.add_done_callback(functools.partial(_complete, h.outcome))
    return gathers[-1]


def _complete(
    target: torch.futures.Future[torch.Tensor], source: torch.futures.Future[torch.Tensor]
) -> None:
    """Give the outcome future ``target`` the outcome of the completed ``source``."""
    try:
        value = source.value()
    except BaseException as error:
        target.set_result(error)
    else:
        target.set_result(value)


def register_bucket_moo_hook(model: DistributedDataParallel, state: BucketMOOState) -> None:
    """Check that ``state`` fits ``model`` and register :func:`bucket_moo_hook` on it.

    Equivalent to ``model.register_comm_hook(state, bucket_moo_hook)`` with clear errors for
    setups the hook cannot serve. If ``state.process_group`` is ``None`` it adopts the model's
    group. It creates the gloo groups the hook needs beside it (README, "Process groups"), a
    rendezvous of the group's ranks: call it on all of them. It also tells the state the model's
    parameter order, which gives every problem a stable key (:attr:`WeightingContext.problem`)
    for weightings that keep state.

    Raises:
        TypeError: ``model`` is not a ``DistributedDataParallel`` or ``state`` not a
            ``BucketMOOState``.
        ValueError: DDP was built with ``mixed_precision`` (it installs its own comm hook), a comm
            hook is already registered, the state is registered on another model, the state's
            process group does not have the model's group's ranks, or ``objective_of_rank`` does
            not have one entry per rank of the model's group.
    """
    if not isinstance(model, DistributedDataParallel):
        raise TypeError(
            f"model must be a torch.nn.parallel.DistributedDataParallel, got {type(model).__name__}"
        )
    if not isinstance(state, BucketMOOState):
        raise TypeError(f"state must be a BucketMOOState, got {type(state).__name__}")
    if getattr(model, "mixed_precision", None) is not None:
        raise ValueError(
            "DDP(mixed_precision=...) installs its own comm hook, and DDP accepts one hook only; "
            "build DDP without mixed_precision (use torch.autocast, or bf16 parameters) to use "
            "bucket_moo_hook"
        )
    if getattr(model, "_comm_hooks", None):
        hooks = [hook.__qualname__ for hook, _ in model._comm_hooks]
        raise ValueError(f"the model already has a comm hook ({hooks}); DDP accepts one hook only")
    state._register(model, model.process_group, cpu_buckets=model.device_type == "cpu")
    state._parameter_index = {id(p): i for i, p in enumerate(model.module.parameters())}
    # Without find_unused_parameters (or static_graph) DDP fails any step where a rank leaves a
    # parameter unused, so no objective can be absent and the hook need not look.
    state._every_parameter_used = not (model.find_unused_parameters or model.static_graph)
    model.register_comm_hook(state, bucket_moo_hook)
