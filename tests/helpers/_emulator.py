"""A kernel backend that runs csrc/ on the CPU (tests/helpers/cuda_emulator), without a GPU.

It implements :class:`bucketmoo_hooks._kernels.Backend`: each module is the exact source NVRTC gets
(:func:`kernel_source`) compiled with the exact NVRTC options plus ``-DBMOO_EMULATE`` by ``g++``
into a shared library (cached by content), whose kernels run on CPU tensors through
``cuLaunchKernel``-style parameter arrays. So the tests exercise the kernels' arithmetic and the
whole Python launch path (work tables, shared-memory sizes, argument order) here.
"""

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from bucketmoo_hooks._kernels._launch import KernelArgument
from bucketmoo_hooks._kernels._sources import BLOCK, kernel_source

EMULATOR_DIR = Path(__file__).parent / "cuda_emulator"
_KERNEL = re.compile(r'extern "C" __global__ void __launch_bounds__\(kBlock\)\s+(\w+)\(')


def have_compiler() -> bool:
    return shutil.which("g++") is not None


class EmulatedModule:
    def __init__(self, library: ctypes.CDLL) -> None:
        self._library = library
        self._library.emu_last_error.restype = ctypes.c_char_p

    def launch(self, kernel: str, grid: int, shared: int, args: Sequence[KernelArgument]) -> None:
        values = [ctypes.c_void_p(a.data_ptr()) if isinstance(a, Tensor) else a for a in args]
        params = (ctypes.c_void_p * len(values))(
            *[ctypes.cast(ctypes.pointer(value), ctypes.c_void_p) for value in values]
        )
        function = getattr(self._library, f"emu_launch_{kernel}")
        function.argtypes = [ctypes.c_uint, ctypes.c_uint, ctypes.c_size_t, ctypes.c_void_p]
        if function(grid, BLOCK, shared, params) != 0:
            raise RuntimeError(f"{kernel}: {self._library.emu_last_error().decode()}")


class EmulatedBackend:
    """Compiles into ``cache_dir`` (libraries are named by a hash of everything they are built
    from) and reports ``multiprocessors`` for the work-item split."""

    def __init__(self, cache_dir: Path, multiprocessors: int = 2) -> None:
        self.cache_dir = cache_dir
        self._multiprocessors = multiprocessors
        self._modules: dict[tuple[str, tuple[str, ...]], EmulatedModule] = {}

    def module(self, source: str, options: tuple[str, ...], device: torch.device) -> EmulatedModule:
        assert device.type == "cpu", device
        key = (source, options)
        if key not in self._modules:
            self._modules[key] = EmulatedModule(ctypes.CDLL(str(self.build(source, options))))
        return self._modules[key]

    def multiprocessors(self, device: torch.device) -> int:
        return self._multiprocessors

    def build(self, source: str, options: tuple[str, ...]) -> Path:
        text = kernel_source(source)
        wrappers = "".join(
            f'extern "C" int emu_launch_{name}(unsigned grid, unsigned threads, '
            f"std::size_t shared, void** params) {{\n"
            f"    return emu::launch({name}, grid, threads, shared, params);\n}}\n"
            for name in _KERNEL.findall(text)
        )
        harness = (
            '#include "emulator.hpp"\n'
            f"{text}\n{wrappers}"
            'extern "C" const char* emu_last_error() { return emu::error; }\n'
        )
        header = (EMULATOR_DIR / "emulator.hpp").read_text()
        digest = hashlib.sha256("\0".join([harness, header, *options]).encode()).hexdigest()[:24]
        library = self.cache_dir / f"{source.replace('.', '_')}-{digest}.so"
        if not library.exists():  # per-process scratch names, atomic rename: ranks may race
            scratch = library.with_suffix(f".{os.getpid()}")
            scratch.with_suffix(".cpp").write_text(harness)
            command = [
                "g++", "-O1", "-fPIC", "-shared", "-DBMOO_EMULATE", *options, f"-I{EMULATOR_DIR}",
                "-x", "c++", str(scratch.with_suffix(".cpp")), "-o", str(scratch),
            ]  # fmt: skip
            subprocess.run(command, check=True, capture_output=True, text=True)
            scratch.rename(library)
        return library
