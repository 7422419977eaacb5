"""Which implementation of steps 2–6 runs a bucket: the fused CUDA kernels or the torch path."""

import functools
import logging
import threading
from collections.abc import Sequence

import torch
from torch import Tensor

from ..weightings import Mean
from ._launch import Backend, FusedBucket
from ._plan import Segment
from ._sources import DTYPE_CODES, MAX_OBJECTIVES, SOURCES, compile_options

#: Values of ``BucketMOOState(kernels=...)``.
KERNEL_CHOICES = ("auto", "torch", "cuda")
#: Most ranks the kernels' shared-memory rank plan holds.
MAX_RANKS = 1024

logger = logging.getLogger("bucketmoo_hooks")
_logged: set[str] = set()
# probe_kernels' answer per CUDA device index.
_probes: dict[int, str | None] = {}
_probes_lock = threading.Lock()


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


def probe_kernels(device: torch.device | str | int) -> str | None:
    """Whether the fused kernels run on ``device``: ``None``, else why not.

    The first call for a CUDA device imports CuPy, checks the GPU (sm_70 or newer), compiles the
    kernels for a tiny bucket with NVRTC, launches them and compares their results with the
    exact ones (one host synchronisation), so that a broken installation (CuPy for another CUDA
    version than torch's, a driver too old for it, no NVRTC) is found here rather than inside
    backward; the reason names the versions. The answer is cached per device (a failure is
    logged once, as a warning); later calls cost a lookup. Call it before backward (or CUDA
    graph capture) to keep that work out of them.
    """
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if device.type != "cuda":
        return f"the bucket is on {device.type}"
    backend = cuda_backend()
    if isinstance(backend, str):
        return backend
    index = torch.cuda.current_device() if device.index is None else device.index
    if index in _probes:  # every bucket asks: no lock once answered
        return _probes[index]
    with _probes_lock:
        if index not in _probes:
            reason = _probes[index] = _probe(backend, torch.device("cuda", index))
            if reason is not None:
                logger.warning("bucketmoo_hooks: the fused CUDA kernels cannot run: %s", reason)
        return _probes[index]


def _probe(backend: Backend, device: torch.device) -> str | None:
    from ._cupy import environment  # importable: cuda_backend() imported it

    major, minor = torch.cuda.get_device_capability(device)
    if major < 7:
        return f"{device} is sm_{major}{minor}; the kernels need sm_70 (warp match instructions)"
    try:
        check_backend(backend, device)
    except Exception as error:  # whatever CuPy, NVRTC or the driver raise
        return (
            f"compiling or launching them on {device} failed ({environment()}): "
            f"{type(error).__name__}: {error}"
        )
    return None


def check_backend(backend: Backend, device: torch.device) -> None:
    """Compile the kernels for two objectives over three ranks (fp32), run them on a five-column
    bucket and compare with the exact result (small binary fractions: every step is exact).

    Raises:
        RuntimeError: The kernels ran but their results are wrong.
        Exception: Whatever compiling or launching raised.
    """
    options = compile_options(2, torch.float32)
    for source in SOURCES:
        backend.module(source, options, device)
    rows = [[1.0, 2.0, 3.0, 4.0, 5.0], [-1.0, 0.5, 2.0, 0.0, 1.0], [3.0, -2.0, 1.0, 1.0, 0.0]]
    shards = torch.tensor(rows, device=device)
    averaging = torch.tensor([[0.5, 0.0, 0.5], [0.0, 1.0, 0.0]], device=device)
    fused = FusedBucket(backend, shards, averaging, None)
    gramians = fused.partial_gramians()
    weights, update = fused.combine(gramians, Mean(), None)
    objectives = averaging.double() @ shards.double()
    expected = (objectives @ objectives.T, torch.full((2,), 0.5), objectives.mean(dim=0))
    results = (gramians[0], weights[0], update)
    if not all(
        torch.equal(result.double().cpu(), want.double().cpu())
        for result, want in zip(results, expected, strict=True)
    ):
        raise RuntimeError(f"the kernels computed wrong results on {device}: {results}")


def check_kernels(choice: object) -> str:
    """Validate a ``kernels`` choice; ``"cuda"`` must be usable on this machine.

    Raises:
        ValueError: Not one of :data:`KERNEL_CHOICES`.
        RuntimeError: ``"cuda"`` when the kernels cannot run on the current CUDA device
            (:func:`probe_kernels` says why).
    """
    if not isinstance(choice, str) or choice not in KERNEL_CHOICES:
        raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {choice!r}")
    reason = probe_kernels("cuda") if choice == "cuda" else None
    if reason is not None:
        raise RuntimeError(f"kernels='cuda' needs the fused CUDA kernels, but: {reason}")
    return choice


def _unsupported_dtype(tensor: Tensor) -> str | None:
    """Why the kernels cannot read ``tensor``'s dtype on its device (``None`` if they can)."""
    if tensor.dtype not in DTYPE_CODES:
        return f"{tensor.dtype} buckets (the kernels read {', '.join(map(str, DTYPE_CODES))})"
    if tensor.dtype == torch.bfloat16 and tensor.is_cuda:
        major, minor = torch.cuda.get_device_capability(tensor.device)
        if major < 8:
            return f"bf16 buckets on sm_{major}{minor} (the kernels' bf16 rounding needs sm_80)"
    return None


def unsupported(shards: Tensor, averaging: Tensor) -> str | None:
    """Why the kernels cannot run this bucket (``None`` if they can); the torch path can."""
    reason = _unsupported_dtype(shards)
    if reason is not None:
        return reason
    num_objectives, ranks = averaging.shape
    if num_objectives > MAX_OBJECTIVES:
        return f"{num_objectives} objectives (the kernels support up to {MAX_OBJECTIVES})"
    if ranks > MAX_RANKS:
        return f"{ranks} ranks (the kernels support up to {MAX_RANKS})"
    if shards.shape[1] >= 2**31:
        return f"a slice of {shards.shape[1]} ≥ 2³¹ elements"
    return None


def _backend_unless(choice: str, reason: str | None, work: str, what: str) -> Backend | None:
    """The CuPy backend if ``reason`` is ``None``; else ``None`` (logged once, as ``work`` on
    the torch path), or for ``choice="cuda"`` a ``RuntimeError`` naming ``what``."""
    if reason is not None:
        if choice == "cuda":
            raise RuntimeError(f"kernels='cuda' cannot run {what}: {reason}")
        _log_once(f"bucketmoo_hooks: {work} on the torch path: {reason}")
        return None
    backend = cuda_backend()
    assert not isinstance(backend, str)  # the probe passed
    return backend


def fused_kernels(
    choice: str, shards: Tensor, averaging: Tensor, segments: Sequence[Segment] | None
) -> FusedBucket | None:
    """The fused kernels for this bucket, or ``None`` for the torch path.

    ``"torch"``: always ``None``. ``"auto"``: the kernels when they run on the bucket's device
    (:func:`probe_kernels`: a CUDA device, CuPy installed and working) and the bucket is supported
    (:func:`unsupported`), else ``None``; the outcome is logged once per distinct reason (logger
    ``bucketmoo_hooks``, INFO). ``"cuda"``: the kernels, or ``RuntimeError`` saying why not.
    """
    if choice == "torch":
        return None
    reason = probe_kernels(shards.device) or unsupported(shards, averaging)
    backend = _backend_unless(choice, reason, "steps 2-6", "this bucket")
    if backend is None:
        return None
    _log_once(
        f"bucketmoo_hooks: steps 2-6 in the fused CUDA kernels (CuPy {backend.version()}) "
        f"on {torch.cuda.get_device_name(shards.device)}"
    )
    return FusedBucket(backend, shards, averaging, segments)


def sketch_kernel(choice: str, vector: Tensor) -> Backend | None:
    """The backend that folds the sketch protocol's problems in one CUDA pass
    (:func:`._fold.fold_kernel`), or ``None`` for the torch path; ``choice`` as in
    :func:`fused_kernels`."""
    if choice == "torch":
        return None
    reason = probe_kernels(vector.device) or _unsupported_dtype(vector)
    backend = _backend_unless(choice, reason, "the sketch", "the sketch of this bucket")
    if backend is not None:
        _log_once(f"bucketmoo_hooks: the sketch in a fused CUDA kernel (CuPy {backend.version()})")
    return backend
