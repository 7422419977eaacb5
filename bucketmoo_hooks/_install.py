"""One call for any data-parallel wrapper: what ``accelerate`` and the Trainer callback use."""

from torch import nn
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
from torch.nn.parallel import DistributedDataParallel

from ._fsdp1 import register_fsdp_moo_hook
from ._fsdp2 import install_fsdp_moo
from ._hook import register_bucket_moo_hook
from ._state import BucketMOOState


def install_bucket_moo(model: nn.Module, state: BucketMOOState) -> str:
    """Install bucket-level MOO on ``model`` whatever data-parallel wrapper it has.

    Takes the model as ``accelerate``'s ``Accelerator.prepare`` (or any other code) returns it:
    ``DistributedDataParallel`` → :func:`register_bucket_moo_hook`; FSDP1
    ``FullyShardedDataParallel`` → :func:`register_fsdp_moo_hook`; a model with ``fully_shard``
    (FSDP2) modules → :func:`install_fsdp_moo`. Call it on every rank before the first backward.

    Returns:
        Which path was installed: ``"ddp"``, ``"fsdp1"`` or ``"fsdp2"``.

    Raises:
        TypeError: ``model`` is not distributed (e.g. ``accelerate`` with one process, where
            there is nothing to combine), or is wrapped in something else (DeepSpeed,
            ``torch.compile``: pass the wrapped module); as well as what the path itself raises.
    """
    if isinstance(model, DistributedDataParallel):
        register_bucket_moo_hook(model, state)
        return "ddp"
    if isinstance(model, FullyShardedDataParallel):
        register_fsdp_moo_hook(model, state)
        return "fsdp1"
    if isinstance(model, nn.Module) and any(isinstance(m, FSDPModule) for m in model.modules()):
        install_fsdp_moo(model, state)
        return "fsdp2"
    raise TypeError(
        f"model ({type(model).__name__}) is not wrapped for data parallelism: bucket-MOO needs "
        "DistributedDataParallel, FullyShardedDataParallel (FSDP1) or fully_shard (FSDP2), as "
        "Accelerator.prepare returns with several processes; with one process there is "
        "nothing to combine"
    )
