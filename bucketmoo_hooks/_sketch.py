r"""The sketch protocol (``protocol="sketch"``, docs/protocols.md): weights first, from a random
sketch of every rank's gradient, then the engine's own SUM all-reduce (or reduce-scatter) of
the rank's gradient scaled by its weight.

Per problem (a bucket or unit, or a parameter with ``granularity="parameter"``) of ``n``
elements and sketch size ``k``:

1. Every rank sketches its own gradient, ``s_r = Φ g_r`` (:func:`sketch`): problems of at most
   ``k`` elements are kept as they are (``Φ = I``, exact); longer ones are folded, see below.
2. One small collective gives every rank ``Y = M [s_1 … s_R]ᵀ ∈ ℝ^{L×k}`` (row ``ℓ``: the sketch
   of ``ḡ_ℓ``, by linearity): an all-reduce of the rows ``s_r/m_ℓ(r)`` placed at ``ℓ(r)``, or an
   all-gather of ``[R, k]`` when that sends fewer bytes (``L > R/2``). ``Ĝ = Y Yᵀ``.
3. The core solves ``ŵ = weighting(Ĝ)`` (every rank alike: ``Y`` is the same everywhere).
4. Rank ``r`` scales its gradient in place by ``α_r = Σ_ℓ ŵ_ℓ M_ℓr = ŵ_ℓ(r)/m_ℓ(r)`` and hands
   it to the SUM all-reduce (or reduce-scatter) the engine would have run:
   ``Σ_r α_r g_r = Σ_ℓ ŵ_ℓ ḡ_ℓ``. Nothing is gathered, nothing is held.

The fold ``Φ``. Let ``p`` be the largest prime ``≤ k`` (:func:`fold_width`) and cut the problem into
rows of ``p`` consecutive elements (the last one shorter): element ``i`` sits in row ``⌊i/p⌋`` and
column ``i mod p``. Then ``(Φg)_j = Σ_b ρ_b σ_{bp+j} g_{bp+j}``: a sum over the rows, column by
column, with a sign ``σ_i`` per element and a sign ``ρ_b`` per row, both drawn afresh for every
step and problem from a seed all ranks share (:func:`problem_seed`): ``ρ`` by the CPU's
generator (the same map on every device), ``σ`` as a window of a fixed random table
(:class:`SignTable`) at an offset drawn from the seed, so that no pair of elements keeps an
unlucky sign product from step to step. It is a CountSketch whose hash is ``i mod p``:

- unbiased at every step: ``⟨Φa, Φb⟩ − ⟨a, b⟩ = Σ_j Σ_{b≠b'} ρ_b ρ_b' σσ' a b'`` has mean 0 over
  the fresh ``ρ``, and its errors at different steps are uncorrelated;
- ``Var[⟨Φa, Φb⟩] = Σ_j (A_j B_j + C_j² − 2 Σ_{i∈j} a_i² b_i²)`` over the columns ``j`` (``A_j``,
  ``B_j``: the energy of ``a``, ``b`` in column ``j``, ``C_j = Σ_{i∈j} a_i b_i``), over the
  draws of ``σ`` and ``ρ``. When the energy spreads evenly over the ``p`` columns this is at most
  ``(‖a‖²‖b‖² + ⟨a, b⟩²)/p``: relative standard deviations ``√(2/p)`` on a squared norm and
  ``√((1+cos²)/p)`` on a cosine (2.2 % and 1.6–2.2 % for ``k = 4096``). A prime ``p`` keeps it
  even on gradients: consecutive elements (a bias, a LayerNorm, an embedding row) fall in
  distinct columns, and so do the entries of one column of a weight matrix, whose row length
  (a power of two, a multiple of 64) is coprime with ``p``;
- one pass over the problem (an elementwise product and a matrix–vector product per block of
  rows, in a fixed order: bitwise reproducible, and no host synchronisation).
"""

import functools
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ._absent import touched
from ._collectives import Collectives, all_gather_bytes, all_reduce_bytes
from ._device_path import to_device
from ._groups import OVERLAP, SKETCH, helper_group, is_helper
from ._kernels import Backend, fold_kernel, sketch_kernel
from ._linalg import Segment, objective_shards, partial_gramians, row_segments
from ._protocol import Exchange, ExchangeProtocol, Gradient, Request, checked_int
from ._runtime import Workspace
from .weightings import Weighting

#: ``BucketMOOState(sketch_size=None)`` with ``protocol="sketch"``.
DEFAULT_SKETCH_SIZE = 4096
#: Accepted ``sketch_size`` values: a sketch of 2²⁰ fp32 numbers is 4 MiB per objective and
#: problem, the size of the buckets it is meant to summarise.
SKETCH_SIZE_RANGE = (16, 1 << 20)
# The per-element sign table is generated in chunks of this many elements, chunk c from its own
# seed, so that element i has the same sign whatever the table's length.
_SIGN_CHUNK = 1 << 20
_SIGN_SEED = 0x5EED_B0C4
# A problem reads the table from an offset in [0, SIGN_OFFSETS) drawn per step and problem.
SIGN_OFFSETS = 1 << 20


def check_sketch_size(sketch_size: object, protocol: str) -> int | None:
    """``sketch_size`` as the state keeps it: an int for ``protocol="sketch"``, else ``None``."""
    if protocol != "sketch":
        if sketch_size is not None:
            raise ValueError(
                f"sketch_size applies to protocol='sketch' only, got sketch_size={sketch_size!r} "
                f"with protocol={protocol!r}"
            )
        return None
    if sketch_size is None:
        return DEFAULT_SKETCH_SIZE
    low, high = SKETCH_SIZE_RANGE
    sketch_size = checked_int(
        sketch_size, "sketch_size", "entries per objective in each problem's sketch"
    )
    if not low <= sketch_size <= high:
        raise ValueError(
            f"sketch_size must be in [{low}, {high}] (entries per objective in each problem's "
            f"sketch; default {DEFAULT_SKETCH_SIZE}), got {sketch_size}"
        )
    return sketch_size


@functools.cache
def fold_width(sketch_size: int) -> int:
    """``p``: the largest prime ``≤ sketch_size``, the number of columns a long problem folds
    into (4093 for 4096)."""
    for candidate in range(sketch_size, 1, -1):
        if all(candidate % d for d in range(2, math.isqrt(candidate) + 1)):
            return candidate
    raise ValueError(f"no prime ≤ {sketch_size}")


def sketch_width(numel: int, sketch_size: int) -> int:
    """Numbers in the sketch of a problem of ``numel`` elements (:func:`sketch`): ``numel`` up
    to ``sketch_size`` (kept as it is), else :func:`fold_width`."""
    return numel if numel <= sketch_size else fold_width(sketch_size)


def sketch_collective(
    num_objectives: int, world_size: int, width: int, parameters: int, element_size: int
) -> tuple[str, int]:
    """Step 2's collective for sketches of ``width`` numbers (all problems of a bucket) and
    ``parameters`` presence counts per rank, of ``element_size`` bytes each: whichever sends
    fewer bytes (the all-reduce on a tie), with the size ``n·b`` of the tensor it is about (as
    :mod:`._collectives` takes it): ``("all_reduce", bytes of the [L, width] rows and the
    [P, L] counts)`` or ``("all_gather", bytes of the [R, width + P] output)``. One rule for
    :func:`_exchange_sketches` and :mod:`.cost_model`."""
    reduced = (num_objectives * width + parameters * num_objectives) * element_size
    gathered = world_size * (width + parameters) * element_size
    if all_gather_bytes(gathered, world_size) < all_reduce_bytes(reduced, world_size):
        return "all_gather", gathered
    return "all_reduce", reduced


def problem_seed(step: int, bucket: int, problem: int) -> int:
    """The seed of the row signs ``ρ`` of one problem at one step: the same on every rank and
    in every run, different for every (step, bucket, problem)."""
    digest = hashlib.blake2b(f"{step},{bucket},{problem}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sign_offset(seed: int) -> int:
    """Where a problem's window of element signs starts in the :class:`SignTable`: bits 20–39
    of its seed (the row signs' generator reads the low 32 bits; together about 2⁴⁰ maps)."""
    return (seed >> 20) % SIGN_OFFSETS


def _random_signs(count: int, seed: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``count`` random ±1 from ``seed``, drawn on the CPU whatever ``device`` (the same map on
    every device, so the CPU reference reproduces a GPU run) and moved without synchronising."""
    generator = torch.Generator().manual_seed(seed)
    signs = (torch.randint(0, 2, (count,), generator=generator) * 2 - 1).to(dtype)
    return to_device(signs, device)


class SignTable:
    """A fixed table of random signs, per device and dtype, grown on demand; a problem's
    element signs ``σ`` are a window of it (:func:`sketch`).

    Entry ``i`` depends only on ``i``, not on how long the table is or on the device. Kept by
    the protocol of a state: one buffer of the longest problem's length plus 2²⁰ entries.
    """

    __slots__ = ("_tables",)

    def __init__(self) -> None:
        self._tables: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def take(self, numel: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        table = self._tables.get((device, dtype))
        if table is None or table.numel() < numel:
            chunks = -(-numel // _SIGN_CHUNK)
            table = torch.cat(
                [_random_signs(_SIGN_CHUNK, _SIGN_SEED + c, device, dtype) for c in range(chunks)]
            )
            self._tables[device, dtype] = table
        return table[:numel]


def sketch(
    vector: Tensor,
    sketch_size: int,
    seed: int,
    signs: SignTable,
    workspace: Workspace | None = None,
    backend: Backend | None = None,
) -> Tensor:
    """``Φ vector`` in fp32 (fp64 for fp64): ``vector`` itself if it has at most
    ``sketch_size`` elements, else its fold into :func:`fold_width` columns (module docstring).

    ``seed``: :func:`problem_seed` of the problem. ``workspace``: a CPU buffer for the blocks.
    ``backend``: fold in the fused CUDA kernel (:func:`._kernels.sketch_kernel`) instead.
    """
    compute = torch.promote_types(vector.dtype, torch.float32)
    numel = vector.numel()
    if numel <= sketch_size:
        return vector.to(compute)
    width = fold_width(sketch_size)
    full_rows, tail = divmod(numel, width)
    rows = full_rows + (tail > 0)
    row_signs = _random_signs(rows, seed, vector.device, compute)
    offset = sign_offset(seed)
    element_signs = signs.take(offset + numel, vector.device, compute)[offset:]
    if backend is not None:
        return fold_kernel(backend, vector, element_signs, row_signs, width)
    # Blocks of rows: 1 MiB (a cache's worth) on the CPU, 16 MiB elsewhere (few launches).
    block_rows = max(1, (1 << 18 if vector.device.type == "cpu" else 1 << 22) // width)
    if workspace is not None and vector.device.type == "cpu":
        buffer = workspace.take("sketch", block_rows * width, compute)
    else:
        buffer = vector.new_empty(min(block_rows, full_rows) * width, dtype=compute)
    folded = vector.new_zeros(width, dtype=compute)
    for low in range(0, full_rows, block_rows):
        high = min(full_rows, low + block_rows)
        span = slice(low * width, high * width)
        block = torch.mul(
            vector[span].view(-1, width),
            element_signs[span].view(-1, width),
            out=buffer[: (high - low) * width].view(-1, width),
        )
        folded.addmv_(block.T, row_signs[low:high])  # Σ_b ρ_b (σ ⊙ g)_b, rows in order
    if tail:
        span = slice(full_rows * width, numel)
        folded[:tail].add_(vector[span] * element_signs[span] * row_signs[-1])
    return folded


class SketchProtocol(ExchangeProtocol):
    """Sketched Gramians, then the engine's own reduction of the scaled gradients."""

    name = "sketch"

    def __init__(self, sketch_size: int = DEFAULT_SKETCH_SIZE) -> None:
        self.sketch_size = sketch_size
        self.signs = SignTable()

    def exchange(
        self, comm: Collectives, gradient: Gradient, averaging: Tensor, request: Request
    ) -> "SketchExchange":
        flat, world_size = gradient.flat, comm.world_size
        rank = comm.group.rank()
        parameters = row_segments(gradient.sizes)
        if gradient.rows:  # FSDP2: parameter p is columns [lo, hi) of every rank's chunk
            grid = flat.view(world_size, -1)
            pieces = [grid[:, lo:hi] for lo, hi in parameters]
        else:
            pieces = [flat[lo:hi] for lo, hi in parameters]
        vectors = [p.reshape(-1) for p in pieces] if request.per_parameter else [flat]
        bucket = request.bucket.index
        sketched = tuple(v.numel() > self.sketch_size for v in vectors)
        backend = sketch_kernel(request.kernels, flat) if any(sketched) else None
        sketches = [
            sketch(
                v,
                self.sketch_size,
                problem_seed(request.step, bucket, s),
                self.signs,
                request.workspace,
                backend,
            )
            for s, v in enumerate(vectors)
        ]
        own = torch.cat(sketches) if len(sketches) > 1 else sketches[0]
        segments = row_segments([s.numel() for s in sketches])
        column = averaging[:, rank]  # 1/m_ℓ at this rank's objective, 0 elsewhere
        members = (averaging != 0).to(own.dtype)  # [L, R]
        presence = None
        if request.presence:
            presence = torch.stack([touched(p) for p in pieces]).to(own.dtype)  # [P]
        small = comm
        if is_helper(comm.group, OVERLAP):
            # DDP's CPU buckets on the overlap worker: Y on a group of its own (the worker's
            # only), so that it does not wait for the earlier buckets' all-reduces.
            small = comm.over(helper_group(comm.group, SKETCH))
        gramians, counts = _exchange_sketches(
            comm, small, own, presence, averaging, column, members, segments
        )
        return SketchExchange(
            comm=comm,
            gradient=gradient,
            column=column,
            parameters=parameters,
            per_parameter=request.per_parameter,
            gramians=gramians,
            counts=counts,
            sketched=sketched,
        )


def _exchange_sketches(
    comm: Collectives,
    small: Collectives,
    own: Tensor,
    presence: Tensor | None,
    averaging: Tensor,
    column: Tensor,
    members: Tensor,
    segments: list[Segment],
) -> tuple[Tensor, Tensor | None]:
    """Step 2: ``Y`` from every rank's sketch ``own`` (and the presence counts from every
    rank's ``presence``), by whichever of all-reduce and all-gather sends fewer bytes, over
    ``small`` (``comm``'s ranks); the Gramians of ``Y``'s ``segments``. With ``comm.outer``
    (HSDP: each rank of the replicate group holds one shard of the unit), every shard's Gramians
    and counts are summed over ``outer``: the sum of the shards' sketches estimates the unit's."""
    num_objectives, world_size = averaging.shape
    width, parameters = own.numel(), 0 if presence is None else presence.numel()
    collective, _ = sketch_collective(
        num_objectives, world_size, width, parameters, own.element_size()
    )
    if collective == "all_gather":
        mine = own if presence is None else torch.cat([own, presence])
        rows = mine.new_empty(world_size, mine.numel())
        small.all_gather(rows.view(-1), mine).wait()
        sketches = objective_shards(rows[:, :width], averaging)  # Y = M S, exact
        counts = None if presence is None else rows[:, width:].T @ members.T  # [P, L]
    else:
        packed = torch.outer(column.to(own.dtype), own).reshape(-1)  # row ℓ(r): s_r / m_ℓ
        if presence is not None:
            packed = torch.cat(
                [packed, torch.outer(presence, members[:, comm.group.rank()]).reshape(-1)]
            )
        small.all_reduce(packed).wait()
        sketches = packed[: num_objectives * width].view(num_objectives, width)
        counts = None
        if presence is not None:
            counts = packed[num_objectives * width :].view(parameters, num_objectives)
    gramians = partial_gramians(sketches, segments)
    if comm.outer is not None:
        statistics = gramians.reshape(-1)
        if counts is not None:
            statistics = torch.cat([statistics, counts.reshape(-1)])
        comm.all_reduce_outer(statistics).wait()
        gramians = statistics[: gramians.numel()].view_as(gramians)
        if counts is not None:
            counts = statistics[gramians.numel() :].view_as(counts)
    return gramians, counts


@dataclass(eq=False, slots=True)
class SketchExchange(Exchange):
    """One bucket after phase 1 of :class:`SketchProtocol`: its estimated Gramians; phase 2
    scales the rank's own gradient and runs the engine's reduction."""

    comm: Collectives
    gradient: Gradient
    column: Tensor  # M[:, r]: α_r = wᵀ M[:, r]
    parameters: list[Segment]  # every parameter's segment of the flat (of a chunk, rows)
    per_parameter: bool
    gramians: Tensor
    counts: Tensor | None
    sketched: tuple[bool, ...]  # per problem: estimated (else exact)

    @property
    def held_bytes(self) -> int:
        return 0  # the engine's own buffer, scaled in place at the end

    def hold(self) -> None:
        pass  # nothing beyond the Gramians and the engine's buffer

    def combine(
        self, weighting: Weighting, weights: Tensor | None, parameter_weights: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        assert weights is not None
        column = self.column.to(weights.dtype)
        flat = self.gradient.flat
        if parameter_weights is None and not self.per_parameter:
            return weights, flat.mul_(weights[0] @ column)
        scales = (weights if parameter_weights is None else parameter_weights) @ column  # [P]
        _scale_parameters(flat, scales, self.parameters, self.comm.world_size, self.gradient)
        return weights, flat

    def deliver(self, combined: Tensor) -> torch.futures.Future[Tensor] | None:
        output = self.gradient.output
        if output is None:
            return self.comm.all_reduce(combined).get_future().then(lambda _: combined)
        self.comm.reduce_scatter(output, combined).wait()
        return None


def _scale_parameters(
    flat: Tensor,
    scales: Tensor,
    parameters: Sequence[Segment],
    world_size: int,
    gradient: Gradient,
) -> None:
    """Multiply every parameter's elements of ``flat`` by its scale, in place (one pass)."""
    length = parameters[-1][1] if parameters else 0
    # Views and one concatenation: no sizes tensor to copy to the device (a host sync on a GPU).
    pieces = zip(scales, parameters, strict=True)
    expanded = torch.cat([scale.expand(hi - lo) for scale, (lo, hi) in pieces])
    if gradient.rows:
        flat.view(world_size, -1)[:, :length].mul_(expanded)
    else:
        flat[:length].mul_(expanded)
