"""Fused kernels bound to one bucket: the shard protocol's steps 2–6 on CUDA (:mod:`.._shard`)."""

import ctypes
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor

from .._device_path import to_device
from ..weightings import MGDA, Mean, Weighting
from ._plan import Segment, chunk_columns, work_table
from ._sources import BLOCK, columns_per_thread, compile_options

#: A kernel argument: a tensor (passed as its data pointer) or a C scalar of the parameter's type.
KernelArgument = Tensor | ctypes.c_int32 | ctypes.c_int64

# Weighting modes of solve_combine (csrc/combine.cu).
_GIVEN, _MEAN, _MGDA = 0, 1, 2
# Work tables kept on each device, by (device, columns, segments, chunk): a model has a fixed set
# of buckets (and parameters in them), so the same few tables recur every step.
_TABLE_CACHE_SIZE = 512


class Module(Protocol):
    """The kernels of one compiled source file."""

    def launch(self, kernel: str, grid: int, shared: int, args: Sequence[KernelArgument]) -> None:
        """Launch ``kernel`` with ``grid`` blocks of :data:`BLOCK` threads and ``shared`` bytes of
        dynamic shared memory on the current stream of the arguments' device."""


class Backend(Protocol):
    """Compiles and launches the kernels (CuPy on a GPU; the tests' CPU emulator)."""

    def module(self, source: str, options: tuple[str, ...], device: torch.device) -> Module:
        """``source`` (a file of :data:`~._sources.SOURCES`) compiled with ``options``."""

    def multiprocessors(self, device: torch.device) -> int:
        """How many blocks run at once, in units of a multiprocessor."""


_tables: OrderedDict[tuple, tuple[Tensor, int, int]] = OrderedDict()
_tables_lock = threading.Lock()


def _work_table(
    device: torch.device, columns: int, segments: Sequence[Segment] | None, chunk: int
) -> tuple[Tensor, int, int]:
    """The work table on ``device`` (cached), its number of segment items and of all items."""
    key = (device, columns, None if segments is None else tuple(segments), chunk)
    with _tables_lock:
        cached = _tables.get(key)
        if cached is not None:
            _tables.move_to_end(key)
            return cached
    whole = [(0, columns)] if segments is None else segments
    table, segment_items = work_table(columns, whole, chunk)
    host = torch.tensor(table, dtype=torch.int32)
    # Pinned memory and a non-blocking copy: building a table never waits for the device.
    on_device = to_device(host, device)
    num_segments = 1 if segments is None else len(segments)
    entry = (on_device, segment_items, (len(table) - num_segments - 1) // 3)
    with _tables_lock:
        _tables[key] = entry
        if len(_tables) > _TABLE_CACHE_SIZE:
            _tables.popitem(last=False)
    return entry


def fuses_weighting(weighting: Weighting) -> bool:
    """Whether the combine kernel computes the weights itself (exactly MGDA or Mean: a subclass
    may change ``forward``); other weightings run in torch on the device, between the kernels."""
    return type(weighting) in (MGDA, Mean)


class FusedBucket:
    """Steps 2–6 of docs/design.md §3 for one bucket in two fused kernels plus a small reduction.

    ``partial_gramians`` reads ``S`` once and returns the fp32 partial Gramians ``[S, L, L]`` (to be
    all-reduced in place); ``combine`` reads ``S`` once more, computes the weights on the device (or
    takes them), and writes ``d_j`` in the bucket dtype. ``A = M S`` is never stored.

    Args:
        backend: What compiles and launches the kernels.
        shards: ``S_j`` ``[R, c]``, fp32/bf16/fp16, on the backend's device.
        averaging: ``M`` ``[L, R]``: every column exactly one nonzero (the averaging matrix).
        segments: Independent problems in the slice (:func:`~.._shard.shard_segments`), or
            ``None`` for one problem over the whole slice.

    Raises:
        ValueError: ``shards`` is not ``[R, c]`` or ``averaging`` not ``[L, R]``.
    """

    def __init__(
        self,
        backend: Backend,
        shards: Tensor,
        averaging: Tensor,
        segments: Sequence[Segment] | None,
    ) -> None:
        if shards.ndim != 2 or averaging.ndim != 2 or averaging.shape[1] != shards.shape[0]:
            raise ValueError(
                f"shards must be [R, c] and averaging [L, R], got {tuple(shards.shape)} and "
                f"{tuple(averaging.shape)}"
            )
        self.shards = shards.contiguous()
        self.averaging = averaging.to(device=shards.device, dtype=torch.float32).contiguous()
        self.num_objectives, self.ranks = self.averaging.shape
        self.columns = self.shards.shape[1]
        self.num_segments = 1 if segments is None else len(segments)
        device = self.shards.device
        chunk = chunk_columns(self.columns, backend.multiprocessors(device))
        self.table, self.segment_items, self.items = _work_table(
            device, self.columns, segments, chunk
        )
        options = compile_options(self.num_objectives, self.shards.dtype)
        self._gramian = backend.module("gramian.cu", options, device)
        self._combine = backend.module("combine.cu", options, device)

    def solves(self, weighting: Weighting) -> bool:
        """Whether :meth:`combine` computes the weights itself (:func:`fuses_weighting`)."""
        return fuses_weighting(weighting)

    def _common_args(self) -> list[KernelArgument]:
        ranks, columns = ctypes.c_int32(self.ranks), ctypes.c_int64(self.columns)
        return [self.shards, ranks, columns, self.averaging]

    def partial_gramians(self) -> Tensor:
        """``P_j[s] = A_j[:, s] A_j[:, s]ᵀ`` for every segment, fp32 ``[S, L, L]``."""
        num = self.num_objectives
        device = self.shards.device
        partials = torch.empty(
            (num * (num + 1) // 2, self.segment_items), dtype=torch.float64, device=device
        )
        tile = BLOCK * columns_per_thread(num)
        self._gramian.launch(
            "gramian_partials",
            self.segment_items,
            4 * num * tile + 20 * self.ranks,
            [
                *self._common_args(),
                self.table,
                ctypes.c_int32(self.num_segments),
                ctypes.c_int32(self.segment_items),
                partials,
            ],
        )
        gramians = torch.empty((self.num_segments, num, num), dtype=torch.float32, device=device)
        self._gramian.launch(
            "gramian_reduce",
            self.num_segments,
            0,
            [
                partials,
                ctypes.c_int32(self.segment_items),
                self.table,
                ctypes.c_int32(self.num_segments),
                gramians,
            ],
        )
        return gramians

    def combine(
        self, gramians: Tensor, weighting: Weighting, weights: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """``(w, d_j)``: the weights ``[S, L]`` (fp32) and the combined slice in the bucket dtype.

        Args:
            gramians: The all-reduced Gramians ``[S, L, L]`` (fp32).
            weighting: The weighting; solved in the kernel if :func:`fuses_weighting`.
            weights: ``None`` if the kernel solves, else the weighting's weights ``[S, L]``.
        """
        num = self.num_objectives
        iterations, l2_normalise = 0, 0
        if weights is not None:
            mode = _GIVEN
            weights = weights.to(dtype=torch.float32).contiguous()
        else:
            if not fuses_weighting(weighting):
                raise ValueError(f"{weighting!r} is not solved in the kernel; pass its weights")
            shape = (self.num_segments, num)
            weights = torch.empty(shape, dtype=torch.float32, device=gramians.device)
            mode = _MEAN if isinstance(weighting, Mean) else _MGDA
            if mode == _MGDA:
                iterations = 2 * num if weighting.iterations is None else weighting.iterations
                l2_normalise = int(weighting.normalization == "l2")
        update = torch.empty(self.columns, dtype=self.shards.dtype, device=self.shards.device)
        self._combine.launch(
            "solve_combine",
            self.items,
            4 * num + 12 * self.ranks,
            [
                *self._common_args(),
                self.table,
                ctypes.c_int32(self.num_segments),
                gramians.to(dtype=torch.float32).contiguous(),
                weights,
                ctypes.c_int32(mode),
                ctypes.c_int32(iterations),
                ctypes.c_int32(l2_normalise),
                update,
            ],
        )
        return weights, update
