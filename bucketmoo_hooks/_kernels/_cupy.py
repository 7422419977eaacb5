"""The CuPy backend: NVRTC compilation (cached), launches on torch's stream with raw pointers."""

import ctypes
import threading
from collections.abc import Sequence

import cupy
import numpy
import torch
from torch import Tensor

from ._launch import KernelArgument
from ._sources import BLOCK, kernel_source

# Dynamic shared memory a kernel gets without opting in (cudaFuncSetAttribute).
_DEFAULT_SHARED = 48 * 1024


def _kernel_argument(argument: KernelArgument) -> object:
    """What CuPy passes by value: a tensor's device address (a pointer parameter), or the numpy
    scalar of a C scalar.

    Not a DLPack view: ``__dlpack__`` is called with CuPy's stream, which torch wraps as an
    ``ExternalStream`` that never equals its own current stream, so every tensor of every launch
    cost an event record and wait. The kernels index dense arrays, so the address is all they
    need, and the caller keeps the tensors alive for the launch (stream-ordered, as any op)."""
    if isinstance(argument, Tensor):
        if not argument.is_contiguous():
            raise ValueError("a kernel argument must be a contiguous tensor")
        return numpy.uintp(argument.data_ptr())
    if isinstance(argument, ctypes.c_int64):
        return numpy.int64(argument.value)
    return numpy.int32(argument.value)


class CupyModule:
    """One compiled source file on one device; kernels are looked up once."""

    def __init__(self, module: "cupy.RawModule", device: torch.device) -> None:
        self._module = module
        self._device = device
        self._kernels: dict[str, cupy.RawKernel] = {}
        self._shared_limit: dict[str, int] = {}

    def launch(self, kernel: str, grid: int, shared: int, args: Sequence[KernelArgument]) -> None:
        function = self._kernels.get(kernel)
        if function is None:
            function = self._kernels[kernel] = self._module.get_function(kernel)
        index = self._device.index
        stream = torch.cuda.current_stream(self._device).cuda_stream
        # CuPy's current stream = torch's: the launch runs where the hook's other work runs, in
        # order with it. No host synchronisation anywhere.
        with (
            torch.cuda.device(index),
            cupy.cuda.Device(index),
            cupy.cuda.ExternalStream(stream, index),
        ):
            if shared > self._shared_limit.get(kernel, _DEFAULT_SHARED):
                function.max_dynamic_shared_size_bytes = shared  # L ≥ 13: up to 84 KiB
                self._shared_limit[kernel] = shared
            arguments = tuple(_kernel_argument(a) for a in args)
            function((grid,), (BLOCK,), arguments, shared_mem=shared)


class CupyBackend:
    """Compiles each (source, options) once per device with NVRTC. CuPy also caches the binary
    on disk (``~/.cupy/kernel_cache``), keyed by the source text, so later processes skip NVRTC."""

    def __init__(self) -> None:
        self._modules: dict[tuple[str, tuple[str, ...], int], CupyModule] = {}
        self._lock = threading.Lock()

    def module(self, source: str, options: tuple[str, ...], device: torch.device) -> CupyModule:
        key = (source, options, device.index)
        with self._lock:
            module = self._modules.get(key)
            if module is None:
                with cupy.cuda.Device(device.index):
                    raw = cupy.RawModule(code=kernel_source(source), options=options)
                    raw.compile()  # here, not at the first launch: errors surface where built
                module = self._modules[key] = CupyModule(raw, device)
        return module

    def multiprocessors(self, device: torch.device) -> int:
        return torch.cuda.get_device_properties(device).multi_processor_count

    @staticmethod
    def version() -> str:
        return cupy.__version__


def environment() -> str:
    """CuPy's, torch's and the driver's CUDA versions, for the reason the kernels failed, with a
    hint when CuPy targets another CUDA major version than torch (two runtimes in one process,
    and NVRTC output the driver may reject)."""
    try:
        runtime = cupy.cuda.runtime.runtimeGetVersion()  # e.g. 13000 for CUDA 13.0
        driver = cupy.cuda.runtime.driverGetVersion()
    except Exception as error:  # no usable driver: reading its version fails already
        return f"CuPy {cupy.__version__}; the CUDA driver is unusable: {error}"
    text = (
        f"CuPy {cupy.__version__} for CUDA {_version(runtime)}, torch for CUDA "
        f"{torch.version.cuda}, driver for CUDA {_version(driver)}"
    )
    torch_major = str(torch.version.cuda).split(".")[0]
    if torch.version.cuda and str(runtime // 1000) != torch_major:
        text += f"; install the CuPy for torch's CUDA: cupy-cuda{torch_major}x"
    return text


def _version(code: int) -> str:
    return f"{code // 1000}.{code % 1000 // 10}"
