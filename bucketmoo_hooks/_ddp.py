# No ``from __future__ import annotations`` here: DDP inspects the hook's annotations and only
# accepts the real ``dist.GradBucket`` / ``Future[Tensor]`` objects, not strings.
"""DDP: the comm hook that hands every bucket to the core, and its installer."""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from . import _core
from ._collectives import Collectives
from ._ledger import BucketTraffic
from ._protocol import Bucket, Gradient
from ._runtime import register
from ._state import BucketMOOState


def bucket_moo_hook(
    state: BucketMOOState, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: conflict-aware combination of the ranks' objective gradients per bucket.

    Runs the state's protocol on the bucket (:mod:`._core`); with the default ``"shard"``
    (docs/design.md §3): all-to-all of the (padded) bucket, group-average by objective, fp32
    partial Gramian, all-reduce of the ``L×L`` Gramian, weights on the device, combined slice,
    all-gather of the slices into the bucket. Per rank it sends ``2(R−1)/R · n · b`` bytes, as a
    ring all-reduce, plus ``L²`` fp32 numbers; it never holds the ``L`` objective gradients of
    the whole bucket. Every slice of the result is produced by exactly one rank, so replicas
    stay bitwise identical.

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
    index, parameters = bucket.index(), bucket.parameters()
    positions = _positions(state, index, parameters)
    job = _Job(
        bucket=Bucket(
            index=index,
            label=f"bucket {index}",
            problem=positions,
            parameter_problems=[None] * len(parameters)
            if positions is None
            else [(p,) for p in positions],
        ),
        buffer=buffer,
        is_last=bucket.is_last(),
        # DDP's reducer launches buckets strictly in index order, so bucket 0 opens every step.
        opens_step=index == 0,
        sizes=[p.numel() for p in parameters],
        traffic=state.ledger.open_bucket(index, buffer.numel(), buffer.element_size()),
    )
    if not state.overlap:
        return _reduce(state, group, job)
    if buffer.is_cuda:
        # ``work.wait()`` on NCCL makes the current stream wait: on the side stream, backward's
        # stream runs on while the bucket is exchanged; DDP's wait on the future orders it after.
        side = state._runtime.side_stream(buffer.device)
        side.wait_stream(torch.cuda.current_stream(buffer.device))
        with torch.cuda.stream(side):
            return _reduce(state, group, job)
    # The step's objective exchange runs on the worker too (over its group, in order with its
    # collectives): done here, it would stall backward until the slowest rank reached bucket 0.
    worker = state._runtime.overlap_worker(group)
    return worker.submit(
        state.iter, index, job.opens_step, lambda: _reduce(state, worker.group, job)
    )


@dataclass(frozen=True, slots=True)
class _Job:
    """One bucket to reduce, as read from DDP's ``GradBucket`` and the state at hook time."""

    bucket: Bucket
    buffer: torch.Tensor
    is_last: bool
    opens_step: bool  # bucket 0: the step's agreement first
    sizes: list[int]  # elements of each parameter, in bucket order
    traffic: BucketTraffic


def _reduce(
    state: BucketMOOState, group: dist.ProcessGroup, job: _Job
) -> torch.futures.Future[torch.Tensor]:
    """The bucket through the core over ``group``; the future resolves to the reduced bucket.

    Opens the step at bucket 0 and closes it once the last bucket's collectives are issued.
    """
    try:
        if job.opens_step:
            objective_map = _core.open_step(state, group)
        else:
            objective_map = _core.step_map(state, job.bucket)
        averaging = state._runtime.averaging(objective_map, job.buffer.device)
        future = _core.reduce(
            state,
            Collectives(group, job.traffic, ranks_per_node=state.ranks_per_node),
            job.bucket,
            Gradient(job.buffer, None, job.sizes),
            objective_map,
            averaging,
            last=job.is_last,
        )
        assert future is not None  # an all-reduce's result
        if job.is_last:
            _core.close_step(state)
        return future
    except BaseException as error:
        # Global MOO: the held buckets' futures would never complete, and DDP waits on them.
        state._runtime.fail_held(error)
        raise


def _positions(
    state: BucketMOOState, index: int, parameters: list[torch.Tensor]
) -> tuple[int, ...] | None:
    """Positions in ``model.parameters()`` of bucket ``index``'s parameters, if the model is
    known."""
    position = state._runtime.parameter_index
    if position is None:
        return None
    try:
        return tuple(position[id(p)] for p in parameters)
    except KeyError:
        raise ValueError(
            f"bucket_moo_hook: bucket {index} holds parameters of another model than "
            "the one this BucketMOOState was registered on; create one state per DDP model"
        ) from None


def install_ddp(
    model: DistributedDataParallel, state: BucketMOOState, hook: Callable = bucket_moo_hook
) -> None:
    """:func:`~bucketmoo_hooks.install_bucket_moo` for DDP: checks, then registers
    :func:`bucket_moo_hook` (or ``hook``, a wrapper of it: the benchmarks time it), telling the
    state the model's parameter order (stable problem keys
    for stateful weightings) and whether DDP lets ranks leave parameters unused."""
    if getattr(model, "mixed_precision", None) is not None:
        raise ValueError(
            "DDP(mixed_precision=...) installs its own comm hook, and DDP accepts one hook only; "
            "build DDP without mixed_precision (use torch.autocast, or bf16 parameters) to use "
            "bucket_moo_hook"
        )
    if getattr(model, "_comm_hooks", None):
        hooks = [hook.__qualname__ for hook, _ in model._comm_hooks]
        raise ValueError(f"the model already has a comm hook ({hooks}); DDP accepts one hook only")
    register(state, model, model.process_group, cpu_buckets=model.device_type == "cpu")
    runtime = state._runtime
    runtime.parameter_index = {id(p): i for i, p in enumerate(model.module.parameters())}
    # Without find_unused_parameters (or static_graph) DDP fails any step where a rank leaves a
    # parameter unused, so no objective can be absent and the hook need not look.
    runtime.every_parameter_used = not (model.find_unused_parameters or model.static_graph)
    model.register_comm_hook(state, hook)
