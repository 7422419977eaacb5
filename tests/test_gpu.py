"""CUDA checks: the hook's per-bucket work runs on the device with no host synchronisation.

Skipped without a GPU. Multi-rank NCCL needs several GPUs, so the protocol's device compute is
checked with ``R`` simulated ranks on one device (the Gramian all-reduce over a one-rank NCCL
group is the identity), and the real DDP hook on a one-rank NCCL group.
"""

import pytest
import torch
import torch.distributed as dist
from _distributed import run_distributed

from bucketmoo_hooks import BucketMOOState, ObjectiveMap, bucket_moo_hook, reference
from bucketmoo_hooks._ledger import BucketTraffic
from bucketmoo_hooks._protocol import BucketComm, solve_shards
from bucketmoo_hooks.weightings import WeightingContext, get_weighting, weighting_names

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("name", weighting_names())
@pytest.mark.parametrize("num_objectives", [1, 2, 3, 8])
def test_weightings_do_not_synchronise(name: str, num_objectives: int) -> None:
    grads = torch.randn(num_objectives, 1000, device="cuda")
    gramian = grads @ grads.T
    expected = get_weighting(name)(gramian.cpu())
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        weights = get_weighting(name)(gramian)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert weights.device == gramian.device
    torch.testing.assert_close(weights.cpu(), expected, rtol=1e-5, atol=1e-6)


def solve_simulated_ranks(rank: int, world_size: int, dtype: torch.dtype) -> float:
    """Run steps 2–6 on the GPU for 6 simulated ranks under sync-debug "error"."""
    ids = ["en", "de", "en", "ja", "ko", "ko"]
    objective_map = ObjectiveMap.from_ids(ids)
    grads = torch.randn(len(ids), 100_003, device="cuda").to(dtype)
    averaging = objective_map.averaging_matrix("cuda")
    comm = BucketComm(dist.group.WORLD, BucketTraffic(0, grads.numel(), grads.element_size()))
    context = WeightingContext(0, 0, objective_map.objectives)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        update = solve_shards(comm, grads, averaging, get_weighting("mgda"), [context]).update
    finally:
        torch.cuda.set_sync_debug_mode(0)
    expected = reference.bucket_update(grads.cpu(), ids, "mgda")
    scale = reference.objective_gradients(grads.cpu(), ids)[0].norm(dim=1).max()
    return ((update.cpu().double() - expected.double()).norm() / scale).item()


@pytest.mark.parametrize(
    ("dtype", "tolerance"),
    [(torch.float32, 1e-6), (torch.bfloat16, 8e-3), (torch.float16, 1e-3)],
)
def test_protocol_compute_on_cuda(dtype: torch.dtype, tolerance: float) -> None:
    [error] = run_distributed(1, solve_simulated_ranks, dtype, backend="nccl")
    assert error <= tolerance


def ddp_on_cuda(rank: int, world_size: int) -> dict:
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 257), torch.nn.GELU(), torch.nn.Linear(257, 31)
    ).cuda()
    ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.05)
    state = BucketMOOState(weighting="mgda")

    def strict_hook(
        state: BucketMOOState, bucket: dist.GradBucket
    ) -> torch.futures.Future[torch.Tensor]:
        torch.cuda.set_sync_debug_mode("error")
        try:
            return bucket_moo_hook(state, bucket)
        finally:
            torch.cuda.set_sync_debug_mode(0)

    ddp.register_comm_hook(state, strict_hook)
    for _ in range(3):
        ddp(torch.randn(16, 64, device="cuda")).square().mean().backward()
        for parameter in model.parameters():
            assert torch.isfinite(parameter.grad).all()
        ddp.zero_grad()
    return {"iter": state.iter, "separate_group": state._metadata_group is not None}


def test_ddp_hook_on_nccl_without_host_sync() -> None:
    [result] = run_distributed(1, ddp_on_cuda, backend="nccl")
    assert result == {"iter": 3, "separate_group": True}
