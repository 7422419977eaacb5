"""The sketch protocol's fold on CUDA (csrc/sketch.cu): one pass over the gradient, no atomics."""

import ctypes

import torch
from torch import Tensor

from ._launch import Backend
from ._sources import BLOCK, compile_options

# Blocks to aim for per multiprocessor: enough in flight to cover the memory latency.
_BLOCKS_PER_MULTIPROCESSOR = 4


def fold_kernel(
    backend: Backend, vector: Tensor, element_signs: Tensor, row_signs: Tensor, width: int
) -> Tensor:
    """``(Φ vector)_j = Σ_b ρ_b σ_{bp+j} vector_{bp+j}`` (fp32 ``[width]``), as
    :func:`bucketmoo_hooks._sketch.sketch` folds it in torch (its oracle): the rows are summed in
    chunks by the kernel, then the chunks in order by torch, so the result is bitwise the same
    from run to run on one GPU (the chunking depends on its number of multiprocessors)."""
    device = vector.device
    module = backend.module("sketch.cu", compile_options(1, vector.dtype), device)
    rows = row_signs.numel()
    tiles = -(-width // BLOCK)
    target = _BLOCKS_PER_MULTIPROCESSOR * backend.multiprocessors(device)
    rows_per_chunk = -(-rows // max(1, min(rows, -(-target // tiles))))
    chunks = -(-rows // rows_per_chunk)
    partial = torch.empty((chunks, width), dtype=torch.float32, device=device)
    module.launch(
        "sketch_fold",
        chunks * tiles,
        0,
        [
            vector,
            element_signs,
            row_signs,
            ctypes.c_int64(vector.numel()),
            ctypes.c_int32(width),
            ctypes.c_int32(rows_per_chunk),
            ctypes.c_int32(tiles),
            partial,
        ],
    )
    return partial.sum(dim=0)
