"""Functions run on every rank by test_objective_ids (module level, so spawned processes import
them): objective ids and weighting configurations that ranks must see alike."""

import functools
import gc
from collections.abc import Callable
from typing import Any

import torch
from _ddp_workers import batch, hooked_backward, make_model
from torch import Tensor, nn
from torch.distributed.fsdp import fully_shard

from bucketmoo_hooks import BucketMOOState, install_bucket_moo


def tempered(gramian: Tensor, temperature: float) -> Tensor:
    """A weighting with a hyperparameter, for ``functools.partial``."""
    return torch.softmax(-gramian.diagonal() / temperature, dim=0)


def scaled(scale: float) -> Callable[[Tensor], Tensor]:
    """A weighting whose hyperparameter is a closure variable."""

    def weights(gramian: Tensor) -> Tensor:
        return torch.full((gramian.shape[0],), scale / gramian.shape[0])

    return weights


def _fsdp2_step(rank: int, state: BucketMOOState) -> str:
    model = make_model((7,), torch.float32)
    fully_shard(model)
    install_bucket_moo(model, state)
    x, target = batch(rank, 0, 0, torch.float32)
    loss = nn.functional.mse_loss(model(x), target)
    try:
        loss.backward()
        outcome = "no error"
    except (ValueError, RuntimeError) as error:
        outcome = f"{type(error).__name__}: {error}"
    del model, loss
    gc.collect()
    return outcome


def id_and_weighting_checks(rank: int, world_size: int) -> dict[str, Any]:
    """Every scenario of one launch (launching is the slow part): what each step did or raised."""
    results: dict[str, Any] = {}
    # 0-d tensor ids, as a default collate yields them: one objective per value on every rank.
    state = BucketMOOState([torch.tensor(r) for r in range(world_size)])
    results["tensor_map_outcome"] = hooked_backward(rank, state)
    results["tensor_map_objectives"] = state.objective_map and state.objective_map.num_objectives
    state = BucketMOOState()
    state.set_objective(torch.tensor(0))
    results["tensor_set_outcome"] = hooked_backward(rank, state)
    results["tensor_set_objectives"] = state.objective_map and state.objective_map.num_objectives
    # Rank 0 sets its objective, the others forget to.
    for overlap in (False, True):
        state = BucketMOOState(overlap=overlap)
        if rank == 0:
            state.set_objective("en")
        results[f"mixed_set_overlap_{overlap}"] = hooked_backward(rank, state)
    state = BucketMOOState(weighting=functools.partial(tempered, temperature=1.0))
    results["partial"] = hooked_backward(rank, state)
    results["closures"] = hooked_backward(rank, BucketMOOState(weighting=scaled(1.0 + rank)))
    state = BucketMOOState()
    if rank == 0:
        state.set_objective("en")
    results["mixed_set_fsdp2"] = _fsdp2_step(rank, state)
    return results
