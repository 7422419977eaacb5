"""The fused kernels, run on the CPU emulator, against the torch path.

The emulator (tests/helpers/_emulator.py) builds the exact NVRTC source with ``g++`` and runs
every thread of a block as a fiber, so the kernels' arithmetic, indexing and barriers, and the
whole Python launch path, are checked here without a GPU; test_gpu.py repeats the comparison on
a device.
"""

import math
from pathlib import Path

import pytest
import torch
from _distributed import run_distributed
from _emulator import EmulatedBackend, have_compiler
from _gramians import KINDS, gramian_of
from _kernel_checks import (
    LocalComm,
    Segments,
    assert_gramians_close,
    assert_update_close,
    bucket,
    contexts_for,
    exact_gramians,
    problem_weights,
    solve_shards,
)
from _kernel_workers import fused_and_plain

from bucketmoo_hooks import _shard, _sketch
from bucketmoo_hooks._kernels import FusedBucket
from bucketmoo_hooks._kernels._sources import compile_options
from bucketmoo_hooks._linalg import combine_segments, objective_shards
from bucketmoo_hooks.weightings import MGDA, Weighting, get_weighting

pytestmark = pytest.mark.skipif(not have_compiler(), reason="needs g++ for the CPU emulator")

# (objective of each rank, slice columns, bucket dtype, segments)
CASES = [
    ([0], 1, torch.float32, None),  # R = L = 1, a single column
    ([0, 1], 7, torch.bfloat16, None),  # MGDA's closed form
    ([0, 1, 0, 2, 1], 5000, torch.float32, None),  # uneven groups, several items per segment
    ([5, 5, 2, 7], 3000, torch.bfloat16, [(0, 0), (0, 3), (3, 3), (3, 2100), (2500, 3000)]),
    ([0, 0, 1, 1, 2, 2], 2000, torch.float16, [(1000, 2000), (0, 0)]),  # leading gap
    (list(range(9)), 1100, torch.float16, None),  # L = 9: one column per thread
    (list(range(16)), 600, torch.bfloat16, [(0, 250), (250, 600)]),  # L = 16
]
WEIGHTINGS = ["mgda", "mean", MGDA(normalization="l2"), "upgrad"]


@pytest.fixture(scope="module")
def backend(request: pytest.FixtureRequest) -> EmulatedBackend:
    return EmulatedBackend(Path(request.config.cache.mkdir("cuda_emulator")))


@pytest.mark.parametrize("weighting", WEIGHTINGS, ids=str)
@pytest.mark.parametrize(("ids", "columns", "dtype", "segments"), CASES)
def test_kernels_match_the_torch_path(
    backend: EmulatedBackend,
    ids: list[int],
    columns: int,
    dtype: torch.dtype,
    segments: Segments,
    weighting: str | Weighting,
) -> None:
    weighting = get_weighting(weighting)
    shards, averaging, objective_map = bucket(ids, columns, dtype)
    contexts = contexts_for(objective_map, segments)
    fused = FusedBucket(backend, shards, averaging, segments)

    gramians = fused.partial_gramians()
    num = objective_map.num_objectives
    assert gramians.shape == (len(contexts), num, num)
    assert_gramians_close(gramians, exact_gramians(shards, averaging, segments), 1e-5)

    # Weights and update from the same Gramians as the torch path would get after the all-reduce.
    expected_weights = problem_weights(weighting, gramians, contexts)
    given = None if fused.solves(weighting) else expected_weights
    weights, update = fused.combine(gramians, weighting, given)
    torch.testing.assert_close(weights, expected_weights, rtol=1e-6, atol=1e-7)
    objectives = objective_shards(shards, averaging)
    whole = [(0, columns)] if segments is None else segments
    assert_update_close(update, combine_segments(weights, objectives, whole, dtype))


@pytest.mark.parametrize("num_objectives", [3, 16])
@pytest.mark.parametrize("normalization", ["none", "l2"])
def test_device_mgda_equals_mgda_on_the_weighting_zoo(
    backend: EmulatedBackend, num_objectives: int, normalization: str
) -> None:
    """One block per Gramian of the zoo (random, shared component, low rank, duplicated, 1e-3…1e3
    norms, opposed camps): the warp solver gives MGDA's weights to fp32 round-off."""
    dtype = torch.float32 if num_objectives == 3 else torch.bfloat16  # builds shared with above
    gramians = torch.stack(
        [gramian_of(kind, num_objectives, seed) for kind in KINDS for seed in range(4)]
    )
    shards, averaging, _ = bucket(list(range(num_objectives)), 1, dtype)
    fused = FusedBucket(backend, shards, averaging, [(0, 0)] * len(gramians))
    weighting = MGDA(normalization=normalization)
    weights, update = fused.combine(gramians, weighting, None)
    expected = torch.stack([weighting(g) for g in gramians])
    torch.testing.assert_close(weights, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(update, torch.zeros(1, dtype=dtype))  # the column is a gap


def test_mgda_iterations_are_honoured(backend: EmulatedBackend) -> None:
    """A fixed iteration count stops the active set where torch's does (here before optimality)."""
    gramians = torch.stack([gramian_of("conflicting", 16, seed) for seed in range(4)])
    shards, averaging, _ = bucket(list(range(16)), 1, torch.bfloat16)
    fused = FusedBucket(backend, shards, averaging, [(0, 0)] * len(gramians))
    for iterations in (1, 2):
        weighting = MGDA(iterations=iterations)
        weights, _ = fused.combine(gramians, weighting, None)
        expected = torch.stack([weighting(g) for g in gramians])
        torch.testing.assert_close(weights, expected, rtol=1e-5, atol=1e-6)


def test_a_matrix_that_is_not_an_averaging_matrix_poisons_the_results(
    backend: EmulatedBackend,
) -> None:
    shards, averaging, _ = bucket([0, 1, 0, 2, 1], 5000, torch.float32)
    averaging[1, 0] = 0.25  # rank 0 now in two objectives
    fused = FusedBucket(backend, shards, averaging, None)
    gramians = fused.partial_gramians()
    weights, update = fused.combine(gramians, get_weighting("mgda"), None)
    assert gramians.isnan().all() and weights.isnan().all() and update.isnan().all()


@pytest.mark.parametrize("weighting", ["mgda", "upgrad"])
def test_solve_shards_dispatches_to_the_kernels(
    backend: EmulatedBackend, monkeypatch, weighting: str
) -> None:
    """solve_shards with the kernels gives the torch path's result (and uses the kernels)."""
    ids, columns, dtype, segments = CASES[3]
    shards, averaging, objective_map = bucket(ids, columns, dtype, seed=1)
    contexts = contexts_for(objective_map, segments)
    resolved = get_weighting(weighting)
    comm = LocalComm()
    expected = solve_shards(comm, shards, averaging, resolved, contexts, segments, "torch")
    used = []

    def emulated(choice, shards, averaging, segments):
        used.append(choice)
        return FusedBucket(backend, shards, averaging, segments)

    monkeypatch.setattr(_shard, "fused_kernels", emulated)
    result = solve_shards(comm, shards, averaging, resolved, contexts, segments, "cuda")
    assert used == ["cuda"]
    assert_gramians_close(result.gramians, exact_gramians(shards, averaging, segments), 1e-5)
    torch.testing.assert_close(result.weights, expected.weights, rtol=1e-4, atol=1e-5)
    assert_update_close(result.update, expected.update)


@pytest.mark.slow
def test_hook_with_the_kernels_equals_the_torch_path(backend: EmulatedBackend) -> None:
    """DDP on 3 gloo ranks (two objectives, parameter granularity: segments, empty ones and
    padding), every bucket through the emulated kernels with the Gramians all-reduced between
    them: the gradients are those of the torch path."""
    granularity = "parameter"
    backend.module("gramian.cu", compile_options(2, torch.float32), torch.device("cpu"))
    backend.module("combine.cu", compile_options(2, torch.float32), torch.device("cpu"))
    cache = str(backend.cache_dir)
    per_rank = run_distributed(3, fused_and_plain, granularity, cache)  # one launch for both
    fused = [result["fused"] for result in per_rank]
    plain = [result["plain"] for result in per_rank]
    for fused_grads, plain_grads in zip(fused, plain, strict=True):
        for a, b in zip(fused_grads, plain_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(fused[0][0], plain[0][0])  # the kernels did run (round-off differs)


# (elements, sketch size, dtype): tails, one row, widths over one block, 16-bit gradients.
FOLDS = [
    (1000, 16, torch.float32),
    (40_000, 256, torch.bfloat16),
    (9_000, 4096, torch.float16),
    (4_200, 4096, torch.float32),  # two rows, the second short
    (300_001, 1024, torch.float32),
]


@pytest.mark.parametrize(("numel", "sketch_size", "dtype"), FOLDS)
def test_sketch_fold_kernel_matches_the_torch_fold(
    backend: EmulatedBackend, numel: int, sketch_size: int, dtype: torch.dtype
) -> None:
    """csrc/sketch.cu folds as ``_sketch.sketch``'s torch path (its oracle), up to fp32
    summation order; the same launch twice gives the same bits."""
    vector = torch.randn(numel, generator=torch.Generator().manual_seed(numel)).to(dtype)
    signs, seed = _sketch.SignTable(), _sketch.problem_seed(3, 1, 0)
    expected = _sketch.sketch(vector.double(), sketch_size, seed, signs)
    folded = _sketch.sketch(vector, sketch_size, seed, signs, backend=backend)
    assert folded.dtype == torch.float32 and folded.shape == expected.shape
    torch.testing.assert_close(folded.double(), expected, rtol=0, atol=1e-5 * math.sqrt(numel))
    assert torch.equal(folded, _sketch.sketch(vector, sketch_size, seed, signs, backend=backend))
