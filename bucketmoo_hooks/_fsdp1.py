"""FSDP1 (``FullyShardedDataParallel``): every unit's comm hook goes through the core.

Sharded strategies (``FULL_SHARD``, ``SHARD_GRAD_OP``) call the hook as ``hook(state, grad,
output)`` with the unit's padded flat gradient ``[R·c]`` and a ``[c]`` output, rank ``r`` owning
chunk ``r``: a reduce-scatter (with the shard protocol, docs/design.md §3 without step 7, the
bytes of a reduce-scatter). ``NO_SHARD`` calls ``hook(state, grad)`` and expects the reduced
gradient in place: an all-reduce, as DDP's bucket. FSDP1 runs no comm hook under the hybrid
strategies; FSDP2 with :func:`install_bucket_moo` (``hsdp_mesh=``) serves HSDP.
"""

from dataclasses import dataclass

import torch.distributed as dist
from torch import Tensor
from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

from . import _core
from ._collectives import Collectives
from ._linalg import row_segments
from ._protocol import Gradient
from ._runtime import ranks_of, register
from ._state import BucketMOOState
from ._units import BackwardSteps, FSDPUnit

_HYBRID = (ShardingStrategy.HYBRID_SHARD, ShardingStrategy._HYBRID_SHARD_ZERO2)


@dataclass(frozen=True, slots=True)
class _UnitHookState:
    """What FSDP1 passes to the hook of one unit: FSDP1 gives the hook no unit identity, so
    every unit gets its own hook state."""

    state: BucketMOOState
    unit: FSDPUnit
    steps: BackwardSteps
    group: dist.ProcessGroup


def _fsdp1_hook(hook_state: _UnitHookState, grad: Tensor, output: Tensor | None = None) -> None:
    state, unit = hook_state.state, hook_state.unit
    if not grad.is_floating_point():
        raise TypeError(
            f"{unit.label}: bucket-MOO needs floating-point gradients, got {grad.dtype}"
        )
    objective_map = hook_state.steps.objective_map(state.group, unit)
    for lo, hi in unit.frozen:  # FSDP drops these gradients after the reduction anyway
        grad[lo:hi].zero_()
    traffic = state.ledger.open_bucket(unit.index, grad.numel(), grad.element_size())
    comm = Collectives(hook_state.group, traffic, ranks_per_node=state.ranks_per_node)
    averaging = state._runtime.averaging(objective_map, grad.device)
    gradient = Gradient(grad, output, unit.segment_sizes)
    future = _core.reduce(state, comm, unit.bucket, gradient, objective_map, averaging)
    if future is not None:  # NO_SHARD: the reduced gradient in place
        future.wait()


def _unit_of(
    index: int, name: str, module: FullyShardedDataParallel, positions: dict[int, int]
) -> FSDPUnit | None:
    handle = module._handle
    if handle is None:  # manages no parameter: FSDP never calls its hook
        return None
    flat = handle.flat_param
    sizes: list[int] = []
    # Alignment padding (use_orig_params=True) holds zero gradients: it joins the parameter
    # before it, which leaves that parameter's Gramian unchanged.
    for numel, is_padding in zip(flat._numels_with_padding, flat._is_padding_mask, strict=True):
        if is_padding and sizes:
            sizes[-1] += numel
        else:
            sizes.append(numel)
    if id(flat) in positions:  # use_orig_params=False: model.parameters() yields flat params
        problem = (positions[id(flat)],)
        parameter_problems = tuple((positions[id(flat)], s) for s in range(len(sizes)))
        return FSDPUnit(index, name, problem, parameter_problems, tuple(sizes))
    originals = [positions[id(p)] for p in flat._params]
    ranges = row_segments(sizes)
    frozen = tuple(r for r, p in zip(ranges, flat._params, strict=True) if not p.requires_grad)
    parameter_problems = tuple((p,) for p in originals)
    return FSDPUnit(index, name, tuple(originals), parameter_problems, tuple(sizes), frozen)


def install_fsdp1(model: FullyShardedDataParallel, state: BucketMOOState) -> list[FSDPUnit]:
    """:func:`~bucketmoo_hooks.install_bucket_moo` for FSDP1: a comm hook with its own hook state
    on every unit, unit ``i`` being the ``i``-th ``FullyShardedDataParallel`` instance in
    ``model.modules()`` order (its bucket id). FSDP1 divides nothing when a comm hook is
    registered, and the hook writes the combination on the scale of an average. Returns the
    units (instances that manage no parameter are skipped)."""
    if not model.check_is_root():
        raise TypeError("model must be the root FullyShardedDataParallel instance")
    if state.granularity == "global":
        raise ValueError(
            "granularity='global' is DDP-only: FSDP consumes each unit's reduced gradient as "
            "soon as the hook returns, so no unit can wait for the whole model's weights; use "
            "granularity='bucket' or 'parameter'"
        )
    modules = [
        # Names as in the unwrapped model: FSDP1 inserts "_fsdp_wrapped_module." into paths.
        (name.replace("_fsdp_wrapped_module.", ""), m)
        for name, m in model.named_modules()
        if isinstance(m, FullyShardedDataParallel)
    ]
    for index, (name, module) in enumerate(modules):
        label = f"FSDP unit {index} ({name or 'root'!r})"
        if module.sharding_strategy in _HYBRID:
            raise ValueError(
                f"{label} uses {module.sharding_strategy.name}: FSDP1 runs no comm hook under "
                "hybrid sharding; use FSDP2 (fully_shard over the shard dimension) with "
                "install_bucket_moo(..., hsdp_mesh=mesh)"
            )
        if module._comm_hook is not None:
            raise ValueError(f"{label} already has a comm hook; FSDP accepts one hook only")
        if ranks_of(module.process_group) != ranks_of(model.process_group):
            raise ValueError(f"{label} reduces over another group than the root")
    register(state, model, model.process_group, cpu_buckets=False)
    positions = {id(p): i for i, p in enumerate(model.parameters())}
    steps = BackwardSteps(state)
    model.register_comm_hook(None, _fsdp1_hook)
    units = []
    for index, (name, module) in enumerate(modules):
        unit = _unit_of(index, name, module, positions)
        if unit is not None:
            # The public API gives every unit the same hook state; each needs its own.
            module._comm_hook_state = _UnitHookState(state, unit, steps, module.process_group)
            units.append(unit)
    return units
