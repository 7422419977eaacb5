"""GPU checks that can fail: several ranks on one GPU, a race detector, and a count of the host
synchronisations the profiler sees.

Skipped without a GPU (``scripts/gpu_check.sh`` runs them on one). With ``R = 1`` (the NCCL
tests of ``test_gpu.py``) the all-gather writes back what it read and a kernel compares identity
with identity, so races and ordering bugs stay invisible; here three gloo processes share the
GPU (NCCL refuses two ranks on one device; gloo runs its collectives on CUDA tensors), with
uneven groups and padded buckets, and the same run on the CPU is the reference.
"""

import pytest
import torch
from _distributed import run_distributed
from _gpu_workers import (
    BLOCKING,
    GPU_ONLY,
    Scenario,
    cuda_and_cpu,
    fsdp2_cuda_and_cpu,
    race_detector,
    scenarios,
    sync_count,
)

from bucketmoo_hooks.weightings import weighting_names

pytestmark = GPU_ONLY

RANKS = 3
# Gradients on the GPU against the CPU: fp32 round-off of the Gramians, amplified by solvers
# near a change of active set; the race detector compares bit for bit instead.
RTOL, ATOL = 1e-4, 1e-5


@pytest.fixture(scope="module")
def trained() -> list[dict]:
    return run_distributed(RANKS, cuda_and_cpu, scenarios(weighting_names()), timeout=420)


@pytest.mark.parametrize("scenario", scenarios(weighting_names()), ids=lambda s: s.name)
def test_several_ranks_on_cuda_equal_the_cpu(trained: list[dict], scenario: Scenario) -> None:
    for rank_runs in trained:
        runs = rank_runs[scenario.name]
        for on_gpu, on_cpu in zip(runs["cuda"], runs["cpu"], strict=True):
            torch.testing.assert_close(on_gpu, on_cpu, rtol=RTOL, atol=ATOL)
    # Replicas stay identical: every slice is produced by one rank.
    first = trained[0][scenario.name]["cuda"]
    for rank_runs in trained[1:]:
        for a, b in zip(first, rank_runs[scenario.name]["cuda"], strict=True):
            assert torch.equal(a, b)


def test_fsdp2_on_cuda_equals_the_cpu() -> None:
    for result in run_distributed(RANKS, fsdp2_cuda_and_cpu, timeout=240):
        for on_gpu, on_cpu in zip(result["cuda"], result["cpu"], strict=True):
            torch.testing.assert_close(on_gpu, on_cpu, rtol=RTOL, atol=ATOL)


RACE_RUNS = [
    Scenario(),
    Scenario(granularity="parameter"),
    Scenario(granularity="global"),
    Scenario(protocol="sketch"),
]


def test_delays_change_nothing_bit_for_bit() -> None:
    """About 50 ms of device sleep (2²⁶ cycles at ~1.5 GHz) before every gather and after
    backward: a missing wait or an early free would change the gradients."""
    for result in run_distributed(RANKS, race_detector, 2**26, RACE_RUNS, timeout=300):
        for name, (plain, delayed) in result.items():
            for a, b in zip(plain, delayed, strict=True):
                assert torch.equal(a, b), name


SYNC_CASES = [
    None,  # DDP's own all-reduce: what the profiler adds by itself
    {"weighting": "mgda", "kernels": "torch"},
    {"weighting": "mgda", "kernels": "torch", "granularity": "parameter"},
    {"weighting": "upgrad", "kernels": "torch"},
    {"weighting": "nash_mtl", "kernels": "torch", "granularity": "parameter"},
    {"weighting": "cagrad", "kernels": "torch", "diagnostics": True},
    {"weighting": "mgda", "kernels": "auto"},  # the fused kernels where CuPy is installed
    {"weighting": "mgda", "kernels": "auto", "granularity": "global"},
]


def test_backward_never_waits_for_the_device() -> None:
    """The profiler's count of blocking CUDA runtime calls in backward (inside cuSOLVER, MAGMA,
    CuPy and NCCL too, which sync-debug mode misses) is the baseline's: zero from the hook."""
    [counts] = run_distributed(1, sync_count, SYNC_CASES, backend="nccl", timeout=240)
    baseline = counts[0]
    for case, found in zip(SYNC_CASES[1:], counts[1:], strict=True):
        extra = {name: found[name] - baseline[name] for name in BLOCKING}
        assert not any(extra.values()), (case, found, baseline)
    # The fused kernels add no stream ordering of their own (raw pointers on torch's stream;
    # DLPack's stream handshake cost an event record and wait per tensor per launch).
    torch_path, fused = (
        counts[SYNC_CASES.index({"weighting": "mgda", "kernels": "torch"})],
        counts[SYNC_CASES.index({"weighting": "mgda", "kernels": "auto"})],
    )
    waits = fused["cudaStreamWaitEvent"] - torch_path["cudaStreamWaitEvent"]
    assert waits <= fused["buckets"], (torch_path, fused)
