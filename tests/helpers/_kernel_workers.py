"""Functions run on every rank by the kernel tests (module level: spawned processes import them)."""

from pathlib import Path

import torch
from _emulator import EmulatedBackend
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from bucketmoo_hooks import BucketMOOState, _shard, install_bucket_moo
from bucketmoo_hooks._kernels import FusedBucket


def train_with_emulated_kernels(
    rank: int, world_size: int, granularity: str, emulate: bool, cache_dir: str
) -> list[torch.Tensor]:
    """Two steps of DDP under the hook; with ``emulate``, every bucket's compute runs in the
    kernels on the CPU emulator. Returns the gradients the hook wrote at the last step."""
    if emulate:
        backend = EmulatedBackend(Path(cache_dir))

        def emulated(choice, shards, averaging, segments):
            return FusedBucket(backend, shards, averaging, segments)

        _shard.fused_kernels = emulated
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 301), nn.Tanh(), nn.Linear(301, 7))
    ddp = DistributedDataParallel(model, bucket_cap_mb=0.004)
    state = BucketMOOState(objective_of_rank=[0, 1, 0][:world_size], granularity=granularity)
    install_bucket_moo(ddp, state)
    generator = torch.Generator().manual_seed(rank)
    for _ in range(2):
        ddp.zero_grad()
        inputs = torch.randn(8, 10, generator=generator)
        ddp(inputs).sin().sum().backward()
    return [parameter.grad.clone() for parameter in model.parameters()]


def fused_and_plain(
    rank: int, world_size: int, granularity: str, cache_dir: str
) -> dict[str, list[torch.Tensor]]:
    """:func:`train_with_emulated_kernels` with the kernels, then (the patch undone) without."""
    fused_kernels = _shard.fused_kernels
    try:
        fused = train_with_emulated_kernels(rank, world_size, granularity, True, cache_dir)
    finally:
        _shard.fused_kernels = fused_kernels
    plain = train_with_emulated_kernels(rank, world_size, granularity, False, cache_dir)
    return {"fused": fused, "plain": plain}
