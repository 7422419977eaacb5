"""The fused CUDA kernels' host side: sources, nvcc builds, work tables, backend selection.

Runs without a GPU: every source is built with ``nvcc`` for sm_90 exactly as NVRTC gets it (skipped
only without ``nvcc``), and the selection logic is exercised with CuPy absent. The kernels' results
are checked on the CPU emulator (test_kernels_emulated.py) and on a GPU (test_gpu.py).
"""

import logging
import re
import shutil
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from bucketmoo_hooks import BucketMOOState
from bucketmoo_hooks._kernels import (
    KERNEL_CHOICES,
    MAX_RANKS,
    FusedBucket,
    _select,
    check_kernels,
    fused_kernels,
    fuses_weighting,
    unsupported,
)
from bucketmoo_hooks._kernels._plan import GRANULE, MIN_CHUNK, chunk_columns, work_table
from bucketmoo_hooks._kernels._sources import (
    DTYPE_CODES,
    MAX_OBJECTIVES,
    SOURCES,
    compile_options,
    kernel_source,
)
from bucketmoo_hooks.weightings import MGDA, Mean, UPGrad

ROOT = Path(__file__).resolve().parents[2]

# (L, dtype) builds checked with nvcc: both column counts, both ends of L, every dtype.
BUILDS = [
    (1, torch.float32),
    (2, torch.bfloat16),
    (3, torch.float16),
    (8, torch.bfloat16),
    (12, torch.float32),
    (13, torch.bfloat16),
    (16, torch.float16),
    (16, torch.bfloat16),
]


def test_every_source_file_is_built() -> None:
    on_disk = {path.name for path in (ROOT / "csrc").glob("*.cu")}
    assert on_disk == set(SOURCES)


@pytest.mark.parametrize("source", SOURCES)
def test_kernel_source_inlines_every_include_once(source: str) -> None:
    text = kernel_source(source)
    assert "#include" not in text and "#pragma once" not in text
    assert text.count("constexpr int kObjectives") == 1  # common.cuh, once


def ptxas_report(source: str, num_objectives: int, dtype: torch.dtype, tmp: Path) -> str:
    """Build ``source`` as NVRTC would (same text, same options) for sm_90; ptxas's report."""
    unit = tmp / f"{source}-{num_objectives}-{DTYPE_CODES[dtype]}.cu"
    unit.write_text(kernel_source(source))
    command = [
        "nvcc", "-arch=sm_90", "-cubin", "-Xptxas", "-v", "--Werror", "all-warnings",
        *compile_options(num_objectives, dtype), str(unit), "-o", str(unit.with_suffix(".cubin")),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stderr


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_sources_build_for_sm90_without_register_spills(tmp_path: Path) -> None:
    """Every source builds for every listed (L, dtype) with no warning. Register arrays indexed at
    run time would land in local memory: the streaming kernels must have no stack frame at all;
    the solver may spill a few bytes around the out-of-line slow path of float64 division."""
    jobs = [(source, *build) for source in SOURCES for build in BUILDS]
    with ThreadPoolExecutor(max_workers=2) as pool:
        reports = list(pool.map(lambda job: ptxas_report(*job, tmp_path), jobs))
    for (source, num_objectives, dtype), report in zip(jobs, reports, strict=True):
        functions = re.findall(
            r"Compiling entry function '(\w+)'.*?(\d+) bytes stack frame, (\d+) bytes spill stores",
            report,
            re.S,
        )
        expected = {
            "gramian.cu": {"gramian_partials", "gramian_reduce"},
            "sketch.cu": {"sketch_fold"},
        }
        assert {name for name, _, _ in functions} == expected.get(source, {"solve_combine"})
        for name, stack, spills in functions:
            limit = 32 if name == "solve_combine" else 0
            assert int(stack) <= limit and int(spills) <= limit, (name, num_objectives, dtype)


def test_compile_options_reject_what_the_kernels_cannot_build() -> None:
    with pytest.raises(ValueError, match="objectives"):
        compile_options(MAX_OBJECTIVES + 1, torch.float32)
    with pytest.raises(ValueError, match="buckets"):
        compile_options(2, torch.float64)


def covered_columns(table: list[int], segments: list[tuple[int, int]]) -> dict[int, int]:
    """Column → segment (-1 for a gap) from a work table, checking the layout on the way."""
    num = len(segments)
    starts, items = table[: num + 1], table[num + 1 :]
    owner: dict[int, int] = {}
    for index in range(len(items) // 3):
        segment, lo, hi = items[3 * index : 3 * index + 3]
        if segment >= 0:
            assert starts[segment] <= index < starts[segment + 1]
        else:
            assert index >= starts[-1]  # gaps after every segment item
        for column in range(lo, hi):
            assert column not in owner
            owner[column] = segment
    assert all(starts[s] < starts[s + 1] for s in range(num))  # at least one item each
    return owner


@pytest.mark.parametrize(
    "segments",
    [
        [(0, 5000)],
        [(0, 0), (0, 3), (3, 3), (3, 4100), (4500, 5000)],  # empty segments and a gap
        [(2000, 5000), (0, 0), (0, 1000)],  # out of order, leading gap
        [(0, 0), (0, 0)],  # nothing of the bucket in this slice: all gap
    ],
)
def test_work_table_covers_every_column_once(segments: list[tuple[int, int]]) -> None:
    columns, chunk = 5000, 1024
    table, segment_items = work_table(columns, segments, chunk)
    assert table[len(segments)] == segment_items
    owner = covered_columns(table, segments)
    assert sorted(owner) == list(range(columns))
    for segment, (lo, hi) in enumerate(segments):
        assert [c for c, s in owner.items() if s == segment] == list(range(lo, hi))
    items = table[len(segments) + 1 :]
    assert all(hi - lo <= chunk for lo, hi in zip(items[1::3], items[2::3], strict=True))


@pytest.mark.parametrize(
    ("segments", "message"),
    [
        ([], "at least one"),
        ([(0, 10), (5, 20)], "overlap"),
        ([(3, 2)], "within"),
        ([(0, 99)], "within"),
    ],
)
def test_work_table_rejects_bad_segments(segments: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        work_table(50, segments, 1024)


def test_chunks_fill_the_device_in_whole_granules() -> None:
    for columns in [1, 1000, 2**20, 2**22, 2**26]:
        chunk = chunk_columns(columns, 132)
        assert chunk % GRANULE == 0 and chunk >= MIN_CHUNK
        assert -(-columns // chunk) <= 4 * 132
    assert chunk_columns(2**26, 132) < 2**17  # long runs per block, but not one block per SM


class RecordingBackend:
    """Records launches instead of running them."""

    def __init__(self) -> None:
        self.launches: list[tuple[str, int, int, list]] = []

    def module(self, source: str, options: tuple[str, ...], device: torch.device):
        return self

    def multiprocessors(self, device: torch.device) -> int:
        return 132

    def launch(self, kernel: str, grid: int, shared: int, args: list) -> None:
        self.launches.append((kernel, grid, shared, args))


def test_launches_fit_a_hopper_multiprocessor_at_the_limits() -> None:
    """L = 16 objectives over R = 1024 ranks: shared memory within sm_90's 227 KiB per block,
    one block per item of the (int32) work table."""
    ranks = MAX_RANKS
    averaging = torch.zeros(MAX_OBJECTIVES, ranks)
    averaging[torch.arange(ranks) % MAX_OBJECTIVES, torch.arange(ranks)] = 1 / 64
    backend = RecordingBackend()
    fused = FusedBucket(backend, torch.zeros(ranks, 2**20), averaging, None)
    fused.combine(fused.partial_gramians(), MGDA(), None)
    names, grids, shared = zip(*[launch[:3] for launch in backend.launches], strict=True)
    assert names == ("gramian_partials", "gramian_reduce", "solve_combine")
    assert max(shared) <= 227 * 1024
    items = -(-(2**20) // chunk_columns(2**20, 132))
    assert grids == (items, 1, items) and fused.items == items
    assert fused.table.dtype == torch.int32


def test_mismatched_shapes_are_refused_before_any_launch() -> None:
    backend = RecordingBackend()
    for shards, averaging in [
        (torch.zeros(3, 10), torch.ones(2, 4)),
        (torch.zeros(30), torch.ones(2, 3)),
    ]:
        with pytest.raises(ValueError, match=r"shards must be \[R, c\] and averaging \[L, R\]"):
            FusedBucket(backend, shards, averaging, None)
    assert not backend.launches


def test_only_exact_mgda_and_mean_are_solved_in_the_kernel() -> None:
    class Tweaked(MGDA):
        pass

    assert fuses_weighting(MGDA()) and fuses_weighting(MGDA(normalization="l2"))
    assert fuses_weighting(Mean())
    assert not fuses_weighting(UPGrad()) and not fuses_weighting(Tweaked())


@pytest.mark.parametrize("bad", ["gpu", "CUDA", "", None, 1])
def test_kernels_choice_must_be_known(bad: object) -> None:
    with pytest.raises(ValueError, match="kernels must be one of"):
        check_kernels(bad)
    with pytest.raises(ValueError, match="kernels must be one of"):
        BucketMOOState(kernels=bad)  # type: ignore[arg-type]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_forcing_cuda_without_a_gpu_fails_at_construction() -> None:
    assert _select.cuda_backend() == "no CUDA device"
    with pytest.raises(RuntimeError, match="no CUDA device"):
        BucketMOOState(kernels="cuda")
    assert BucketMOOState().kernels == "auto"
    assert BucketMOOState(kernels="torch").kernels == "torch"


def test_without_cupy_auto_falls_back_and_cuda_says_what_to_install(monkeypatch) -> None:
    monkeypatch.setattr(_select.torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy raises ImportError
    monkeypatch.delitem(sys.modules, "bucketmoo_hooks._kernels._cupy", raising=False)
    _select.cuda_backend.cache_clear()
    try:
        reason = _select.cuda_backend()
        assert isinstance(reason, str) and "pip install 'bucketmoo_hooks[cuda]'" in reason
        with pytest.raises(RuntimeError, match="CuPy is not installed"):
            check_kernels("cuda")
        assert check_kernels("auto") == "auto"
    finally:
        _select.cuda_backend.cache_clear()


def test_selection_on_cpu_buckets_is_logged_once(monkeypatch, caplog) -> None:
    monkeypatch.setattr(_select, "_logged", set())
    shards, averaging = torch.randn(4, 10), torch.full((2, 4), 0.5)
    caplog.set_level(logging.INFO, logger="bucketmoo_hooks")
    assert fused_kernels("torch", shards, averaging, None) is None
    assert not caplog.records  # an explicit choice needs no note
    for _ in range(3):
        assert fused_kernels("auto", shards, averaging, None) is None
    assert [r.getMessage() for r in caplog.records] == [
        "bucketmoo_hooks: steps 2-6 on the torch path: the bucket is on cpu"
    ]
    with pytest.raises(RuntimeError, match=r"kernels='cuda' cannot run this bucket: .* on cpu"):
        fused_kernels("cuda", shards, averaging, None)


def test_unsupported_buckets_name_the_limit() -> None:
    averaging = torch.ones(2, 4)
    assert unsupported(torch.zeros(4, 8), averaging) is None
    assert unsupported(torch.zeros(4, 8, dtype=torch.bfloat16), averaging) is None
    assert "float64" in unsupported(torch.zeros(4, 8, dtype=torch.float64), averaging)
    many = MAX_OBJECTIVES + 1
    assert f"{many} objectives" in unsupported(torch.zeros(many, 8), torch.ones(many, many))
    ranks = MAX_RANKS + 1
    assert f"{ranks} ranks" in unsupported(torch.zeros(ranks, 1), torch.ones(2, ranks))


def test_kernel_choices_are_documented() -> None:
    readme = (ROOT / "README.md").read_text()
    for choice in KERNEL_CHOICES:
        assert f'kernels="{choice}"' in readme


def test_a_built_wheel_carries_the_sources(tmp_path: Path) -> None:
    """The wheel holds csrc/ as bucketmoo_hooks/_csrc, and the installed package reads it there."""
    tree = tmp_path / "tree"  # a copy: building in place would write build/ into the checkout
    for name in ("bucketmoo_hooks", "csrc"):
        shutil.copytree(
            ROOT / name, tree / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__")
        )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tree / name)
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
               "-w", str(tmp_path), str(tree)]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, cwd=tmp_path)
    [wheel] = tmp_path.glob("bucketmoo_hooks-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(tmp_path / "site")
    sources = {path.name for path in (ROOT / "csrc").iterdir() if path.suffix in (".cu", ".cuh")}
    assert {f"bucketmoo_hooks/_csrc/{name}" for name in sources} <= names
    assert not any(name.endswith("README.md") and "_csrc" in name for name in names)
    probe = (
        "import bucketmoo_hooks, pathlib; "
        "from bucketmoo_hooks._kernels._sources import SOURCES, kernel_source; "
        "print(pathlib.Path(bucketmoo_hooks.__file__).parent); "
        "print(sum(len(kernel_source(s)) for s in SOURCES))"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            f"import sys; sys.path.insert(0, {str(tmp_path / 'site')!r}); {probe}",
        ],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    package_dir, length = result.stdout.split()
    assert Path(package_dir) == tmp_path / "site" / "bucketmoo_hooks"
    assert int(length) == sum(len(kernel_source(s)) for s in SOURCES)
