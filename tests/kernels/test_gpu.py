"""CUDA checks: the hook's per-bucket work runs on the device with no host synchronisation, and
the fused kernels (csrc/, through CuPy) equal the torch path.

Skipped without a GPU. Multi-rank NCCL needs several GPUs, so the protocol's device compute is
checked with ``R`` simulated ranks on one device (the Gramian all-reduce over a one-rank NCCL
group is the identity), and the real DDP hook on a one-rank NCCL group. Run on a GPU machine
with ``python -m pytest -q tests/kernels/test_gpu.py``; the kernel tests also need CuPy (the
``cuda`` extra).
"""

import importlib.util
import itertools
import random

import pytest
import torch
import torch.distributed as dist
from _distributed import run_distributed
from _gpu_workers import GPU_ONLY
from _kernel_checks import (
    LocalComm,
    Segments,
    assert_gramians_close,
    assert_update_close,
    bucket,
    contexts_for,
    exact_gramians,
    gramian_error,
    problem_weights,
    solve_shards,
)

from bucketmoo_hooks import BucketMOOState, ObjectiveMap, bucket_moo_hook, reference
from bucketmoo_hooks._collectives import Collectives
from bucketmoo_hooks._kernels import fused_kernels, probe_kernels
from bucketmoo_hooks._ledger import BucketTraffic
from bucketmoo_hooks._linalg import combine_segments, objective_shards
from bucketmoo_hooks.weightings import MGDA, WeightingContext, get_weighting, weighting_names

pytestmark = GPU_ONLY
needs_cupy = pytest.mark.skipif(
    importlib.util.find_spec("cupy") is None, reason="needs CuPy (pip install '.[cuda]')"
)


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


def solve_simulated_ranks(rank: int, world_size: int, dtype: torch.dtype, kernels: str) -> float:
    """Run steps 2–6 on the GPU for 6 simulated ranks under sync-debug "error"."""
    ids = ["en", "de", "en", "ja", "ko", "ko"]
    objective_map = ObjectiveMap.from_ids(ids)
    grads = torch.randn(len(ids), 100_003, device="cuda").to(dtype)
    averaging = objective_map.averaging_matrix("cuda")
    comm = Collectives(dist.group.WORLD, BucketTraffic(0, grads.numel(), grads.element_size()))
    context = WeightingContext(0, 0, objective_map.objectives)
    if kernels == "cuda":  # as BucketMOOState(kernels="cuda") does: the probe synchronises once
        assert probe_kernels(grads.device) is None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        update = solve_shards(
            comm, grads, averaging, get_weighting("mgda"), [context], None, kernels
        ).update
    finally:
        torch.cuda.set_sync_debug_mode(0)
    expected = reference.bucket_update(grads.cpu(), ids, "mgda")
    scale = reference.objective_gradients(grads.cpu(), ids)[0].norm(dim=1).max()
    return ((update.cpu().double() - expected.double()).norm() / scale).item()


@pytest.mark.parametrize("kernels", ["torch", pytest.param("cuda", marks=needs_cupy)])
@pytest.mark.parametrize(
    ("dtype", "tolerance"),
    [(torch.float32, 1e-6), (torch.bfloat16, 8e-3), (torch.float16, 1e-3)],
)
def test_protocol_compute_on_cuda(dtype: torch.dtype, tolerance: float, kernels: str) -> None:
    [error] = run_distributed(1, solve_simulated_ranks, dtype, kernels, backend="nccl")
    assert error <= tolerance


def ddp_on_cuda(rank: int, world_size: int, kernels: str, granularity: str) -> dict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 257), torch.nn.GELU(), torch.nn.Linear(257, 31)
    ).cuda()
    ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.05)
    state = BucketMOOState(weighting="mgda", kernels=kernels, granularity=granularity)

    def strict_hook(
        state: BucketMOOState, bucket: dist.GradBucket
    ) -> torch.futures.Future[torch.Tensor]:
        torch.cuda.set_sync_debug_mode("error")
        try:
            return bucket_moo_hook(state, bucket)
        finally:
            torch.cuda.set_sync_debug_mode(0)

    # As install_bucket_moo does for a DDP without find_unused_parameters: no presence
    # check, whose host read would be a synchronisation (README, "Language-specific parameters").
    state._runtime.every_parameter_used = True
    ddp.register_comm_hook(state, strict_hook)
    for _ in range(3):
        ddp(torch.randn(16, 64, device="cuda")).square().mean().backward()
        for parameter in model.parameters():
            assert torch.isfinite(parameter.grad).all()
        grads = [parameter.grad.cpu() for parameter in model.parameters()]
        ddp.zero_grad()
    return {
        "iter": state.iter,
        "separate_group": state._runtime._host_group is not None,
        "grads": grads,
    }


@pytest.mark.parametrize("granularity", ["bucket", "parameter", "global"])
@pytest.mark.parametrize("kernels", ["torch", pytest.param("cuda", marks=needs_cupy)])
def test_ddp_hook_on_nccl_without_host_sync(kernels: str, granularity: str) -> None:
    [result] = run_distributed(1, ddp_on_cuda, kernels, granularity, backend="nccl")
    assert result.pop("grads")
    assert result == {"iter": 3, "separate_group": True}


@needs_cupy
@pytest.mark.parametrize("granularity", ["bucket", "parameter"])
def test_ddp_hook_with_kernels_equals_the_torch_path(granularity: str) -> None:
    [fused] = run_distributed(1, ddp_on_cuda, "cuda", granularity, backend="nccl")
    [plain] = run_distributed(1, ddp_on_cuda, "torch", granularity, backend="nccl")
    for a, b in zip(fused["grads"], plain["grads"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# -- the fused kernels against the torch path ----------------------------------------------------


def random_case(rng: random.Random) -> tuple[list[int], int, torch.dtype, Segments]:
    """R ≤ 64 ranks on L ≤ 16 objectives (each with a rank), c from 1 to 2²², any dtype,
    sometimes split into parameter segments with empty ones and a gap."""
    ranks = rng.choice([1, 2, 3, 5, 8, 16, 33, 64])
    num_objectives = rng.randint(1, min(ranks, 16))
    ids = list(range(num_objectives)) + [
        rng.randrange(num_objectives) for _ in range(ranks - num_objectives)
    ]
    rng.shuffle(ids)
    columns = rng.choice([1, 2, 255, 257, 4097, 65539, 2**20, 2**22 + 1])
    dtype = rng.choice([torch.float32, torch.bfloat16, torch.float16])
    segments = None
    if rng.random() < 0.4:
        cuts = sorted(rng.randint(0, columns) for _ in range(rng.randint(1, 6)))
        segments = list(itertools.pairwise([0, *cuts]))
        segments.append((cuts[-1], max(cuts[-1], columns - rng.randint(0, 3))))  # maybe a gap
    return ids, columns, dtype, segments


CASES = [random_case(random.Random(seed)) for seed in range(24)] + [
    ([0, 1], 2**26, torch.bfloat16, None),  # the largest slice
    ([2, 0, 1, 0], 2**26, torch.float32, None),
    (list(range(16)) * 4, 2**22, torch.float16, None),  # R = 64, L = 16
    ([0], 1, torch.float32, None),
]


@needs_cupy
@pytest.mark.parametrize("weighting", ["mgda", "mean", MGDA(normalization="l2"), "upgrad"], ids=str)
@pytest.mark.parametrize(("ids", "columns", "dtype", "segments"), CASES)
def test_kernels_equal_the_torch_path(ids, columns, dtype, segments, weighting) -> None:
    if weighting != "mgda" and columns > 2**22:
        pytest.skip("the largest slices with MGDA only")
    weighting = get_weighting(weighting)
    shards, averaging, objective_map = bucket(ids, columns, dtype, device="cuda")
    contexts = contexts_for(objective_map, segments)
    fused = fused_kernels("cuda", shards, averaging, segments)
    gramians = fused.partial_gramians()

    exact = exact_gramians(shards, averaging, segments)
    objectives = objective_shards(shards, averaging)
    whole = [(0, columns)] if segments is None else segments
    torch_gramians = torch.stack(
        [objectives[:, lo:hi] @ objectives[:, lo:hi].T for lo, hi in whole]
    )
    # At least as accurate as torch's fp32 matmul (and within 2e-5 of float64 in any case).
    bound = max(2e-5, 2 * gramian_error(torch_gramians, exact))
    assert_gramians_close(gramians, exact, bound)

    expected_weights = problem_weights(weighting, gramians.cpu(), contexts).cuda()
    given = None if fused.solves(weighting) else problem_weights(weighting, gramians, contexts)
    weights, update = fused.combine(gramians, weighting, given)
    torch.testing.assert_close(weights, expected_weights, rtol=1e-5, atol=1e-6)
    assert_update_close(update, combine_segments(weights, objectives, whole, dtype))


@needs_cupy
def test_kernels_are_deterministic_and_on_the_current_stream() -> None:
    """Bitwise equal results on reruns, and the launches are captured by a CUDA graph on a side
    stream: they go to torch's current stream and synchronise nothing (both are illegal under
    capture otherwise)."""
    ids, columns, dtype, segments = [0, 1, 2, 0, 3, 1, 2, 3], 2**20 + 5, torch.bfloat16, None
    shards, averaging, _ = bucket(ids, columns, dtype, device="cuda")
    weighting = get_weighting("mgda")

    def run() -> tuple[torch.Tensor, ...]:
        fused = fused_kernels("cuda", shards, averaging, segments)
        gramians = fused.partial_gramians()
        return (gramians, *fused.combine(gramians, weighting, None))

    first, second = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(first, captured, strict=True))


@needs_cupy
def test_auto_picks_the_kernels_for_cuda_buckets() -> None:
    shards, averaging, _ = bucket([0, 1], 100, torch.float32, device="cuda")
    assert fused_kernels("auto", shards, averaging, None) is not None
    assert fused_kernels("auto", shards.double(), averaging, None) is None  # fp64: torch path
    assert BucketMOOState(kernels="cuda").kernels == "cuda"
    comm = LocalComm()
    context = contexts_for(ObjectiveMap.from_ids([0, 1]), None)
    fused = solve_shards(comm, shards, averaging, MGDA(), context, None, "cuda")
    plain = solve_shards(comm, shards, averaging, MGDA(), context, None, "torch")
    torch.testing.assert_close(fused.update, plain.update, rtol=1e-5, atol=1e-6)


@needs_cupy
def test_the_probe_passes_on_a_working_installation() -> None:
    assert probe_kernels(torch.cuda.current_device()) is None
    assert BucketMOOState(kernels="cuda").kernels == "cuda"


@pytest.mark.parametrize("ids", [[0, 1, 2, 3], [0, 1, 0, 2]])
def test_tf32_changes_nothing_on_the_torch_path(ids: list[int]) -> None:
    """With TF32 on (``transformers``' ``tf32=True``, ``set_float32_matmul_precision("high")``)
    the torch path's Gramian and update are those with TF32 off, bit for bit, and within fp32
    round-off of float64; ``mean`` is then DDP's average (equal groups) to fp32 accuracy."""
    shards, averaging, objective_map = bucket(ids, 2**20 + 3, torch.float32, device="cuda")
    contexts = contexts_for(objective_map, None)

    def run():
        mean = get_weighting("mean")
        return solve_shards(LocalComm(), shards, averaging, mean, contexts, None, "torch")

    previous = torch.backends.cuda.matmul.fp32_precision
    try:
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        plain = run()
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        fast = run()
        plain_gemm = shards @ shards.T  # what TF32 does to an fp32 GEMM
    finally:
        torch.backends.cuda.matmul.fp32_precision = previous
    assert torch.equal(fast.gramians, plain.gramians) and torch.equal(fast.update, plain.update)
    objectives = averaging.double() @ shards.double()
    assert gramian_error(fast.gramians, (objectives @ objectives.T)[None]) <= 1e-6
    expected = objectives.mean(dim=0)  # the mean of the objectives; DDP's average for ids 0..3
    error = (fast.update.double() - expected).abs().max() / expected.abs().max()
    assert error.item() <= 1e-6
    if torch.cuda.get_device_capability() >= (8, 0):  # TF32 exists here: the test has teeth
        wide = shards.double()
        assert gramian_error(plain_gemm[None], (wide @ wide.T)[None]) > 1e-5


@needs_cupy
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sketch_fold_on_cuda_is_the_cpu_map(dtype: torch.dtype) -> None:
    """The sketch protocol's map is the same on every device: the fused fold (csrc/sketch.cu)
    and the torch fold on the GPU agree with the CPU's, without a host synchronisation."""
    from bucketmoo_hooks import _sketch
    from bucketmoo_hooks._kernels import sketch_kernel

    vector = torch.randn(3_000_001, generator=torch.Generator().manual_seed(1)).to(dtype)
    seed = _sketch.problem_seed(5, 2, 0)
    on_cpu = _sketch.sketch(vector, 4096, seed, _sketch.SignTable())
    device_vector, signs = vector.cuda(), _sketch.SignTable()
    backend = sketch_kernel("cuda", device_vector)
    _sketch.sketch(device_vector, 4096, seed, signs, backend=backend)  # tables, compilation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fused = _sketch.sketch(device_vector, 4096, seed, signs, backend=backend)
        plain = _sketch.sketch(device_vector, 4096, seed, signs)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    scale = 1e-5 * vector.double().norm().item()
    torch.testing.assert_close(fused.cpu().double(), on_cpu.double(), rtol=0, atol=scale)
    torch.testing.assert_close(plain.cpu().double(), on_cpu.double(), rtol=0, atol=scale)
