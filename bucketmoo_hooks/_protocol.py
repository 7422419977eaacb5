"""The shard-Gramian protocol (docs/design.md §3), shared by the DDP hook and FSDP's reduce-scatter.

Per bucket, rank ``j`` receives slice ``j`` of every rank's gradient (all-to-all), averages the
rows by objective, forms its partial Gramian, all-reduces the ``L×L`` Gramian, computes the
weights on the device, and combines its slice. DDP then all-gathers the slices; FSDP keeps its
slice as the reduce-scatter output. No rank ever holds the ``L`` objective gradients of a whole
bucket, and the bytes moved are those of the all-reduce (or reduce-scatter) being replaced, plus
``L²`` fp32 numbers.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from ._absent import ParameterLayout, partly_present, presence_counts, solve_present
from ._compat import all_gather_single
from ._device_path import cpu_path
from ._kernels import fused_kernels
from ._ledger import BucketTraffic
from .weightings import Weighting, WeightingContext


class BucketComm:
    """The collectives of one bucket, each counted in the bucket's :class:`BucketTraffic`.

    Bytes are those one rank sends under the bandwidth-optimal algorithm of each collective,
    computed from the tensors actually passed.
    """

    __slots__ = ("group", "traffic", "world_size")

    def __init__(self, group: dist.ProcessGroup, traffic: BucketTraffic) -> None:
        self.group = group
        self.traffic = traffic
        self.world_size = group.size()

    def all_to_all(self, output: Tensor, input: Tensor) -> dist.Work:
        # Every rank keeps its own chunk and sends the other R−1.
        chunk_bytes = input.numel() * input.element_size() // self.world_size
        self.traffic.add("all_to_all", (self.world_size - 1) * chunk_bytes)
        return dist.all_to_all_single(output, input, group=self.group, async_op=True)

    def all_reduce(self, tensor: Tensor) -> dist.Work:
        nbytes = tensor.numel() * tensor.element_size()
        self.traffic.add("all_reduce", 2 * (self.world_size - 1) * nbytes // self.world_size)
        return dist.all_reduce(tensor, group=self.group, async_op=True)

    def all_gather(self, output: Tensor, input: Tensor) -> dist.Work:
        self.traffic.add("all_gather", (self.world_size - 1) * input.numel() * input.element_size())
        return all_gather_single(output, input, group=self.group, async_op=True)


def shard_length(numel: int, world_size: int) -> int:
    """``c = ceil(n / R)``: the slice of a bucket that one rank combines."""
    return -(-numel // world_size)


class Workspace:
    """Buffers reused from bucket to bucket for the exchange of CPU buckets, one bucket at a time.

    A fresh bucket-sized tensor on CPU is fresh pages: glibc hands large blocks back to the
    system when they are freed, so every bucket would page-fault its buffers in again (tens of
    thousands of faults per step, measured to cost as much as the exchange itself on gloo). Holds
    at most two buffers of the largest bucket per dtype. Not for CUDA tensors (the caching
    allocator already reuses blocks, in stream order) and not for slices that outlive the call
    (global MOO holds them).
    """

    __slots__ = ("_buffers",)

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype], Tensor] = {}

    def take(self, slot: str, numel: int, dtype: torch.dtype) -> Tensor:
        """``numel`` elements of buffer ``slot``; its content is whatever the last user left."""
        buffer = self._buffers.get((slot, dtype))
        if buffer is None or buffer.numel() < numel:
            buffer = self._buffers[slot, dtype] = torch.empty(numel, dtype=dtype)
        return buffer[:numel]

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())


def scatter_shards(comm: BucketComm, flat: Tensor, workspace: Workspace | None = None) -> Tensor:
    """Step 1: pad ``flat`` to ``R·c`` and all-to-all it; returns ``S_j ∈ ℝ^{R×c}``.

    Row ``r`` of the result is slice ``j`` (this rank's) of rank ``r``'s gradient. With a
    ``workspace`` (CPU ``flat`` only), the result lives in it until the next bucket's exchange.
    """
    world_size = comm.world_size
    numel = flat.numel()
    shard = shard_length(numel, world_size)
    if workspace is not None and flat.device.type != "cpu":
        workspace = None

    def empty(slot: str) -> Tensor:
        if workspace is None:
            return flat.new_empty(world_size * shard)
        return workspace.take(slot, world_size * shard, flat.dtype)

    padded = flat
    if numel != world_size * shard:
        padded = empty("input")
        padded[numel:].zero_()
        padded[:numel].copy_(flat)
    received = empty("received")
    comm.all_to_all(received, padded).wait()
    return received.view(world_size, shard)


Segment = tuple[int, int]


def shard_segments(sizes: Sequence[int], rank: int, shard: int) -> list[Segment]:
    """Where each of consecutive pieces of ``sizes`` elements falls in slice ``rank`` of length
    ``shard``: ``(lo, hi)`` in slice coordinates, ``(0, 0)`` for a piece outside the slice.

    Every rank gets one segment per piece, so the stacked partial Gramians have the same shape on
    all ranks and one all-reduce sums them.
    """
    start, end = rank * shard, (rank + 1) * shard
    segments, offset = [], 0
    for size in sizes:
        lo, hi = max(offset, start), min(offset + size, end)
        segments.append((lo - start, hi - start) if lo < hi else (0, 0))
        offset += size
    return segments


def objective_shards(shards: Tensor, averaging: Tensor) -> Tensor:
    """Step 2: ``A_j = M S_j ∈ ℝ^{L×c}``, in fp32 even for bf16/fp16 buckets (fp64 stays fp64).

    When every rank is its own objective, in rank order, ``M`` is the identity and ``A_j`` is
    ``S_j`` itself: on CPU, where the check costs no device synchronisation, the product (a
    pass over the bucket, the hook's largest compute on gloo) is skipped. The product does not
    depend on the matmul precision flags (:func:`exact_matmul_in_fp32`).
    """
    compute_dtype = torch.promote_types(shards.dtype, torch.float32)
    if cpu_path(averaging.device) and _is_identity(averaging):
        return shards.to(compute_dtype)
    if compute_dtype != torch.float32 or exact_matmul_in_fp32(shards.device):
        return averaging.to(compute_dtype) @ shards.to(compute_dtype)
    return _wide_product(averaging, shards, compute_dtype)


def _is_identity(matrix: Tensor) -> bool:
    rows, columns = matrix.shape
    return rows == columns and torch.equal(matrix, torch.eye(rows, dtype=matrix.dtype))


def partial_gramians(objectives: Tensor, segments: Sequence[Segment]) -> Tensor:
    """Step 3: ``P_j[s] = A_j[:, s] A_j[:, s]ᵀ`` for every segment, ``[S, L, L]``
    (:func:`gramian_of` each).

    Zero padding and empty segments add nothing.
    """
    pieces = [objectives[:, lo:hi] for lo, hi in segments]
    if _exact_as_it_is(objectives):  # the flags read once per bucket, not per segment
        return torch.stack([piece @ piece.T for piece in pieces])
    return torch.stack([_wide_gramian(piece) for piece in pieces])


def exact_matmul_in_fp32(device: torch.device) -> bool:
    """Whether an fp32 matmul on ``device`` is IEEE fp32 whatever the precision flags.

    TF32 (``torch.backends.cuda.matmul.allow_tf32 = True``,
    ``torch.set_float32_matmul_precision("high")``, ``transformers``' ``tf32=True``) rounds the
    inputs of every fp32 cuBLAS GEMM to 10 mantissa bits, and oneDNN's ``"tf32"``/``"bf16"``
    (``torch.backends.mkldnn.matmul.fp32_precision``, set by ``"high"``/``"medium"``) may do the
    same on CPUs that support it: ~1e-3 relative error or more in ``A``, ``G`` and ``d``. The
    flags are process-global (a scoped override would race with the user's threads and the
    hook's worker), so none is touched: on the CPU at oneDNN's default precision an fp32 matmul
    is exact and is used as it is; anywhere else (and under
    :func:`._device_path.force_device_path`) ``A`` and ``G`` are accumulated in float64, whose
    products of fp32 numbers are exact and which no flag affects, and rounded to fp32 once, and
    ``d`` is a gemv (:func:`weighted_sum`). The CUDA results are then bitwise the same with
    TF32 on or off.
    """
    if not cpu_path(device):
        return False
    # oneDNN's precision: the first level that is set (matmul, oneDNN, all backends).
    levels = (torch.backends.mkldnn.matmul, torch.backends.mkldnn, torch.backends)
    settings = (level.fp32_precision for level in levels)
    return next((setting for setting in settings if setting != "none"), "ieee") == "ieee"


def gramian_of(objectives: Tensor) -> Tensor:
    """``G = A Aᵀ`` for ``A ∈ ℝ^{L×c}``, in ``A``'s dtype, independent of the matmul precision
    flags (:func:`exact_matmul_in_fp32`): an fp32 ``A`` is multiplied in fp32 on the CPU at
    default precision, else accumulated in float64 over blocks of columns (a bounded
    temporary, cache-sized on the CPU) and rounded to fp32 once. Fixed order: bitwise
    reproducible."""
    return objectives @ objectives.T if _exact_as_it_is(objectives) else _wide_gramian(objectives)


def _exact_as_it_is(matrix: Tensor) -> bool:
    """Whether a matmul of ``matrix`` is exact as it is: not fp32, or fp32 exact here."""
    return matrix.dtype != torch.float32 or exact_matmul_in_fp32(matrix.device)


def _wide_gramian(objectives: Tensor) -> Tensor:
    num = objectives.shape[0]
    gramian = objectives.new_zeros((num, num), dtype=torch.float64)
    for block in objectives.split(_block_columns(objectives), dim=1):
        wide = block.to(torch.float64)
        gramian.addmm_(wide, wide.T)
    return gramian.to(objectives.dtype)


def weighted_sum(weights: Tensor, objectives: Tensor) -> Tensor:
    """``d = wᵀA`` (``[L]``, ``[L, c]`` → ``[c]``) in ``A``'s dtype, independent of the matmul
    precision flags (:func:`exact_matmul_in_fp32`).

    ``weights @ objectives`` is a ``[1, L] × [L, c]`` GEMM, which TF32 rounds. Off the CPU's
    default it is a matrix–vector product (``torch.mv``) instead: PyTorch runs fp32 gemv with
    TF32 off whatever the flags (``at::cuda::blas::gemv<float>``: TF32 gains nothing on a
    bandwidth-bound product), with no extra pass. On a CPU whose oneDNN precision was
    lowered, blocks in float64.
    """
    weights = weights.to(objectives.dtype)
    if _exact_as_it_is(objectives):
        return weights @ objectives
    if not cpu_path(objectives.device):
        return torch.mv(objectives.T, weights)
    return _wide_product(weights, objectives, objectives.dtype)


def _wide_product(left: Tensor, right: Tensor, dtype: torch.dtype) -> Tensor:
    """``left @ right`` (``[k, L]`` or ``[L]`` by ``[L, c]``) accumulated in float64 over blocks
    of ``right``'s columns, written in ``dtype``: no precision flag applies to it."""
    wide = left.to(torch.float64)
    result = right.new_empty((*left.shape[:-1], right.shape[1]), dtype=dtype)
    step = _block_columns(right)
    for lo in range(0, right.shape[1], step):
        result[..., lo : lo + step] = wide @ right[:, lo : lo + step].to(torch.float64)
    return result


def _block_columns(matrix: Tensor) -> int:
    """Columns of ``matrix`` per float64 block: 2¹⁸ elements (2 MiB) on the CPU, where a block
    stays in cache (on a 25 MiB bucket 6× faster than converting it whole), 2²² (32 MiB)
    elsewhere: one or two blocks per bucket, so few kernel launches."""
    elements = 1 << 18 if matrix.device.type == "cpu" else 1 << 22
    return max(1, elements // max(1, matrix.shape[0]))


def combine_segments(
    weights: Tensor, objectives: Tensor, segments: Sequence[Segment], dtype: torch.dtype
) -> Tensor:
    """Step 6: ``d_j[s] = w[s]ᵀ A_j[:, s]`` for every segment (:func:`weighted_sum`), in the
    bucket dtype."""
    if len(segments) == 1 and segments[0] == (0, objectives.shape[1]):
        return weighted_sum(weights[0], objectives).to(dtype)
    update = objectives.new_zeros(objectives.shape[1])
    for (lo, hi), segment_weights in zip(segments, weights, strict=True):
        update[lo:hi] = weighted_sum(segment_weights, objectives[:, lo:hi])
    return update.to(dtype)


def segment_weights(
    weighting: Weighting, gramians: Tensor, contexts: Sequence[WeightingContext]
) -> Tensor:
    """Step 5 for every segment: ``[S, L]`` weights, segment ``s`` solved with ``contexts[s]``."""
    return torch.stack(
        [weighting(gramian, context) for gramian, context in zip(gramians, contexts, strict=True)]
    )


@dataclass(frozen=True, slots=True)
class ShardCombination:
    """What one rank computed for its slice of one bucket.

    Attributes:
        update: ``d_j``, this rank's slice of the combined update, in the bucket dtype.
        gramians: The all-reduced Gramians, one per segment, ``[S, L, L]`` (fp32, fp64 for fp64).
        weights: One weight vector per segment, ``[S, L]``.
    """

    update: Tensor
    gramians: Tensor
    weights: Tensor


def all_reduce_gramians(
    comm: BucketComm,
    gramians: Tensor,
    shards: Tensor,
    averaging: Tensor,
    layout: ParameterLayout | None,
) -> tuple[Tensor, Tensor | None]:
    """Step 4: ``G[s] = Σ_j P_j[s]``; with a ``layout``, the presence counts of its parameters
    (``[P, L]``, :func:`._absent.presence_counts`) ride in the same all-reduce.

    Returns the all-reduced Gramians and counts (``None`` without a layout).
    """
    if layout is None:
        comm.all_reduce(gramians).wait()
        return gramians, None
    counts = presence_counts(shards, averaging, layout.segments).to(gramians.dtype)
    packed = torch.cat([gramians.reshape(-1), counts.reshape(-1)])
    comm.all_reduce(packed).wait()
    return packed[: gramians.numel()].view_as(gramians), packed[gramians.numel() :].view_as(counts)


def solve_shards(
    comm: BucketComm,
    shards: Tensor,
    averaging: Tensor,
    weighting: Weighting,
    contexts: Sequence[WeightingContext],
    segments: Sequence[Segment] | None = None,
    kernels: str = "auto",
    check: Callable[[Tensor], None] | None = None,
    layout: ParameterLayout | None = None,
) -> ShardCombination:
    """Steps 2–6: group-average, partial Gramians, one all-reduce, weights, combined slice.

    Args:
        shards: ``S_j ∈ ℝ^{R×c}`` from :func:`scatter_shards` (or FSDP's reduce-scatter input).
        averaging: ``M ∈ ℝ^{L×R}`` (:meth:`ObjectiveMap.averaging_matrix`) on the shards' device.
        contexts: One weighting context per problem (per segment).
        segments: Independent problems within the slice (:func:`shard_segments`); ``None`` is one
            problem for the whole slice (bucket granularity).
        kernels: ``"auto"``, ``"torch"`` or ``"cuda"``: whether the fused CUDA kernels
            (:mod:`._kernels`) or the torch functions above do the compute (``BucketMOOState``).
        check: Called with the all-reduced Gramians before they are used (e.g.
            :func:`._nonfinite.raise_if_nonfinite`).
        layout: The parameters in the slice, to leave out the objectives absent from some of
            them (:mod:`._absent`); their presence counts travel in the Gramian all-reduce, and
            are read on the host (one synchronisation on a GPU). ``None``: every objective is
            taken as present everywhere.
    """
    fused = fused_kernels(kernels, shards, averaging, segments)
    objectives = None  # A_j; the fused kernels recompute it from S_j instead of storing it
    if fused is not None:
        gramians = fused.partial_gramians()
    else:
        objectives = objective_shards(shards, averaging)
        gramians = partial_gramians(objectives, segments or [(0, objectives.shape[1])])
    gramians, counts = all_reduce_gramians(comm, gramians, shards, averaging, layout)
    present = None if counts is None else partly_present(counts)
    if check is not None:
        check(gramians)
    if present is not None:
        weights, parameter_weights = solve_present(
            weighting, gramians, contexts, present, layout.problems
        )
        if parameter_weights is not None:
            assert layout is not None
            if objectives is None:
                objectives = objective_shards(shards, averaging)
            update = combine_segments(parameter_weights, objectives, layout.segments, shards.dtype)
            return ShardCombination(update, gramians, weights)
    elif fused is None or not fused.solves(weighting):
        weights = segment_weights(weighting, gramians, contexts)
    else:
        weights = None  # solved in the combine kernel
    if fused is not None:
        weights, update = fused.combine(gramians, weighting, weights)
        return ShardCombination(update, gramians, weights)
    assert objectives is not None and weights is not None
    update = combine_segments(
        weights, objectives, segments or [(0, objectives.shape[1])], shards.dtype
    )
    return ShardCombination(update, gramians, weights)
