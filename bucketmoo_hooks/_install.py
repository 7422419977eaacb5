"""One installer for every engine: DDP, FSDP2 (and HSDP), FSDP1."""

from dataclasses import dataclass

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
from torch.nn.parallel import DistributedDataParallel

from ._ddp import install_ddp
from ._deepspeed import install_deepspeed, is_deepspeed_engine
from ._fsdp1 import install_fsdp1
from ._fsdp2 import install_fsdp2
from ._state import BucketMOOState
from ._units import FSDPUnit


@dataclass(frozen=True, slots=True)
class Installation:
    """What :func:`install_bucket_moo` installed.

    Attributes:
        engine: ``"ddp"``, ``"fsdp1"``, ``"fsdp2"`` or ``"deepspeed"``.
        units: FSDP: the units, in module order (unit ``i``'s index is its bucket id in
            diagnostics and the ledger); DDP and DeepSpeed: empty (they form their buckets
            during backward).
        zero_stage: DeepSpeed: the ZeRO stage (1, 2 or 3); else ``None``.
    """

    engine: str
    units: tuple[FSDPUnit, ...] = ()
    zero_stage: int | None = None


def install_bucket_moo(
    model: nn.Module, state: BucketMOOState, *, hsdp_mesh: DeviceMesh | None = None
) -> Installation:
    """Make ``model``'s gradient reduction conflict-aware with ``state``, whatever its engine.

    - ``DistributedDataParallel``: registers :func:`bucket_moo_hook` as its comm hook (what
      ``model.register_comm_hook(state, bucket_moo_hook)`` does, with clear errors for setups
      the hook cannot serve), and tells the state the model's parameter order, which gives
      every problem a stable key (:attr:`WeightingContext.problem`) for stateful weightings.
    - FSDP2 (a model with ``fully_shard`` modules): replaces every unit's reduce-scatter and
      takes over FSDP's gradient scaling (docs/fsdp.md). Gradient accumulation
      (``set_requires_gradient_sync(False)``), ``MixedPrecisionPolicy`` (the Gramian stays
      fp32) and ``CPUOffloadPolicy`` work unchanged.
    - HSDP: FSDP2 sharded over ``hsdp_mesh["shard"]`` with ``hsdp_mesh`` the 2-D
      ``(replicate, shard)`` mesh; every replica trains one objective, and the cross-replica
      all-reduce becomes the conflict-aware step.
    - FSDP1 (the root ``FullyShardedDataParallel``, before its first forward): a comm hook on
      every unit; ``no_sync()`` and ``MixedPrecision(reduce_dtype=...)`` work unchanged.
    - DeepSpeed (the ``DeepSpeedEngine`` that ``deepspeed.initialize`` returns) with ZeRO 1, 2
      or 3: replaces the ZeRO optimizer's bucket reduction (docs/deepspeed.md); ZeRO-1/2
      buckets are reduced as all-reduces, ZeRO-3 buckets as reduce-scatters.

    Takes the model as ``accelerate``'s ``Accelerator.prepare`` returns it. Call it on every
    rank of the group before the first backward: it creates the gloo groups the hook needs
    beside the model's (a rendezvous of its ranks, docs/protocols.md). If
    ``state.process_group`` is ``None`` the state adopts the model's group (FSDP2: the units'
    shard group; HSDP: the default group, which must span the mesh); ``objective_of_rank`` has
    one entry per rank of that group.

    Raises:
        TypeError: ``model`` is not distributed (e.g. ``accelerate`` with one process, where
            there is nothing to combine) or wrapped in something else (``torch.compile``:
            pass the wrapped module), ``state`` is not a :class:`BucketMOOState`, or
            ``hsdp_mesh`` is given for another engine than FSDP2.
        ValueError: The engine is set up in a way the hook cannot serve, named with the unit
            and the fix: ``DDP(mixed_precision=...)``, a comm hook or custom reduce-scatter
            already installed, FSDP1 hybrid sharding, native 2-D HSDP meshes,
            ``granularity="global"`` with FSDP or DeepSpeed, DeepSpeed options that bypass the
            reduction (named by their configuration key), a state already installed on another
            model, a state whose group lacks the model's ranks, or ``objective_of_rank`` without
            one entry per rank.
        RuntimeError: The installed torch's FSDP2 lacks an API this needs.
    """
    if not isinstance(state, BucketMOOState):
        raise TypeError(f"state must be a BucketMOOState, got {type(state).__name__}")
    if is_deepspeed_engine(model):
        if hsdp_mesh is not None:
            raise TypeError("hsdp_mesh is for FSDP2 models, but model is a DeepSpeedEngine")
        return Installation("deepspeed", zero_stage=install_deepspeed(model, state))
    wrapped = isinstance(model, DistributedDataParallel | FullyShardedDataParallel)
    fsdp2 = isinstance(model, nn.Module) and any(isinstance(m, FSDPModule) for m in model.modules())
    if hsdp_mesh is not None and (wrapped or not fsdp2):
        raise TypeError(
            f"hsdp_mesh is for FSDP2 models (fully_shard over hsdp_mesh['shard']), but model is "
            f"a {type(model).__name__}"
        )
    if isinstance(model, DistributedDataParallel):
        install_ddp(model, state)
        return Installation("ddp")
    if isinstance(model, FullyShardedDataParallel):
        return Installation("fsdp1", tuple(install_fsdp1(model, state)))
    if fsdp2:
        return Installation("fsdp2", tuple(install_fsdp2(model, state, hsdp_mesh=hsdp_mesh)))
    raise TypeError(
        f"model ({type(model).__name__}) is not wrapped for data parallelism: bucket-MOO needs "
        "DistributedDataParallel, FullyShardedDataParallel (FSDP1), fully_shard (FSDP2), as "
        "Accelerator.prepare returns with several processes, or the DeepSpeedEngine that "
        "deepspeed.initialize returns; with one process there is nothing to combine"
    )
