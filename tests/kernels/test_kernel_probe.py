"""The fused kernels' probe: with CuPy installed but unusable, ``kernels="auto"`` falls back to the
torch path with the reason logged once per device, and ``kernels="cuda"`` fails when the state is
built, naming the reason, instead of inside backward.

Without a GPU, CUDA is simulated: ``torch.cuda`` is patched to report a device, a fake ``cupy``
module stands in for CuPy (its NVRTC compile fails as asked), and buckets on the device are fake
tensors. The check that compiles, launches and verifies the kernels runs on the CPU emulator.
"""

import contextlib
import logging
import sys
import types
from pathlib import Path

import pytest
import torch
from _emulator import EmulatedBackend, EmulatedModule, have_compiler
from torch._subclasses.fake_tensor import FakeTensorMode

from bucketmoo_hooks import BucketMOOState
from bucketmoo_hooks._kernels import (
    _select,
    check_kernels,
    fused_kernels,
    probe_kernels,
    unsupported,
)
from bucketmoo_hooks._kernels._select import check_backend

CUPY_MODULE = "bucketmoo_hooks._kernels._cupy"


class FakeCupy(types.ModuleType):
    """Just what ``_kernels._cupy`` touches before a launch; compiling raises ``error``."""

    def __init__(self, error: Exception, runtime: int = 13000, driver: int = 13000) -> None:
        super().__init__("cupy")
        self.__version__ = "14.0.0"
        self.compiled: list[tuple[str, ...]] = []
        fake = self

        class RawModule:
            def __init__(self, code: str, options: tuple[str, ...]) -> None:
                self.options = options

            def compile(self) -> None:
                fake.compiled.append(self.options)
                raise error

        self.RawModule = RawModule
        self.cuda = types.SimpleNamespace(
            Device=lambda index: contextlib.nullcontext(),
            runtime=types.SimpleNamespace(
                runtimeGetVersion=lambda: runtime, driverGetVersion=lambda: driver
            ),
        )


class CompileException(Exception):
    """Stands for ``cupy.cuda.compiler.CompileException``."""


@pytest.fixture
def simulated_cuda(monkeypatch: pytest.MonkeyPatch):
    """A machine with CUDA 13 devices of compute capability 9.0 (patch ``capability`` to change
    it) and a fake CuPy whose compiler fails; returns a function installing the fake."""
    capability = {"value": (9, 0)}

    def get_device_capability(device: object = None) -> tuple[int, int]:
        return capability["value"]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", get_device_capability)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(_select, "_probes", {})
    monkeypatch.setattr(_select, "_logged", set())
    monkeypatch.delitem(sys.modules, CUPY_MODULE, raising=False)
    _select.cuda_backend.cache_clear()

    def install(cupy: FakeCupy) -> FakeCupy:
        monkeypatch.setitem(sys.modules, "cupy", cupy)
        return cupy

    install.capability = capability
    yield install
    sys.modules.pop(CUPY_MODULE, None)  # imported with the fake: never reuse it
    _select.cuda_backend.cache_clear()


def cuda_bucket(device: str = "cuda", dtype: torch.dtype = torch.float32):
    with FakeTensorMode():
        return torch.empty(4, 10, device=device, dtype=dtype), torch.empty(2, 4, device=device)


def test_auto_falls_back_and_cuda_raises_naming_the_reason(simulated_cuda, caplog) -> None:
    cupy = simulated_cuda(FakeCupy(CompileException("nvrtc: error: invalid value for --gpu")))
    caplog.set_level(logging.INFO, logger="bucketmoo_hooks")

    reason = probe_kernels(0)
    assert "cuda:0" in reason and "CompileException: nvrtc: error: invalid value" in reason
    assert "CuPy 14.0.0 for CUDA 13.0, torch for CUDA 13.0, driver for CUDA 13.0" in reason
    assert probe_kernels(torch.device("cuda", 0)) == probe_kernels("cuda") == reason
    assert len(cupy.compiled) == 1  # probed once per device

    with pytest.raises(RuntimeError, match="kernels='cuda' needs the fused CUDA kernels, but: "):
        check_kernels("cuda")
    with pytest.raises(RuntimeError, match="nvrtc: error: invalid value"):
        BucketMOOState(kernels="cuda")
    assert check_kernels("auto") == "auto"

    shards, averaging = cuda_bucket()
    for _ in range(3):
        assert fused_kernels("auto", shards, averaging, None) is None
    with pytest.raises(
        RuntimeError, match=r"cannot run this bucket: .*nvrtc: error: invalid value"
    ):
        fused_kernels("cuda", shards, averaging, None)
    assert fused_kernels("auto", *cuda_bucket("cuda:1"), None) is None  # another device: probed

    assert len(cupy.compiled) == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "cuda:0" in warnings[0] and "cuda:1" in warnings[1]
    assert all("nvrtc: error: invalid value" in warning for warning in warnings)
    fallbacks = [r.getMessage() for r in caplog.records if "on the torch path" in r.getMessage()]
    assert fallbacks == [
        f"bucketmoo_hooks: steps 2-6 on the torch path: {probe_kernels(index)}" for index in (0, 1)
    ]


def test_a_cupy_for_another_cuda_is_named(simulated_cuda) -> None:
    simulated_cuda(FakeCupy(CompileException("ptx version"), runtime=12080, driver=12040))
    reason = probe_kernels(0)
    assert "CuPy 14.0.0 for CUDA 12.8, torch for CUDA 13.0, driver for CUDA 12.4" in reason
    assert "install the CuPy for torch's CUDA: cupy-cuda13x" in reason


def test_a_gpu_before_sm_70_is_refused_before_compiling(simulated_cuda) -> None:
    cupy = simulated_cuda(FakeCupy(CompileException("unreachable")))
    simulated_cuda.capability["value"] = (6, 1)
    assert probe_kernels(0) == "cuda:0 is sm_61; the kernels need sm_70 (warp match instructions)"
    assert cupy.compiled == []


def test_bf16_buckets_need_sm_80(simulated_cuda) -> None:
    simulated_cuda.capability["value"] = (7, 5)
    shards, averaging = cuda_bucket(dtype=torch.bfloat16)
    assert unsupported(shards, averaging) == (
        "bf16 buckets on sm_75 (the kernels' bf16 rounding needs sm_80)"
    )
    assert unsupported(*cuda_bucket(dtype=torch.float16)) is None
    simulated_cuda.capability["value"] = (8, 0)
    assert unsupported(shards, averaging) is None


# -- the check itself, on the CPU emulator --------------------------------------------------------

needs_compiler = pytest.mark.skipif(not have_compiler(), reason="needs g++ for the CPU emulator")


@pytest.fixture(scope="module")
def backend(request: pytest.FixtureRequest) -> EmulatedBackend:
    return EmulatedBackend(Path(request.config.cache.mkdir("cuda_emulator")))


class Faulty(EmulatedBackend):
    """The emulator with one fault: NVRTC fails, a launch fails, or a kernel writes wrong bits."""

    def __init__(self, working: EmulatedBackend, fault: str) -> None:
        super().__init__(working.cache_dir)
        self.fault = fault

    def module(self, source: str, options: tuple[str, ...], device: torch.device):
        if self.fault == "compile":
            raise CompileException("nvrtc: error: identifier '__match_any_sync' is undefined")
        return FaultyModule(super().module(source, options, device), self.fault)


class FaultyModule:
    def __init__(self, module: EmulatedModule, fault: str) -> None:
        self.module, self.fault = module, fault

    def launch(self, kernel: str, grid: int, shared: int, args) -> None:
        if self.fault == "launch":
            raise RuntimeError("CUDA_ERROR_NO_BINARY_FOR_GPU: no kernel image is available")
        self.module.launch(kernel, grid, shared, args)
        args[-1].add_(1)  # every kernel's output is its last argument


@needs_compiler
def test_the_check_compiles_launches_and_verifies(backend: EmulatedBackend) -> None:
    check_backend(backend, torch.device("cpu"))
    for fault, message in [
        ("compile", "identifier '__match_any_sync' is undefined"),
        ("launch", "no kernel image is available"),
        ("wrong", "the kernels computed wrong results on cpu"),
    ]:
        with pytest.raises(Exception, match=message):
            check_backend(Faulty(backend, fault), torch.device("cpu"))
