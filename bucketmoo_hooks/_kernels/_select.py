"""Which implementation of steps 2–6 runs a bucket: the fused CUDA kernels or the torch path."""

import functools
import logging
from collections.abc import Sequence

import torch
from torch import Tensor

from ._launch import Backend, FusedBucket
from ._plan import Segment
from ._sources import DTYPE_CODES, MAX_OBJECTIVES

#: Values of ``BucketMOOState(kernels=...)``.
KERNEL_CHOICES = ("auto", "torch", "cuda")
#: Most ranks the kernels' shared-memory rank plan holds.
MAX_RANKS = 1024

logger = logging.getLogger("bucketmoo_hooks")
_logged: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.info(message)


@functools.cache
def cuda_backend() -> Backend | str:
    """The CuPy backend, or why there is none (cached: CuPy is imported once)."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        from ._cupy import CupyBackend
    except ImportError as error:
        return f"CuPy is not installed ({error}); pip install 'bucketmoo_hooks[cuda]'"
    return CupyBackend()


def check_kernels(choice: object) -> str:
    """Validate a ``kernels`` choice; ``"cuda"`` must be usable on this machine.

    Raises:
        ValueError: Not one of :data:`KERNEL_CHOICES`.
        RuntimeError: ``"cuda"`` without a CUDA device or without CuPy.
    """
    if not isinstance(choice, str) or choice not in KERNEL_CHOICES:
        raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {choice!r}")
    backend = cuda_backend() if choice == "cuda" else None
    if isinstance(backend, str):
        raise RuntimeError(f"kernels='cuda' needs the fused CUDA kernels, but: {backend}")
    return choice


def unsupported(shards: Tensor, averaging: Tensor) -> str | None:
    """Why the kernels cannot run this bucket (``None`` if they can); the torch path can."""
    if shards.dtype not in DTYPE_CODES:
        return f"{shards.dtype} buckets (the kernels read {', '.join(map(str, DTYPE_CODES))})"
    num_objectives, ranks = averaging.shape
    if num_objectives > MAX_OBJECTIVES:
        return f"{num_objectives} objectives (the kernels support up to {MAX_OBJECTIVES})"
    if ranks > MAX_RANKS:
        return f"{ranks} ranks (the kernels support up to {MAX_RANKS})"
    if shards.shape[1] >= 2**31:
        return f"a slice of {shards.shape[1]} ≥ 2³¹ elements"
    return None


def fused_kernels(
    choice: str, shards: Tensor, averaging: Tensor, segments: Sequence[Segment] | None
) -> FusedBucket | None:
    """The fused kernels for this bucket, or ``None`` for the torch path.

    ``"torch"``: always ``None``. ``"auto"``: the kernels when the bucket is on a CUDA device, CuPy
    is installed and the bucket is supported (:func:`unsupported`), else ``None``; the outcome is
    logged once per distinct reason (logger ``bucketmoo_hooks``, INFO). ``"cuda"``: the kernels,
    or ``RuntimeError`` saying why not.
    """
    if choice == "torch":
        return None
    if shards.device.type != "cuda":
        reason = f"the bucket is on {shards.device.type}"
        backend: Backend | str = reason
    else:
        backend = cuda_backend()
        reason = backend if isinstance(backend, str) else unsupported(shards, averaging)
    if reason is not None or isinstance(backend, str):
        if choice == "cuda":
            raise RuntimeError(f"kernels='cuda' cannot run this bucket: {reason}")
        _log_once(f"bucketmoo_hooks: steps 2-6 on the torch path: {reason}")
        return None
    _log_once(
        f"bucketmoo_hooks: steps 2-6 in the fused CUDA kernels (CuPy {backend.version()}) "
        f"on {torch.cuda.get_device_name(shards.device)}"
    )
    return FusedBucket(backend, shards, averaging, segments)
