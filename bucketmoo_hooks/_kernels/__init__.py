"""Fused CUDA kernels for the per-bucket compute of the shard-Gramian protocol (csrc/, via CuPy).

Kernel 1 reads the received block ``S_j`` once and produces the fp32 partial Gramians; kernel 2
computes the weights on the device (MGDA and mean; any other weighting runs in torch between the
two) and writes the combined slice in the bucket dtype, reading ``S_j`` once more. Selection
between them and the torch path is :func:`fused_kernels`; the package works without CuPy. The
sketch protocol's fold is one more kernel (:func:`fold_kernel`, chosen by :func:`sketch_kernel`).
"""

from ._fold import fold_kernel
from ._launch import Backend, FusedBucket, Module, fuses_weighting
from ._select import (
    KERNEL_CHOICES,
    MAX_RANKS,
    check_kernels,
    fused_kernels,
    probe_kernels,
    sketch_kernel,
    unsupported,
)

__all__ = [
    "KERNEL_CHOICES",
    "MAX_RANKS",
    "Backend",
    "FusedBucket",
    "Module",
    "check_kernels",
    "fold_kernel",
    "fused_kernels",
    "fuses_weighting",
    "probe_kernels",
    "sketch_kernel",
    "unsupported",
]
