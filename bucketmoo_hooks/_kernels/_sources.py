"""The CUDA sources of the fused kernels and the options NVRTC compiles them with.

The sources live in the repository's ``csrc/`` and ship inside the package as
``bucketmoo_hooks/_csrc`` (a link to ``csrc/`` in the repository, a copy in a wheel), so they are
read with :mod:`importlib.resources` from wherever the package is installed.
"""

import re
from importlib import resources

import torch

#: The compilation units; each is compiled once per (number of objectives, dtype). The sketch
#: protocol's fold (sketch.cu) is compiled for one objective.
SOURCES = ("gramian.cu", "combine.cu", "sketch.cu")
#: Threads per block of every kernel.
BLOCK = 256
#: Largest ``L`` the kernels compile for (one warp lane per objective, the Gramian's triangle in
#: registers).
MAX_OBJECTIVES = 16
#: ``BMOO_DTYPE`` of each bucket dtype the kernels read and write.
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.MULTILINE)


def columns_per_thread(num_objectives: int) -> int:
    """Columns each thread owns per tile. The ``L(L+1)/2`` fp32 accumulators of kernel 1 limit the
    blocks per multiprocessor (ptxas: 64 registers at ``L = 8``, 128 at 12, 254 at 16), so from
    ``L = 13`` on, with one block per multiprocessor, each thread keeps four columns' loads in
    flight instead of two to cover the memory latency."""
    return 2 if num_objectives <= 12 else 4


def read_source(name: str) -> str:
    """The text of ``csrc/<name>`` from the installed package."""
    return resources.files("bucketmoo_hooks").joinpath("_csrc", name).read_text(encoding="utf-8")


def kernel_source(name: str) -> str:
    """``csrc/<name>`` with every ``#include "file"`` replaced by that file's text (each file once,
    ``#pragma once`` dropped), so the text alone determines the compiled code: CuPy's compile cache
    is keyed by it, and NVRTC needs no include path."""
    included: set[str] = set()

    def expand(file: str) -> str:
        included.add(file)
        text = read_source(file).replace("#pragma once\n", "")
        return _INCLUDE.sub(lambda match: "" if match[1] in included else expand(match[1]), text)

    return expand(name)


def compile_options(num_objectives: int, dtype: torch.dtype) -> tuple[str, ...]:
    """The NVRTC (and nvcc) options of the build for ``num_objectives`` and ``dtype``."""
    if not 1 <= num_objectives <= MAX_OBJECTIVES:
        raise ValueError(
            f"the kernels support 1 to {MAX_OBJECTIVES} objectives, got {num_objectives}"
        )
    if dtype not in DTYPE_CODES:
        raise ValueError(f"the kernels support {list(DTYPE_CODES)} buckets, got {dtype}")
    return (
        "-std=c++17",
        f"-DBMOO_OBJECTIVES={num_objectives}",
        f"-DBMOO_DTYPE={DTYPE_CODES[dtype]}",
        f"-DBMOO_BLOCK={BLOCK}",
        f"-DBMOO_COLUMNS={columns_per_thread(num_objectives)}",
    )
