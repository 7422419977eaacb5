"""Functions run on every rank by the process-group tests (module level, so spawned processes
import them)."""

import functools
import gc
from typing import Any

import torch
import torch.distributed as dist
from _ddp_workers import batch, make_model
from _fsdp_workers import error_of
from torch import Tensor, nn
from torch.distributed import distributed_c10d as c10d
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
from torch.nn.parallel import DistributedDataParallel

import bucketmoo_hooks._runtime
from bucketmoo_hooks import (
    BucketMOOState,
    bucket_moo_hook,
    install_bucket_moo,
    reference,
)
from bucketmoo_hooks._compat import all_gather_single
from bucketmoo_hooks._groups import group_timeout

CPU = torch.device("cpu")


def _train(model: nn.Module, rank: int, steps: int) -> list[Tensor]:
    """``steps`` SGD steps on the rank's data; every step's local gradient (sharded for FSDP2)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    grads = []
    for step in range(steps):
        x, target = batch(rank, step, 0, torch.float32)
        nn.functional.mse_loss(model(x), target).backward()
        local = [getattr(p.grad, "_local_tensor", p.grad) for p in model.parameters()]
        grads.append(torch.cat([g.flatten() for g in local]))
        optimizer.step()
        optimizer.zero_grad()
    return grads


def _parameters(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _group_count() -> int:
    return len(c10d._world.pg_names)


def asymmetric_subgroups(rank: int, world_size: int) -> dict[str, Any]:
    """Subgroups that leave a rank out, created before the hook's gloo groups: training must go
    through, with the helper groups made under the same name on every rank."""
    # As on NCCL: every group gets a gloo host group for the objective exchange.
    bucketmoo_hooks._runtime.has_cpu_backend = lambda group: False
    seen: dict[str, Any] = {}
    dist.new_group([0])  # every rank calls it, as torch requires; rank 1 is not a member
    # register_comm_hook directly: the groups are made inside the first backward.
    raw = make_model((7,), torch.float32)
    ddp = DistributedDataParallel(raw, bucket_cap_mb=0.001)
    state = BucketMOOState(["a", "b"])
    ddp.register_comm_hook(state, bucket_moo_hook)
    _train(ddp, rank, 2)
    seen["raw_iter"] = state.iter
    if rank == 0:  # local synchronisation: only the members call it
        dist.new_group([0], use_local_synchronization=True)
    # A group in the other rank order (its own gloo copies), adopted at registration, which makes
    # them; the state's objective ids follow that order: global rank 1 trains "b".
    timeout = group_timeout(dist.group.WORLD)
    backwards = dist.new_group([1, 0], timeout=timeout, sort_ranks=False)
    model = make_model((7,), torch.float32)
    ddp = DistributedDataParallel(model, process_group=backwards, bucket_cap_mb=0.001)
    before = _group_count()
    adopted = BucketMOOState(["b", "a"])
    install_bucket_moo(ddp, adopted)
    seen["made_at_registration"] = _group_count() - before
    other = DistributedDataParallel(
        make_model((7,), torch.float32), process_group=backwards, bucket_cap_mb=0.001
    )
    before = _group_count()
    second = BucketMOOState(["b", "a"])
    install_bucket_moo(other, second)  # same ranks: the same groups
    seen["made_for_second_state"] = _group_count() - before
    before = _group_count()
    _train(ddp, rank, 2)
    _train(other, rank, 1)
    # Both models in one backward: their buckets interleave on the one shared worker thread.
    x, target = batch(rank, 5, 0, torch.float32)
    (nn.functional.mse_loss(ddp(x), target) + nn.functional.mse_loss(other(x), target)).backward()
    seen["made_in_backward"] = _group_count() - before
    copy = adopted._runtime._worker.group
    seen["copy_ranks"] = dist.get_process_group_ranks(copy)
    seen["copy_rank_is_group_rank"] = copy.rank() == backwards.rank()
    seen["same_timeout"] = (
        group_timeout(copy) == group_timeout(adopted._runtime._host_group) == timeout
    )
    seen["shared"] = (
        second._runtime._worker is adopted._runtime._worker
        and second._runtime._host_group is adopted._runtime._host_group
    )
    seen["iters"] = (adopted.iter, second.iter)
    seen["params"] = _parameters(model)
    seen["raw_params"] = _parameters(raw)
    return seen


def one_state_two_models(rank: int, world_size: int) -> dict[str, str]:
    """A state given to a second model: refused at registration, by every registration function;
    a state that meets another model's bucket through ``register_comm_hook``: a clear error."""
    errors = {}
    state = BucketMOOState()
    encoder = DistributedDataParallel(make_model((7,), torch.float32))
    decoder = DistributedDataParallel(make_model((7,), torch.float32))
    install_bucket_moo(encoder, state)
    errors["ddp"] = error_of(functools.partial(install_bucket_moo, decoder, state))

    def fsdp2() -> nn.Module:
        model = make_model((7,), torch.float32)
        fully_shard(model)
        return model

    fsdp_state = BucketMOOState()
    install_bucket_moo(fsdp2(), fsdp_state)
    errors["fsdp2"] = error_of(lambda: install_bucket_moo(fsdp2(), fsdp_state))

    def fsdp1() -> nn.Module:
        return FullyShardedDataParallel(make_model((7,), torch.float32), device_id=CPU)

    fsdp1_state = BucketMOOState()
    install_bucket_moo(fsdp1(), fsdp1_state)
    errors["fsdp1"] = error_of(lambda: install_bucket_moo(fsdp1(), fsdp1_state))
    errors["ddp_then_fsdp2"] = error_of(lambda: install_bucket_moo(fsdp2(), state))
    # register_comm_hook directly on the decoder, with the encoder's state.
    decoder.register_comm_hook(state, bucket_moo_hook)
    errors["raw"] = error_of(functools.partial(_train, decoder, rank, 1))
    # A reducer whose backward was interrupted can abort the process if destroyed after the
    # process group; free it while the group lives.
    del decoder
    gc.collect()
    return errors


def two_ranks(rank: int, world_size: int) -> dict[str, Any]:
    """Both scenarios of two ranks in one spawn; the subgroups first, before the one-model checks
    make the default group's helper groups."""
    return {
        "groups": asymmetric_subgroups(rank, world_size),
        "errors": one_state_two_models(rank, world_size),
    }


def subgroup_models(rank: int, world_size: int) -> dict[str, Any]:
    """Two subgroups of two ranks, a model on each (DDP, FSDP1, FSDP2) and a state with
    ``process_group=None`` and one objective per rank of the subgroup: the state adopts it."""
    subgroup, _ = dist.new_subgroups(2)
    members = dist.get_process_group_ranks(subgroup)
    seen: dict[str, Any] = {"members": members}
    seen["wrong_length"] = error_of(
        lambda: install_bucket_moo(
            DistributedDataParallel(make_model((7,), torch.float32), process_group=subgroup),
            BucketMOOState(["a", "b", "c"]),
        )
    )
    # DDP, MGDA over the whole model, against the reference from the subgroup's local gradients.
    local = make_model((7,), torch.float32)
    [own] = _train(local, rank, 1)
    rows = own.new_empty(2 * own.numel())
    all_gather_single(rows, own, group=subgroup)
    expected = reference.combine(rows.view(2, -1), "mgda").update
    ddp = DistributedDataParallel(
        make_model((7,), torch.float32), process_group=subgroup, bucket_cap_mb=0.001
    )
    state = BucketMOOState(["a", "b"], granularity="global")
    install_bucket_moo(ddp, state)
    [combined] = _train(ddp, rank, 1)
    seen["ddp_error"] = (combined - expected).abs().max().item()
    seen["ddp_scale"] = expected.abs().max().item()
    seen["ddp_adopted"] = state.process_group is subgroup
    # FSDP, equal weights: the subgroup's average, as FSDP's own reduce-scatter gives it.
    mesh = DeviceMesh.from_group(subgroup, "cpu")
    for version in (1, 2):
        grads = []
        for hooked in (False, True):
            model = make_model((7,), torch.float32)
            if version == 1:
                model = FullyShardedDataParallel(model, process_group=subgroup, device_id=CPU)
            else:
                fully_shard(model, mesh=mesh)
            if hooked:
                state = BucketMOOState(["a", "b"], weighting="mean")
                install = install_bucket_moo
                install(model, state)
                seen[f"fsdp{version}_adopted"] = members == dist.get_process_group_ranks(
                    state.process_group
                )
            grads += _train(model, rank, 1)
        seen[f"fsdp{version}_error"] = (grads[1] - grads[0]).abs().max().item()
    return seen
