"""Alpha–beta cost model of the gradient reduction: bytes and time per rank per step.

Bytes are exact: what one rank sends under the bandwidth-optimal algorithm of each collective
that a method issues (ring all-reduce ``2(R−1)/R·n·b``; all-to-all, reduce-scatter and
all-gather ``(R−1)/R·n·b``), bucket by bucket, with the formulas the hooks count their own
traffic with (:mod:`._collectives`), which ``benchmarks/comm_overhead.py`` checks against gloo
(``tests/integration/test_comm_benchmark.py``). NCCL's ring and pairwise algorithms send the
same bytes.

Time is a model, for NCCL on GPU clusters of ``gpus_per_node`` GPUs joined by one NIC per GPU
(:class:`Cluster`, defaults: H100 SXM nodes, NVLink within a node, 400 Gb/s InfiniBand between
nodes). Every collective costs a latency term plus its bytes over the bottleneck link:

- ring all-reduce, reduce-scatter and all-gather: one latency per ring step; bandwidth NVLink's
  within a node and, across nodes, all the node's NICs together (NCCL runs one ring per NIC, so
  a node sends only ``(R−1)/R`` of the data across, whatever ``G``). An all-reduce costs the
  smaller of the ring and a tree (``2⌈log₂R⌉`` latencies, NCCL's choice for small messages).
- all-to-all: the ``G−1`` chunks for the own node go over NVLink while the ``R−G`` chunks for
  other nodes leave through the sender's own NIC, at the same time; one latency plus a per-peer
  overhead (one send/receive pair per peer). A node thus sends ``G·(R−G)/R`` of the data across,
  about ``G`` times a ring: equal bytes per rank, but across nodes the shard-Gramian protocol's
  all-to-all is bisection-bound where the reduce-scatter it replaces is not.
- the hook's compute runs at ``memory_bandwidth``: the fused CUDA kernels read the ``R×c``
  received slices twice (partial Gramian, then combination) and write the ``c`` combined ones.

The sketch protocol (``protocol="sketch"``, :mod:`._sketch`; methods ``bucket_moo_sketch`` and
``fsdp_moo_sketch``) sends per bucket one small collective, the sketch exchange (an all-reduce
of ``[L, K]`` rows plus ``L`` presence counts per parameter where they are counted, or an
all-gather of ``[R, K + P]``, whichever sends fewer bytes: :func:`._sketch.sketch_collective`;
``K`` sums the widths of the bucket's problems, ``n`` for a problem of ``n ≤ k`` elements, else
the fold's ``p``: :func:`._sketch.sketch_width`), then the engine's own all-reduce (DDP) or
reduce-scatter (FSDP) of the bucket: ring or tree, never the bisection-bound all-to-all. Its
compute, with the fused fold kernel (csrc/sketch.cu): one pass that reads the gradient and the
fp32 signs, and one that scales the gradient in place.

The hierarchical protocol (``protocol="hierarchical"``, :mod:`._hierarchical`; methods
``bucket_moo_hierarchical`` and ``fsdp_moo_hierarchical``) sends the shard protocol's exchange
in two levels: an all-to-all within the node over NVLink, an all-to-all of the node's ``L_k``
objective sums across nodes among the ranks with the same local index (one rank per node: each
rank's own NIC, all of a node's NICs at once), the Gramian all-reduce, and (DDP) the all-gather
across nodes, then within. ``objectives_per_node`` is ``L_k``: 1 when every node trains one
language (node-aligned), ``min(G, L)`` when every node holds ``G`` languages.

The collectives of one step run one after the other on the communication stream (DDP issues
buckets in order), so a step's communication time is their sum; how much of it backward hides
depends on the compute, which this model leaves out. Run ``python -m bucketmoo_hooks.cost_model``
for the table of 8–512 GPUs in the README.
"""

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ._collectives import (
    SENT_BYTES,
    all_gather_bytes,
    all_reduce_bytes,
    all_to_all_bytes,
    reduce_scatter_bytes,
)
from ._shard import shard_length
from ._sketch import DEFAULT_SKETCH_SIZE, sketch_collective, sketch_width

METHODS = (
    "allreduce",  # DDP allreduce_hook
    "bucket_moo",  # bucket_moo_hook, any granularity (global MOO sends the same bytes)
    "naive",  # all-gather every rank's bucket, solve locally
    "powersgd",  # torch's PowerSGD hook (needs the parameter shapes)
    "fsdp_reduce_scatter",  # FSDP's own reduce-scatter of a unit
    "fsdp_moo",  # the library's FSDP reduce-scatter
    "bucket_moo_sketch",  # bucket_moo_hook with protocol="sketch" (any granularity)
    "fsdp_moo_sketch",  # the library's FSDP reduce-scatter with protocol="sketch"
    "bucket_moo_hierarchical",  # bucket_moo_hook with protocol="hierarchical"
    "fsdp_moo_hierarchical",  # the library's FSDP reduce-scatter with protocol="hierarchical"
)
SKETCH_METHODS = ("bucket_moo_sketch", "fsdp_moo_sketch")
HIERARCHICAL_METHODS = ("bucket_moo_hierarchical", "fsdp_moo_hierarchical")
#: The methods of the library: they run the per-step objective exchange.
LIBRARY_METHODS = ("bucket_moo", "fsdp_moo", *SKETCH_METHODS, *HIERARCHICAL_METHODS)
# Which ranks a collective of the hierarchical protocol runs over.
NODE, ACROSS, ALL = "node", "across", "all"
# (step, config digest, objective key) as int64, all-gathered at the first bucket of a step.
EXCHANGE_BYTES = 3 * 8


def exchange_bytes(world_size: int) -> int:
    """The per-step objective exchange of the library's methods (an all-gather)."""
    return all_gather_bytes(world_size * EXCHANGE_BYTES, world_size)


def _powersgd_sizes(
    shapes: Sequence[Sequence[int]], rank: int, min_compression_rate: float
) -> tuple[int, int, int]:
    """Elements of the uncompressed tensors, of all ``P`` and of all ``Q`` in a bucket, as
    torch's ``powerSGD_hook`` splits it."""
    uncompressed = p_size = q_size = 0
    for shape in shapes:
        rows = shape[0] if shape else 1
        cols = math.prod(shape) // rows if rows else 0
        k = min(rows, cols, rank)
        if (rows + cols) * k * min_compression_rate < rows * cols:
            p_size, q_size = p_size + rows * k, q_size + cols * k
        else:
            uncompressed += rows * cols
    return uncompressed, p_size, q_size


def _sketch_calls(
    method: str,
    numel: int,
    world_size: int,
    num_objectives: int,
    element_size: int,
    parameters: int,
    sketch_size: int | None,
    problem_sizes: Sequence[int] | None,
) -> list[tuple[str, int]]:
    """The sketch methods' collectives of one bucket, in order, with the bytes one rank sends
    in each: the sketch exchange, then the engine's all-reduce or reduce-scatter (two
    all-reduces stay two calls: each pays its own latency)."""
    r, b = world_size, element_size
    k = DEFAULT_SKETCH_SIZE if sketch_size is None else sketch_size
    padded = r * shard_length(numel, r)
    if problem_sizes is None:
        problem_sizes = [padded if method == "fsdp_moo_sketch" else numel]
    width = sum(sketch_width(n, k) for n in problem_sizes)
    # Sketches and counts in fp32 (fp64 for fp64 gradients), as the Gramians.
    collective, size = sketch_collective(num_objectives, r, width, parameters, max(4, b))
    engine = (
        ("reduce_scatter", reduce_scatter_bytes(padded * b, r))
        if method == "fsdp_moo_sketch"
        else ("all_reduce", all_reduce_bytes(numel * b, r))
    )
    return [(collective, SENT_BYTES[collective](size, r)), engine]


def _hierarchical_calls(
    method: str,
    numel: int,
    world_size: int,
    element_size: int,
    gramian: int,
    ranks_per_node: int,
    objectives_per_node: int,
) -> list[tuple[str, int, str]]:
    """The hierarchical methods' collectives of one bucket, in order: ``(collective, bytes one
    rank sends, the ranks it runs over: NODE, ACROSS or ALL)``; ``gramian``: the Gramian
    all-reduce's bytes. One node or one rank per node: the shard protocol's collectives."""
    r, g, b = world_size, ranks_per_node, element_size
    if r % g:
        raise ValueError(f"ranks_per_node={g} does not divide world_size={r}")
    c, nodes = shard_length(numel, r), r // g
    gather = method == "bucket_moo_hierarchical"
    if g in (1, r):
        flat = [("all_to_all", all_to_all_bytes(r * c * b, r), ALL), ("all_reduce", gramian, ALL)]
        return flat + ([("all_gather", all_gather_bytes(r * c * b, r), ALL)] if gather else [])
    calls = [
        ("all_to_all", all_to_all_bytes(r * c * b, g), NODE),
        ("all_to_all", all_to_all_bytes(nodes * objectives_per_node * c * b, nodes), ACROSS),
        ("all_reduce", gramian, ALL),
    ]
    if gather:
        calls += [
            ("all_gather", all_gather_bytes(nodes * c * b, nodes), ACROSS),
            ("all_gather", all_gather_bytes(r * c * b, g), NODE),
        ]
    return calls


def bucket_bytes(
    method: str,
    numel: int,
    world_size: int,
    num_objectives: int,
    element_size: int = 4,
    *,
    shapes: Sequence[Sequence[int]] | None = None,
    problems: int = 1,
    parameters: int = 0,
    powersgd_rank: int = 1,
    min_compression_rate: float = 2.0,
    sketch_size: int | None = None,
    problem_sizes: Sequence[int] | None = None,
    ranks_per_node: int = 8,
    objectives_per_node: int = 1,
) -> dict[str, int]:
    """Bytes one rank sends for one bucket (a DDP bucket, or an FSDP unit of ``numel`` elements
    padded to ``R·c``), by collective.

    Args:
        problems: Weight vectors per bucket: 1, or the number of parameters for
            ``granularity="parameter"`` (``problems·L²`` Gramian numbers). The sketch methods
            take ``problem_sizes`` instead.
        parameters: Parameters whose objectives' presence is counted (``L`` numbers each, in
            the Gramian all-reduce, or the sketch exchange): the bucket's parameters where
            objectives may be absent (FSDP, DDP with ``find_unused_parameters``), else 0.
        shapes: The bucket's parameter shapes (``method="powersgd"`` only).
        sketch_size: ``k`` of the sketch methods (default ``_sketch.DEFAULT_SKETCH_SIZE``).
        problem_sizes: The sketch methods' problems, elements each, as the hook sketches them:
            default the whole bucket (DDP: ``numel``; FSDP: the padded ``R·c`` reduce-scatter
            input); with ``granularity="parameter"`` one per parameter (FSDP2: ``R`` times the
            parameter's padded shard).
        ranks_per_node: ``G`` of the hierarchical methods (it must divide ``world_size``).
        objectives_per_node: ``L_k`` of the hierarchical methods: the objectives this rank's
            node trains.
    """
    r, b = world_size, element_size
    c = shard_length(numel, r)
    # fp64 buckets keep an fp64 Gramian; everything narrower accumulates in fp32.
    numbers = problems * num_objectives**2 + parameters * num_objectives
    gramian = all_reduce_bytes(numbers * max(4, b), r)
    padded = r * c * b  # the bucket padded to R slices of c
    if method == "allreduce":
        return {"all_reduce": all_reduce_bytes(numel * b, r)}
    if method == "bucket_moo":
        return {
            "all_to_all": all_to_all_bytes(padded, r),
            "all_reduce": gramian,
            "all_gather": all_gather_bytes(padded, r),
        }
    if method == "naive":  # every rank gathers every rank's whole bucket
        return {"all_gather": all_gather_bytes(r * numel * b, r)}
    if method == "fsdp_reduce_scatter":
        return {"reduce_scatter": reduce_scatter_bytes(padded, r)}
    if method == "fsdp_moo":
        return {"all_to_all": all_to_all_bytes(padded, r), "all_reduce": gramian}
    if method in SKETCH_METHODS:
        if problems != 1:
            raise ValueError(f"method={method!r} takes problem_sizes, not problems")
        sent: dict[str, int] = {}
        calls = _sketch_calls(
            method, numel, r, num_objectives, b, parameters, sketch_size, problem_sizes
        )
        for collective, nbytes in calls:
            sent[collective] = sent.get(collective, 0) + nbytes
        return sent
    if method in HIERARCHICAL_METHODS:
        calls = _hierarchical_calls(
            method, numel, r, b, gramian, ranks_per_node, objectives_per_node
        )
        hierarchical: dict[str, int] = {}
        for collective, nbytes, _ in calls:
            hierarchical[collective] = hierarchical.get(collective, 0) + nbytes
        return hierarchical
    if method == "powersgd":
        if shapes is None:
            raise ValueError("method='powersgd' needs the bucket's parameter shapes")
        sizes = _powersgd_sizes(shapes, powersgd_rank, min_compression_rate)
        return {"all_reduce": sum(all_reduce_bytes(n * b, r) for n in sizes)}
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def step_bytes(
    method: str,
    buckets: Sequence[int],
    world_size: int,
    num_objectives: int,
    element_size: int = 4,
    *,
    shapes: Sequence[Sequence[Sequence[int]]] | None = None,
    parameters: Sequence[int] | None = None,
    sketch_size: int | None = None,
    problem_sizes: Sequence[Sequence[int]] | None = None,
) -> dict[str, int]:
    """Bytes one rank sends in one step over ``buckets`` (their element counts), by collective,
    including the per-step objective exchange of the library's methods (an all-gather).
    ``parameters``, ``problem_sizes``: per bucket, as :func:`bucket_bytes`'s."""
    total: dict[str, int] = {}
    for i, numel in enumerate(buckets):
        extra: dict[str, Any] = {"shapes": shapes[i]} if shapes is not None else {}
        if parameters is not None:
            extra["parameters"] = parameters[i]
        if problem_sizes is not None:
            extra["problem_sizes"] = problem_sizes[i]
        if sketch_size is not None:
            extra["sketch_size"] = sketch_size
        sent = bucket_bytes(method, numel, world_size, num_objectives, element_size, **extra)
        for collective, nbytes in sent.items():
            total[collective] = total.get(collective, 0) + nbytes
    if method in LIBRARY_METHODS:
        total["all_gather"] = total.get("all_gather", 0) + exchange_bytes(world_size)
    return total


@dataclass(frozen=True)
class Cluster:
    """Link parameters of a GPU cluster (defaults: H100 SXM nodes, NDR InfiniBand).

    Attributes:
        gpus_per_node: GPUs sharing NVLink.
        intra_bandwidth: Bytes/s one GPU sends over NVLink (NCCL bus bandwidth).
        inter_bandwidth: Bytes/s one GPU sends over its NIC (400 Gb/s at ~90 %).
        intra_latency: Seconds per ring step within a node.
        inter_latency: Seconds per ring step across nodes.
        peer_overhead: Seconds per peer of an all-to-all (one send/receive pair each).
        memory_bandwidth: Bytes/s of GPU memory, for the hook's compute.
    """

    gpus_per_node: int = 8
    intra_bandwidth: float = 360e9
    inter_bandwidth: float = 45e9
    intra_latency: float = 2e-6
    inter_latency: float = 5e-6
    peer_overhead: float = 1e-6
    memory_bandwidth: float = 3.0e12

    def describe(self) -> str:
        return (
            f"{self.gpus_per_node} GPUs per node, NVLink {self.intra_bandwidth / 1e9:g} GB/s, "
            f"NIC {self.inter_bandwidth / 1e9:g} GB/s per GPU, ring step "
            f"{self.intra_latency * 1e6:g}/{self.inter_latency * 1e6:g} µs within/across nodes, "
            f"{self.peer_overhead * 1e6:g} µs per all-to-all peer, "
            f"memory {self.memory_bandwidth / 1e12:g} TB/s"
        )

    def _ring(self, world_size: int) -> tuple[float, float]:
        """(latency per step, bandwidth per GPU) of NCCL's rings over ``world_size`` GPUs.

        Across nodes NCCL runs one ring per NIC (rail), each carrying its share of the data, so a
        ring's bandwidth is the node's NICs together, ``gpus_per_node × inter_bandwidth``, up to
        NVLink's."""
        if world_size <= self.gpus_per_node:
            return self.intra_latency, self.intra_bandwidth
        node_bandwidth = self.gpus_per_node * self.inter_bandwidth
        return self.inter_latency, min(self.intra_bandwidth, node_bandwidth)

    def collective_time(
        self, collective: str, nbytes: int, world_size: int, across_nodes: bool = False
    ) -> float:
        """Seconds for one collective in which each rank sends ``nbytes`` (as :func:`bucket_bytes`
        counts them) over ``world_size`` ranks: consecutive ranks of nodes of
        ``gpus_per_node``, or with ``across_nodes`` one rank per node (the hierarchical
        protocol's level across nodes: every rank through its own NIC, the node's ranks at
        once, each over its own rail)."""
        r = world_size
        if r == 1 or nbytes == 0:
            return 0.0
        if across_nodes:
            if collective == "all_to_all":
                latency = self.inter_latency + (r - 1) * self.peer_overhead
                return latency + nbytes / self.inter_bandwidth
            return (r - 1) * self.inter_latency + nbytes / self.inter_bandwidth
        latency, bandwidth = self._ring(r)
        if collective == "all_reduce":
            ring = 2 * (r - 1) * latency + nbytes / bandwidth
            tree = 2 * math.ceil(math.log2(r)) * latency + nbytes / bandwidth
            return min(ring, tree)
        if collective in ("all_gather", "reduce_scatter"):
            return (r - 1) * latency + nbytes / bandwidth
        if collective == "all_to_all":
            # Every chunk for another node leaves through the sender's own NIC: no ring can
            # share it out, so across nodes the all-to-all runs at one NIC's bandwidth.
            local = min(r, self.gpus_per_node)
            chunk = nbytes / (r - 1)
            over_nvlink = (local - 1) * chunk / self.intra_bandwidth
            over_nic = (r - local) * chunk / self.inter_bandwidth
            return latency + (r - 1) * self.peer_overhead + max(over_nvlink, over_nic)
        raise ValueError(f"unknown collective {collective!r}")

    def cross_node_bytes(
        self, collective: str, nbytes: int, world_size: int, across_nodes: bool = False
    ) -> float:
        """Of the ``nbytes`` a rank sends in a collective, those that leave its node, on average
        over the node's ranks, as NCCL routes them: a ring crosses between nodes once per node
        (rings spread over the node's NICs: ``1/G`` of each rank's bytes); an all-to-all sends
        the chunks for the ``R−G`` ranks elsewhere straight there; a collective with one rank
        per node (``across_nodes``) sends everything across."""
        g = self.gpus_per_node
        if across_nodes:
            return float(nbytes)
        if world_size <= g:
            return 0.0
        if collective == "all_to_all":
            return nbytes * (world_size - g) / (world_size - 1)
        return nbytes / g


@dataclass(frozen=True)
class Prediction:
    """One method's predicted communication per rank per step.

    Attributes:
        bytes: By collective.
        comm_time: Seconds of collectives (serial on the communication stream).
        compute_time: Seconds of the hook's own compute (memory-bound passes).
        cross_node_bytes: Of ``bytes``, those that leave the rank's node, on average over the
            node's ranks (:meth:`Cluster.cross_node_bytes`).
        held_bytes: What global MOO holds until the last bucket: per bucket the smaller of
            ``A_j`` (``L·c`` fp32) and the received slices the fused kernels read (``R·c·b``).
    """

    method: str
    world_size: int
    bytes: dict[str, int] = field(default_factory=dict)
    comm_time: float = 0.0
    compute_time: float = 0.0
    held_bytes: int = 0
    cross_node_bytes: float = 0.0

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    @property
    def time(self) -> float:
        return self.comm_time + self.compute_time


def ddp_buckets(parameters: int, bucket_cap_mb: float = 25.0, element_size: int = 4) -> list[int]:
    """DDP's bucket sizes for a model of ``parameters`` elements: the first bucket is capped at
    ~1 MiB, as DDP does when ``bucket_cap_mb`` is left at its default (docs/design.md §3), the
    rest at ``bucket_cap_mb``."""
    first = min(parameters, 2**20 // element_size)
    cap = int(bucket_cap_mb * 2**20) // element_size
    rest = parameters - first
    return [first] + [cap] * (rest // cap) + ([rest % cap] if rest % cap else [])


def predict(
    method: str,
    buckets: Sequence[int],
    world_size: int,
    num_objectives: int,
    cluster: Cluster | None = None,
    element_size: int = 2,
    sketch_size: int | None = None,
    objectives_per_node: int = 1,
) -> Prediction:
    """Bytes and time of one step of ``method`` over ``buckets`` (element counts) on
    ``world_size`` GPUs training ``num_objectives`` languages (default: bf16 gradients).
    ``powersgd`` is not predicted here (its bytes depend on the parameter shapes). The
    hierarchical methods run on nodes of ``cluster.gpus_per_node`` with ``objectives_per_node``
    languages on each (``L_k``)."""
    if method == "powersgd":
        raise ValueError("predict() covers the methods without shapes; use bucket_bytes")
    cluster = cluster or Cluster()
    comm = compute = cross = 0.0
    held = 0
    total: dict[str, int] = {}
    k = DEFAULT_SKETCH_SIZE if sketch_size is None else sketch_size
    g = min(cluster.gpus_per_node, world_size)
    levels = {NODE: (g, False), ACROSS: (world_size // g, True), ALL: (world_size, False)}
    for numel in buckets:
        c = shard_length(numel, world_size)
        if method in SKETCH_METHODS:
            sketched = _sketch_calls(
                method, numel, world_size, num_objectives, element_size, 0, k, None
            )
            calls = [(collective, nbytes, ALL) for collective, nbytes in sketched]
        elif method in HIERARCHICAL_METHODS:
            gramian = all_reduce_bytes(num_objectives**2 * max(4, element_size), world_size)
            calls = _hierarchical_calls(
                method, numel, world_size, element_size, gramian, g, objectives_per_node
            )
        else:
            sent = bucket_bytes(method, numel, world_size, num_objectives, element_size)
            calls = [(collective, nbytes, ALL) for collective, nbytes in sent.items()]
        for collective, nbytes, level in calls:
            total[collective] = total.get(collective, 0) + nbytes
            ranks, across = levels[level]
            comm += cluster.collective_time(collective, nbytes, ranks, across)
            cross += cluster.cross_node_bytes(collective, nbytes, ranks, across)
        # One node, or one rank per node: the hierarchical exchange is the flat one.
        flat = method in ("bucket_moo", "fsdp_moo")
        if method in HIERARCHICAL_METHODS and g in (1, world_size):
            flat = True
        if flat:
            # The fused kernels read the received R×c slices twice (Gramian, then combination).
            compute += (2 * world_size + 1) * c * element_size / cluster.memory_bandwidth
            held += c * min(4 * num_objectives, world_size * element_size)
        elif method in HIERARCHICAL_METHODS:  # two levels
            # The node sums read the R·c received elements and write N·L_k·c fp32 ones; the
            # fused kernels read the N·L_k·c rows that arrive twice and write the c combined.
            rows = world_size // g * objectives_per_node
            passes = (world_size + 2 * rows + 1) * element_size + 4 * rows
            compute += passes * c / cluster.memory_bandwidth
            held += c * min(4 * num_objectives, rows * element_size)
        elif method == "naive":  # the same on every rank, over the whole bucket
            compute += (2 * world_size + 1) * numel * element_size / cluster.memory_bandwidth
        elif method in SKETCH_METHODS:
            # Every rank sketches its whole gradient (FSDP: the padded R·c input): the fused
            # fold reads it and the fp32 signs (a problem of at most k elements: one fp32
            # copy); then the scaling reads and writes it.
            n = world_size * c if method == "fsdp_moo_sketch" else numel
            compute += (n * (element_size + 4) + 2 * n * element_size) / cluster.memory_bandwidth
    if method in LIBRARY_METHODS:
        exchange = exchange_bytes(world_size)
        total["all_gather"] = total.get("all_gather", 0) + exchange
        comm += cluster.collective_time("all_gather", exchange, world_size)
        cross += cluster.cross_node_bytes("all_gather", exchange, world_size)
    holds = method in ("bucket_moo", "bucket_moo_hierarchical")
    return Prediction(method, world_size, total, comm, compute, held if holds else 0, cross)


def table(
    parameters: int,
    num_objectives: int,
    world_sizes: Sequence[int],
    cluster: Cluster | None = None,
    bucket_cap_mb: float = 25.0,
    sketch_size: int = DEFAULT_SKETCH_SIZE,
    across_nodes: bool = False,
) -> str:
    """Markdown: DDP and FSDP, per world size, predicted bytes and time and their ratios (the
    sketch protocol's at ``sketch_size``); with ``across_nodes``, what leaves each node and the
    time of every exchange protocol, the hierarchical one with node-aligned languages and with
    ``G`` on every node (:func:`_node_table`)."""
    cluster = cluster or Cluster()
    buckets = ddp_buckets(parameters, bucket_cap_mb, element_size=2)
    if across_nodes:
        return _node_table(buckets, num_objectives, world_sizes, cluster, sketch_size)
    lines = [
        f"{parameters / 1e9:g}B parameters, bf16 gradients, {len(buckets)} buckets of ≤ "
        f"{bucket_cap_mb:g} MiB (FSDP: units of the same sizes), L = {num_objectives}, sketch "
        f"k = {sketch_size}; {cluster.describe()}",
        "",
        "| GPUs | all-reduce GiB | ms | bucket MOO × bytes | × time | sketch × bytes | × time "
        "| naive × bytes | × time | FSDP RS ms | FSDP MOO × time | FSDP sketch × time "
        "| global MOO held GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in world_sizes:
        base = predict("allreduce", buckets, r, num_objectives, cluster)
        moo = predict("bucket_moo", buckets, r, num_objectives, cluster)
        sketch = predict("bucket_moo_sketch", buckets, r, num_objectives, cluster, 2, sketch_size)
        naive = predict("naive", buckets, r, num_objectives, cluster)
        rs = predict("fsdp_reduce_scatter", buckets, r, num_objectives, cluster)
        fsdp = predict("fsdp_moo", buckets, r, num_objectives, cluster)
        fsdp_sketch = predict(
            "fsdp_moo_sketch", buckets, r, num_objectives, cluster, 2, sketch_size
        )
        lines.append(
            f"| {r} | {base.total_bytes / 2**30:.2f} | {1e3 * base.time:.1f} | "
            f"{moo.total_bytes / base.total_bytes:.4f} | {moo.time / base.time:.2f} | "
            f"{sketch.total_bytes / base.total_bytes:.4f} | {sketch.time / base.time:.2f} | "
            f"{naive.total_bytes / base.total_bytes:.1f} | {naive.time / base.time:.1f} | "
            f"{1e3 * rs.time:.1f} | {fsdp.time / rs.time:.2f} | {fsdp_sketch.time / rs.time:.2f} | "
            f"{moo.held_bytes / 2**30:.2f} |"
        )
    return "\n".join(lines) + "\n"


def _node_table(
    buckets: list[int],
    num_objectives: int,
    world_sizes: Sequence[int],
    cluster: Cluster,
    sketch_size: int,
) -> str:
    """Markdown: what crosses the network per node and step, and the time against the
    all-reduce, for the all-reduce, the flat shard protocol, the sketch and the hierarchical
    protocol with node-aligned languages (``L_k = 1``) and with ``G`` languages on every node."""
    g = cluster.gpus_per_node
    mixed = min(g, num_objectives)
    lines = [
        f"Across nodes: GiB leaving each node per step, and time × the all-reduce's; hier. 1: "
        f"every node trains one language (L_k = 1), hier. {mixed}: {mixed} languages on every "
        f"node (L_k = {mixed}); {g} GPUs per node, L = {num_objectives}, sketch k = "
        f"{sketch_size}",
        "",
        "| GPUs | all-reduce GiB | flat GiB | hier. 1 GiB | hier. "
        f"{mixed} GiB | all-reduce ms | flat × time | sketch × time | hier. 1 × time "
        f"| hier. {mixed} × time | FSDP hier. 1 × time (vs reduce-scatter) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in world_sizes:
        if r % g and r > g:
            raise ValueError(f"{r} GPUs are not whole nodes of {g}")
        base = predict("allreduce", buckets, r, num_objectives, cluster)
        flat = predict("bucket_moo", buckets, r, num_objectives, cluster)
        sketch = predict("bucket_moo_sketch", buckets, r, num_objectives, cluster, 2, sketch_size)
        aligned, several = (
            predict("bucket_moo_hierarchical", buckets, r, num_objectives, cluster, 2, None, lk)
            for lk in (1, mixed)
        )
        rs = predict("fsdp_reduce_scatter", buckets, r, num_objectives, cluster)
        fsdp = predict("fsdp_moo_hierarchical", buckets, r, num_objectives, cluster, 2, None, 1)
        per_node = [min(g, r) * p.cross_node_bytes / 2**30 for p in (base, flat, aligned, several)]
        lines.append(
            f"| {r} | "
            + " | ".join(f"{x:.2f}" for x in per_node)
            + f" | {1e3 * base.time:.1f} | "
            + " | ".join(f"{p.time / base.time:.2f}" for p in (flat, sketch, aligned, several))
            + f" | {fsdp.time / rs.time:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description="Predicted communication cost on NCCL clusters")
    parser.add_argument("--parameters", type=float, default=1e9)
    parser.add_argument("--objectives", type=int, default=8)
    parser.add_argument("--gpus", default="8,16,32,64,128,256,512")
    parser.add_argument("--bucket-cap-mb", type=float, default=25.0)
    parser.add_argument("--sketch-size", type=int, default=DEFAULT_SKETCH_SIZE)
    args = parser.parse_args()
    world_sizes = [int(g) for g in args.gpus.split(",")]
    for across_nodes in (False, True):
        print(
            table(
                int(args.parameters),
                args.objectives,
                world_sizes,
                None,
                args.bucket_cap_mb,
                args.sketch_size,
                across_nodes,
            )
        )


if __name__ == "__main__":
    main()
