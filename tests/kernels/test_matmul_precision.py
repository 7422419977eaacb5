"""``A = M S``, ``G = A Aᵀ`` and ``d = wᵀA`` do not depend on the matmul precision flags.

TF32 (CUDA) and oneDNN's bf16/tf32 modes (CPU) round the inputs of fp32 GEMMs. Where they may
apply, the protocol accumulates those products in float64 or uses a gemv (which PyTorch runs
without TF32); that is checked here structurally, on the accelerator's path forced on the CPU,
by refusing every fp32 GEMM dispatched. test_gpu.py checks the numbers with TF32 on.
"""

import contextlib
from collections.abc import Iterator

import pytest
import torch
from _kernel_checks import bucket
from torch.utils._python_dispatch import TorchDispatchMode

from bucketmoo_hooks._device_path import force_device_path
from bucketmoo_hooks._linalg import (
    exact_matmul_in_fp32,
    gramian_of,
    objective_shards,
    partial_gramians,
    weighted_sum,
)

aten = torch.ops.aten
GEMMS = {aten.mm, aten.addmm, aten.bmm, aten.baddbmm, aten.addbmm, aten._addmm_activation}
GEMVS = {aten.mv, aten.addmv}


class MatmulLog(TorchDispatchMode):
    """Records every GEMM and gemv with an fp32 tensor input."""

    def __init__(self) -> None:
        super().__init__()
        self.fp32: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in GEMMS | GEMVS and any(
            isinstance(a, torch.Tensor) and a.dtype == torch.float32 for a in args
        ):
            self.fp32.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def lowered_precision(where: str) -> Iterator[None]:
    """oneDNN's fp32 matmul precision lowered at one of the levels torch resolves it from."""
    if where == "device path":
        with force_device_path():
            yield
        return
    level, precision = {
        "oneDNN matmul bf16": (torch.backends.mkldnn.matmul, "bf16"),
        "oneDNN tf32": (torch.backends.mkldnn, "tf32"),
        "all backends tf32": (torch.backends, "tf32"),
    }[where]
    previous = level.fp32_precision
    level.fp32_precision = precision
    try:
        yield
    finally:
        level.fp32_precision = previous


def run_protocol(shards: torch.Tensor, averaging: torch.Tensor) -> tuple[torch.Tensor, ...]:
    objectives = objective_shards(shards, averaging)
    segments = [(0, 700), (700, 700), (900, shards.shape[1])]
    gramians = partial_gramians(objectives, segments)
    weights = torch.rand(averaging.shape[0], generator=torch.Generator().manual_seed(1))
    return objectives, gramians, weighted_sum(weights, objectives), weights


def exact(shards: torch.Tensor, averaging: torch.Tensor, weights: torch.Tensor):
    objectives = averaging.double() @ shards.double()
    pieces = [objectives[:, :700], objectives[:, 700:700], objectives[:, 900:]]
    gramians = torch.stack([piece @ piece.T for piece in pieces])
    return objectives, gramians, weights.double() @ objectives.float().double()


IDS = [[0, 1, 2, 3], [0, 1, 0, 2, 1], [4, 4, 4]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ids", IDS)
@pytest.mark.parametrize(
    "where", ["device path", "oneDNN matmul bf16", "oneDNN tf32", "all backends tf32"]
)
def test_no_fp32_gemm_where_precision_flags_apply(
    where: str, ids: list[int], dtype: torch.dtype
) -> None:
    """On the accelerator's path, and on a CPU whose oneDNN precision is lowered, no fp32 GEMM
    runs; A and G are the float64 products rounded once, d is exact to fp32 round-off."""
    shards, averaging, _ = bucket(ids, 2000, dtype)
    log = MatmulLog()
    with lowered_precision(where):
        assert not exact_matmul_in_fp32(shards.device)
        with log:
            objectives, gramians, update, weights = run_protocol(shards, averaging)
    expected_gemvs = ["mv"] if where == "device path" else []  # gemv: never TF32 on CUDA
    assert log.fp32 == expected_gemvs
    exact_objectives, exact_gramians, exact_update = exact(shards, averaging, weights)
    assert torch.equal(objectives, exact_objectives.float())
    torch.testing.assert_close(gramians, exact_gramians.float(), rtol=1e-7, atol=0.0)
    torch.testing.assert_close(update.double(), exact_update, rtol=1e-6, atol=1e-6)
    assert objectives.dtype == gramians.dtype == update.dtype == torch.float32


@pytest.mark.parametrize("ids", IDS)
def test_cpu_default_keeps_the_fp32_blas_and_the_identity_skip(ids: list[int]) -> None:
    """At oneDNN's default the CPU path is unchanged: bitwise the plain fp32 products, and no
    product at all for an identity M."""
    shards, averaging, _ = bucket(ids, 2000, torch.float32)
    assert exact_matmul_in_fp32(shards.device)
    log = MatmulLog()
    with log:
        objectives, gramians, update, weights = run_protocol(shards, averaging)
    identity = ids == list(range(len(ids)))
    assert log.fp32 == (["mm"] if not identity else []) + ["mm"] * 3 + ["mm"]
    assert torch.equal(objectives, shards if identity else averaging @ shards)
    pieces = [objectives[:, :700], objectives[:, 700:700], objectives[:, 900:]]
    assert torch.equal(gramians, torch.stack([piece @ piece.T for piece in pieces]))
    assert torch.equal(update, weights @ objectives)


def test_float64_is_multiplied_as_it_is() -> None:
    shards, averaging, _ = bucket([0, 1, 0], 500, torch.float64)
    with force_device_path():
        objectives = objective_shards(shards, averaging)
        assert torch.equal(objectives, averaging.double() @ shards)
        assert torch.equal(gramian_of(objectives), objectives @ objectives.T)
        weights = torch.tensor([0.25, 0.75], dtype=torch.float64)
        assert torch.equal(weighted_sum(weights, objectives), weights @ objectives)


@pytest.mark.parametrize("columns", [0, 1, 300_001])
def test_blocks_cover_every_column(columns: int) -> None:
    """Several float64 blocks (2¹⁸ elements each on the CPU), one, or none."""
    objectives = torch.randn(3, columns)
    shards, averaging, _ = bucket([0, 1, 2, 1], columns, torch.float32)
    weights = torch.tensor([0.5, -1.0, 2.0])
    with force_device_path():
        gramian = gramian_of(objectives)
        averaged = objective_shards(shards, averaging)
        update = weighted_sum(weights, objectives)
    wide = objectives.double()
    torch.testing.assert_close(gramian, (wide @ wide.T).float(), rtol=1e-7, atol=0.0)
    assert torch.equal(averaged, (averaging.double() @ shards.double()).float())
    torch.testing.assert_close(update.double(), weights.double() @ wide, rtol=1e-6, atol=1e-6)
