"""The linear algebra of the combination, exact whatever the matmul precision flags.

``A = M S`` (group averages), ``G = A Aᵀ`` per segment (Gramians) and ``d = wᵀA`` per segment
(the combination), in fp32 for fp32/bf16/fp16 gradients (fp64 stays fp64), bitwise reproducible
and unaffected by TF32 (:func:`exact_matmul_in_fp32`). Shared by the protocols, the reference
and the single-device engine.
"""

import itertools
from collections.abc import Sequence

import torch
from torch import Tensor

from ._device_path import cpu_path

Segment = tuple[int, int]


def row_segments(sizes: Sequence[int]) -> list[Segment]:
    """Segments of consecutive pieces of ``sizes`` elements in a row that holds all of them."""
    bounds = [0, *itertools.accumulate(sizes)]
    return list(itertools.pairwise(bounds))


def objective_shards(shards: Tensor, averaging: Tensor) -> Tensor:
    """Step 2: ``A_j = M S_j ∈ ℝ^{L×c}``, in fp32 even for bf16/fp16 buckets (fp64 stays fp64).

    When every rank is its own objective, in rank order, ``M`` is the identity and ``A_j`` is
    ``S_j`` itself: on CPU, where the check costs no device synchronisation, the product (a
    pass over the bucket, the hook's largest compute on gloo) is skipped. The product does not
    depend on the matmul precision flags (:func:`exact_matmul_in_fp32`).
    """
    compute_dtype = torch.promote_types(shards.dtype, torch.float32)
    if cpu_path(averaging.device) and _is_identity(averaging):
        return shards.to(compute_dtype)
    if compute_dtype != torch.float32 or exact_matmul_in_fp32(shards.device):
        return averaging.to(compute_dtype) @ shards.to(compute_dtype)
    return _wide_product(averaging, shards, compute_dtype)


def _is_identity(matrix: Tensor) -> bool:
    rows, columns = matrix.shape
    return rows == columns and torch.equal(matrix, torch.eye(rows, dtype=matrix.dtype))


def partial_gramians(objectives: Tensor, segments: Sequence[Segment]) -> Tensor:
    """Step 3: ``P_j[s] = A_j[:, s] A_j[:, s]ᵀ`` for every segment, ``[S, L, L]``
    (:func:`gramian_of` each).

    Zero padding and empty segments add nothing.
    """
    pieces = [objectives[:, lo:hi] for lo, hi in segments]
    if _exact_as_it_is(objectives):  # the flags read once per bucket, not per segment
        return torch.stack([piece @ piece.T for piece in pieces])
    return torch.stack([_wide_gramian(piece) for piece in pieces])


def exact_matmul_in_fp32(device: torch.device) -> bool:
    """Whether an fp32 matmul on ``device`` is IEEE fp32 whatever the precision flags.

    TF32 (``torch.backends.cuda.matmul.allow_tf32 = True``,
    ``torch.set_float32_matmul_precision("high")``, ``transformers``' ``tf32=True``) rounds the
    inputs of every fp32 cuBLAS GEMM to 10 mantissa bits, and oneDNN's ``"tf32"``/``"bf16"``
    (``torch.backends.mkldnn.matmul.fp32_precision``, set by ``"high"``/``"medium"``) may do the
    same on CPUs that support it: ~1e-3 relative error or more in ``A``, ``G`` and ``d``. The
    flags are process-global (a scoped override would race with the user's threads and the
    hook's worker), so none is touched: on the CPU at oneDNN's default precision an fp32 matmul
    is exact and is used as it is; anywhere else (and under
    :func:`._device_path.force_device_path`) ``A`` and ``G`` are accumulated in float64, whose
    products of fp32 numbers are exact and which no flag affects, and rounded to fp32 once, and
    ``d`` is a gemv (:func:`weighted_sum`). The CUDA results are then bitwise the same with
    TF32 on or off.
    """
    if not cpu_path(device):
        return False
    # oneDNN's precision: the first level that is set (matmul, oneDNN, all backends).
    levels = (torch.backends.mkldnn.matmul, torch.backends.mkldnn, torch.backends)
    settings = (level.fp32_precision for level in levels)
    return next((setting for setting in settings if setting != "none"), "ieee") == "ieee"


def gramian_of(objectives: Tensor) -> Tensor:
    """``G = A Aᵀ`` for ``A ∈ ℝ^{L×c}``, in ``A``'s dtype, independent of the matmul precision
    flags (:func:`exact_matmul_in_fp32`): an fp32 ``A`` is multiplied in fp32 on the CPU at
    default precision, else accumulated in float64 over blocks of columns (a bounded
    temporary, cache-sized on the CPU) and rounded to fp32 once. Fixed order: bitwise
    reproducible."""
    return objectives @ objectives.T if _exact_as_it_is(objectives) else _wide_gramian(objectives)


def _exact_as_it_is(matrix: Tensor) -> bool:
    """Whether a matmul of ``matrix`` is exact as it is: not fp32, or fp32 exact here."""
    return matrix.dtype != torch.float32 or exact_matmul_in_fp32(matrix.device)


def _wide_gramian(objectives: Tensor) -> Tensor:
    num = objectives.shape[0]
    gramian = objectives.new_zeros((num, num), dtype=torch.float64)
    for block in objectives.split(_block_columns(objectives), dim=1):
        wide = block.to(torch.float64)
        gramian.addmm_(wide, wide.T)
    return gramian.to(objectives.dtype)


def weighted_sum(weights: Tensor, objectives: Tensor) -> Tensor:
    """``d = wᵀA`` (``[L]``, ``[L, c]`` → ``[c]``) in ``A``'s dtype, independent of the matmul
    precision flags (:func:`exact_matmul_in_fp32`).

    ``weights @ objectives`` is a ``[1, L] × [L, c]`` GEMM, which TF32 rounds. Off the CPU's
    default it is a matrix–vector product (``torch.mv``) instead: PyTorch runs fp32 gemv with
    TF32 off whatever the flags (``at::cuda::blas::gemv<float>``: TF32 gains nothing on a
    bandwidth-bound product), with no extra pass. On a CPU whose oneDNN precision was
    lowered, blocks in float64.
    """
    weights = weights.to(objectives.dtype)
    if _exact_as_it_is(objectives):
        return weights @ objectives
    if not cpu_path(objectives.device):
        return torch.mv(objectives.T, weights)
    return _wide_product(weights, objectives, objectives.dtype)


def _wide_product(left: Tensor, right: Tensor, dtype: torch.dtype) -> Tensor:
    """``left @ right`` (``[k, L]`` or ``[L]`` by ``[L, c]``) accumulated in float64 over blocks
    of ``right``'s columns, written in ``dtype``: no precision flag applies to it."""
    wide = left.to(torch.float64)
    result = right.new_empty((*left.shape[:-1], right.shape[1]), dtype=dtype)
    step = _block_columns(right)
    for lo in range(0, right.shape[1], step):
        result[..., lo : lo + step] = wide @ right[:, lo : lo + step].to(torch.float64)
    return result


def _block_columns(matrix: Tensor) -> int:
    """Columns of ``matrix`` per float64 block: 2¹⁸ elements (2 MiB) on the CPU, where a block
    stays in cache (on a 25 MiB bucket 6× faster than converting it whole), 2²² (32 MiB)
    elsewhere: one or two blocks per bucket, so few kernel launches."""
    elements = 1 << 18 if matrix.device.type == "cpu" else 1 << 22
    return max(1, elements // max(1, matrix.shape[0]))


def combine_segments(
    weights: Tensor, objectives: Tensor, segments: Sequence[Segment], dtype: torch.dtype
) -> Tensor:
    """Step 6: ``d_j[s] = w[s]ᵀ A_j[:, s]`` for every segment (:func:`weighted_sum`), in the
    bucket dtype."""
    if len(segments) == 1 and segments[0] == (0, objectives.shape[1]):
        return weighted_sum(weights[0], objectives).to(dtype)
    update = objectives.new_zeros(objectives.shape[1])
    for (lo, hi), segment_weights in zip(segments, weights, strict=True):
        update[lo:hi] = weighted_sum(segment_weights, objectives[:, lo:hi])
    return update.to(dtype)
