"""The alpha–beta cost model: byte formulas, DDP's bucket sizes, and the time model's shape.

Its byte counts are checked against gloo measurements in
``tests/integration/test_comm_benchmark.py``, and the sketch protocol's against the hook's own
ledger on 4 gloo ranks (DDP and FSDP2, every path of the sketch exchange) here.
"""

from typing import Any

import pytest
import torch
from _cost_model_workers import SketchCase, sketch_ledgers
from _distributed import shared_spawn
from _hierarchical_checks import flat_links, hierarchical_bytes

from bucketmoo_hooks import cost_model
from bucketmoo_hooks._collectives import SENT_BYTES, all_gather_bytes, all_reduce_bytes
from bucketmoo_hooks._sketch import (
    DEFAULT_SKETCH_SIZE,
    SignTable,
    fold_width,
    sketch,
    sketch_collective,
    sketch_width,
)
from bucketmoo_hooks.cost_model import Cluster, bucket_bytes, ddp_buckets, predict, step_bytes


@pytest.mark.parametrize("world_size", [2, 3, 8, 64, 512])
def test_bucket_moo_sends_an_all_reduce_plus_the_gramian(world_size: int) -> None:
    numel, objectives = 25 * 2**20 // 2, 8
    moo = bucket_bytes("bucket_moo", numel, world_size, objectives, element_size=2)
    allreduce = bucket_bytes("allreduce", numel, world_size, objectives, element_size=2)
    gramian = all_reduce_bytes(objectives**2 * 4, world_size)
    assert moo["all_reduce"] == gramian
    slices = moo["all_to_all"] + moo["all_gather"]
    assert (
        allreduce["all_reduce"] <= slices <= 1.0001 * allreduce["all_reduce"] + 2 * world_size * 2
    )
    assert bucket_bytes("fsdp_moo", numel, world_size, objectives, 2) == {
        "all_to_all": moo["all_to_all"],
        "all_reduce": gramian,
    }
    assert (
        moo["all_to_all"]
        == bucket_bytes("fsdp_reduce_scatter", numel, world_size, 8, 2)["reduce_scatter"]
    )


@pytest.mark.parametrize("world_size", [2, 4, 8, 512])
def test_naive_sends_r_over_two_all_reduces(world_size: int) -> None:
    numel = 1024 * 1024
    naive = bucket_bytes("naive", numel, world_size, 4)["all_gather"]
    assert naive == pytest.approx(
        world_size / 2 * bucket_bytes("allreduce", numel, world_size, 4)["all_reduce"]
    )


def test_padding_and_wide_gramians() -> None:
    # n = 10 on R = 4: c = 3, the bucket is padded to 12 elements.
    assert bucket_bytes("bucket_moo", 10, 4, 2)["all_to_all"] == 3 * 3 * 4
    # fp64 buckets all-reduce an fp64 Gramian; one L×L problem per parameter when asked.
    assert bucket_bytes("bucket_moo", 10, 4, 2, 8)["all_reduce"] == 2 * 3 * (4 * 8) // 4
    assert bucket_bytes("bucket_moo", 10, 4, 2, problems=5)["all_reduce"] == 2 * 3 * (20 * 4) // 4


def test_powersgd_compresses_matrices_only() -> None:
    # 512×512 at rank 1: P and Q of 512 each; the bias (and a matrix too thin to gain 2×) stay.
    shapes = [[512, 512], [512], [3, 4]]
    sent = bucket_bytes("powersgd", 512 * 512 + 512 + 12, 2, 2, shapes=shapes)
    assert sent == {"all_reduce": (512 + 12) * 4 + 512 * 4 + 512 * 4}
    with pytest.raises(ValueError, match="needs the bucket's parameter shapes"):
        bucket_bytes("powersgd", 10, 2, 2)


def test_step_bytes_add_the_objective_exchange() -> None:
    buckets = [100, 37]
    moo = step_bytes("bucket_moo", buckets, 3, 3)
    per_bucket = [bucket_bytes("bucket_moo", n, 3, 3) for n in buckets]
    assert moo["all_to_all"] == sum(b["all_to_all"] for b in per_bucket)
    assert moo["all_gather"] == sum(b["all_gather"] for b in per_bucket) + 2 * 24
    assert step_bytes("allreduce", buckets, 3, 3) == {
        "all_reduce": 2 * 2 * 400 // 3 + 2 * 2 * 148 // 3
    }
    with pytest.raises(ValueError, match="method must be one of"):
        step_bytes("allgather", buckets, 3, 3)


def test_ddp_buckets() -> None:
    buckets = ddp_buckets(10**9, 25.0, element_size=2)
    assert sum(buckets) == 10**9
    assert buckets[0] == 2**19  # the first bucket is capped at 1 MiB
    assert max(buckets) == 25 * 2**19
    assert ddp_buckets(1000) == [1000]


def test_time_model_within_a_node_and_across_nodes() -> None:
    cluster = Cluster()
    size = 2**30  # large messages: bandwidth-bound
    within = {c: cluster.collective_time(c, size, 8) for c in ("all_to_all", "reduce_scatter")}
    assert within["all_to_all"] == pytest.approx(within["reduce_scatter"], rel=0.01)
    # Across nodes the ring shares its traffic over every NIC of the node; the all-to-all's
    # chunks for other nodes each leave through the sender's own NIC: about G times slower.
    across = {c: cluster.collective_time(c, size, 64) for c in ("all_to_all", "reduce_scatter")}
    ratio = across["all_to_all"] / across["reduce_scatter"]
    assert 0.8 * cluster.gpus_per_node <= ratio <= cluster.gpus_per_node
    # Small messages: latency-bound; the all-reduce takes the tree, O(log R) steps.
    tiny = cluster.collective_time("all_reduce", 256, 512)
    assert tiny == pytest.approx(2 * 9 * cluster.inter_latency + 256 / (8 * 45e9))
    assert cluster.collective_time("all_gather", 0, 8) == 0.0


def test_predict_and_table() -> None:
    buckets = ddp_buckets(10**8, element_size=2)
    moo = predict("bucket_moo", buckets, 16, 8)
    base = predict("allreduce", buckets, 16, 8)
    assert moo.total_bytes == pytest.approx(base.total_bytes, rel=1e-3)
    assert moo.held_bytes == sum(8 * -(-n // 16) * 4 for n in buckets)
    assert moo.compute_time > 0 == base.compute_time
    assert moo.time > base.time  # across 2 nodes the all-to-all is bisection-bound
    table = cost_model.table(10**9, 8, [8, 64, 512])
    assert table.count("\n| ") == 4  # header + 3 rows
    assert all(line.count("|") == 14 for line in table.splitlines()[2:])
    assert "sketch × bytes" in table and "FSDP sketch × time" in table
    with pytest.raises(ValueError, match="without shapes"):
        predict("powersgd", buckets, 8, 8)


# -- the hierarchical protocol ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("world_size", "ranks_per_node", "objectives_per_node"),
    [(4, 2, 1), (4, 2, 2), (6, 3, 2), (6, 2, 1), (8, 4, 3), (512, 8, 1), (512, 8, 8)],
)
def test_hierarchical_bytes_are_the_protocols(
    world_size: int, ranks_per_node: int, objectives_per_node: int
) -> None:
    """The cost model's bytes equal the protocol's description (the formulas the DDP and FSDP
    tests hold the hook's ledger to), by collective; and never more than the flat protocol's."""
    numel, objectives, b = 25 * 2**20 // 2 + 7, 8, 2
    numbers = objectives**2 + 3 * objectives
    for method, all_reduce in (("bucket_moo_hierarchical", True), ("fsdp_moo_hierarchical", False)):
        sent = bucket_bytes(
            method,
            numel,
            world_size,
            objectives,
            b,
            parameters=3,
            ranks_per_node=ranks_per_node,
            objectives_per_node=objectives_per_node,
        )
        expected, _ = hierarchical_bytes(
            numel, b, world_size, ranks_per_node, objectives_per_node, numbers, all_reduce
        )
        assert sent == expected
    # Across nodes never more than the flat protocol (which splits by peer pairs), and with
    # node-aligned languages the flat protocol's bytes in all.
    flat = bucket_bytes("bucket_moo", numel, world_size, objectives, b, parameters=3)
    sent, links = hierarchical_bytes(
        numel, b, world_size, ranks_per_node, objectives_per_node, numbers, True
    )
    assert links["cross_node"] <= flat_links(flat, world_size, ranks_per_node)["cross_node"]
    if objectives_per_node == 1:
        assert sum(sent.values()) == sum(flat.values())
    # One node or one rank per node: the flat exchange.
    for one_level in (1, world_size):
        assert bucket_bytes(
            "bucket_moo_hierarchical", numel, world_size, 8, b, ranks_per_node=one_level
        ) == bucket_bytes("bucket_moo", numel, world_size, 8, b)
    with pytest.raises(ValueError, match="ranks_per_node=3 does not divide world_size=4"):
        bucket_bytes("fsdp_moo_hierarchical", numel, 4, 8, ranks_per_node=3)


@pytest.mark.parametrize("world_size", [16, 64, 512])
def test_hierarchical_cross_node_bytes_and_time(world_size: int) -> None:
    """Node-aligned languages: what leaves a node is at most a ring all-reduce's (``2(N−1)/N``
    of the bucket against ``2(R−1)/R``), a fraction of the flat all-to-all's; with ``G``
    languages on every node, never more than the flat protocol's. Faster than the flat
    protocol with node-aligned languages."""
    cluster = Cluster()
    g, buckets = cluster.gpus_per_node, ddp_buckets(10**9, element_size=2)
    nodes = world_size // g
    ring = predict("allreduce", buckets, world_size, 8)
    flat = predict("bucket_moo", buckets, world_size, 8)
    aligned = predict("bucket_moo_hierarchical", buckets, world_size, 8, objectives_per_node=1)
    mixed = predict("bucket_moo_hierarchical", buckets, world_size, 8, objectives_per_node=g)
    padded = sum(world_size * -(-n // world_size) for n in buckets) * 2
    # Per node: L_k = 1 sends 2·c·(N−1) per rank, G ranks: 2(N−1)/N of the (padded) model.
    assert g * aligned.cross_node_bytes == pytest.approx(2 * (nodes - 1) / nodes * padded, rel=1e-3)
    assert aligned.cross_node_bytes <= ring.cross_node_bytes
    assert ring.cross_node_bytes == pytest.approx(
        2 * (world_size - 1) / world_size * padded / g, rel=1e-3
    )
    assert mixed.cross_node_bytes <= flat.cross_node_bytes
    assert aligned.time < flat.time
    assert aligned.total_bytes == pytest.approx(flat.total_bytes, rel=1e-3)


def test_node_table() -> None:
    table = cost_model.table(10**9, 8, [8, 16, 64, 512], across_nodes=True)
    assert table.count("\n| ") == 5  # header + 4 rows
    assert all(line.count("|") == 12 for line in table.splitlines()[2:])
    assert "hier. 1 × time" in table and "hier. 8 × time" in table
    with pytest.raises(ValueError, match="12 GPUs are not whole nodes of 8"):
        cost_model.table(10**9, 8, [12], across_nodes=True)


def test_time_across_nodes_is_one_nic_per_rank() -> None:
    cluster = Cluster()
    size = 2**30
    across = cluster.collective_time("all_gather", size, 4, across_nodes=True)
    assert across == pytest.approx(3 * cluster.inter_latency + size / cluster.inter_bandwidth)
    assert cluster.cross_node_bytes("all_gather", size, 4, across_nodes=True) == size
    assert cluster.cross_node_bytes("all_to_all", size, 8) == 0.0  # one node
    assert cluster.cross_node_bytes("all_to_all", 15 * 8, 16) == 8 * 8


# -- the sketch protocol ---------------------------------------------------------------------------


def test_sketch_width_is_the_sketch_length() -> None:
    """A problem of at most k elements is kept as it is (even between p and k), else folded
    into p = the largest prime ≤ k columns."""
    assert fold_width(4096) == 4093 and fold_width(16) == 13
    signs = SignTable()
    for n in (1, 12, 13, 15, 16, 17, 100):
        assert sketch(torch.ones(n), 16, 1, signs).numel() == sketch_width(n, 16)
    assert [sketch_width(n, 16) for n in (13, 15, 16, 17, 10**6)] == [13, 15, 16, 13, 13]


def test_sketch_collective_sends_the_fewer_bytes() -> None:
    # L > R/2: the all-gather of [R, K] (R = 4, L = 3: (R−1)·K·4 against 2(R−1)/R·L·K·4).
    assert sketch_collective(3, 4, 4093, 0, 4) == ("all_gather", 4 * 4093 * 4)
    # L ≤ R/2: the all-reduce of [L, K].
    assert sketch_collective(2, 4, 4093, 0, 4) == ("all_reduce", 2 * 4093 * 4)
    # With presence: [L, K] rows and [P, L] counts, or [R, K + P]; a tie takes the all-reduce.
    assert sketch_collective(2, 4, 12, 2, 4) == ("all_reduce", (2 * 12 + 2 * 2) * 4)
    assert all_gather_bytes(4 * 14 * 4, 4) == all_reduce_bytes(28 * 4, 4) == 168
    assert sketch_collective(8, 512, 4093, 0, 4) == ("all_reduce", 8 * 4093 * 4)


def test_sketch_bytes_by_hand() -> None:
    # DDP, 10 000 fp32 elements on R = 4: the bucket's own all-reduce, 2·3/4·40 000 bytes, and
    # the sketch folded into p = 4093 columns: L = 2 all-reduce [2, 4093] (2·3/4·32 744), L = 3
    # all-gather [4, 4093] (3/4·65 488).
    assert bucket_bytes("bucket_moo_sketch", 10_000, 4, 2) == {"all_reduce": 60_000 + 49_116}
    assert bucket_bytes("bucket_moo_sketch", 10_000, 4, 3) == {
        "all_reduce": 60_000,
        "all_gather": 49_116,
    }
    # bf16 buckets sketch in fp32, fp64 in fp64; a bucket of n ≤ k is sent whole (n, not p).
    assert bucket_bytes("bucket_moo_sketch", 4096, 4, 2, 2) == {
        "all_reduce": 6 * 4096 * 2 // 4 + 6 * 2 * 4096 * 4 // 4
    }
    assert bucket_bytes("bucket_moo_sketch", 4095, 4, 2, 8, sketch_size=4096)["all_reduce"] == (
        6 * 4095 * 8 // 4 + 6 * 2 * 4095 * 8 // 4
    )
    # FSDP, 10 elements on R = 4: the padded [12] reduce-scatter (3/4·48) and its sketch, 12
    # numbers, with 2 presence counts: the all-reduce of 2·12 + 2·2 fp32 (a tie with the
    # all-gather of [4, 14]).
    assert bucket_bytes("fsdp_moo_sketch", 10, 4, 2, parameters=2) == {
        "reduce_scatter": 36,
        "all_reduce": 168,
    }
    # One problem per parameter: the widths add up (5000 → 13, 17 → 13, 15 → 15 at k = 16).
    assert bucket_bytes(
        "bucket_moo_sketch", 5032, 2, 2, sketch_size=16, problem_sizes=[5000, 17, 15]
    ) == {"all_reduce": 5032 * 4, "all_gather": 2 * 41 * 4 // 2}
    with pytest.raises(ValueError, match="takes problem_sizes"):
        bucket_bytes("bucket_moo_sketch", 100, 2, 2, problems=3)
    # The step adds the objective exchange, as the shard protocol's.
    assert step_bytes("bucket_moo_sketch", [10_000, 10_000], 4, 3) == {
        "all_reduce": 120_000,
        "all_gather": 2 * 49_116 + 3 * 24,
    }


def test_sketch_time_model() -> None:
    """The sketch's collectives are the engine's ring/tree reduction plus one small one: across
    nodes nowhere near the shard protocol's bisection-bound all-to-all."""
    buckets = ddp_buckets(10**9, element_size=2)
    for world_size in (8, 64, 512):
        base = predict("allreduce", buckets, world_size, 8)
        sketch = predict("bucket_moo_sketch", buckets, world_size, 8)
        shard = predict("bucket_moo", buckets, world_size, 8)
        assert sketch.total_bytes == pytest.approx(base.total_bytes, rel=0.01)
        assert sketch.bytes["all_reduce"] >= base.bytes["all_reduce"]
        assert sketch.held_bytes == 0 < sketch.compute_time
        # One small collective per bucket (every bucket folded: [L, p] or [R, p]), on top of
        # the same all-reduces, and the objective exchange.
        collective, size = sketch_collective(8, world_size, 4093, 0, 4)
        small = Cluster().collective_time(
            collective, SENT_BYTES[collective](size, world_size), world_size
        )
        exchange = Cluster().collective_time(
            "all_gather", cost_model.exchange_bytes(world_size), world_size
        )
        assert sketch.comm_time == pytest.approx(
            base.comm_time + len(buckets) * small + exchange, rel=1e-12
        )
        if world_size > 8:
            assert sketch.comm_time < shard.comm_time / 2
    rs = predict("fsdp_reduce_scatter", buckets, 64, 8)
    fsdp = predict("fsdp_moo_sketch", buckets, 64, 8)
    assert fsdp.bytes["reduce_scatter"] == rs.bytes["reduce_scatter"]
    assert rs.comm_time < fsdp.comm_time < 1.5 * rs.comm_time
    # k changes only the sketch's collective.
    small_k = predict("bucket_moo_sketch", buckets, 8, 8, sketch_size=16)
    assert (
        small_k.bytes["all_gather"]
        < predict("bucket_moo_sketch", buckets, 8, 8).bytes["all_gather"]
    )


SKETCH_CASES = [
    # L = 2 ≤ R/2: the all-reduce of [L, K]; buckets folded into 13 columns.
    SketchCase("ddp_reduce", "ddp", (0, 0, 1, 1), sketch_size=16),
    # L = 3: the all-gather; one problem per parameter (a bias of 15: 13 < 15 ≤ 16, kept
    # whole), presence counted (find_unused_parameters).
    SketchCase(
        "ddp_gather_parameter",
        "ddp",
        (0, 1, 2, 2),
        granularity="parameter",
        sketch_size=16,
        find_unused_parameters=True,
    ),
    # The default k: every bucket whole; bf16 sketched in fp32; global MOO.
    SketchCase("ddp_global_bf16", "ddp", (0, 1, 2, 3), granularity="global", dtype=torch.bfloat16),
    SketchCase("ddp_fp64", "ddp", (0, 0, 0, 1), sketch_size=64, dtype=torch.float64),
    # FSDP2: presence counts always; the padded R·c unit, or R·shard per parameter.
    SketchCase("fsdp2_reduce", "fsdp2", (0, 0, 1, 1), sketch_size=16),
    SketchCase("fsdp2_parameter", "fsdp2", (0, 1, 2, 3), granularity="parameter", sketch_size=32),
]
SKETCH_WORLD = 4
SKETCH_RUN = shared_spawn(SKETCH_WORLD).add(sketch_ledgers, SKETCH_CASES)


def predicted_sketch(case: SketchCase, bucket: dict[str, Any], num_objectives: int) -> dict:
    fsdp = case.engine == "fsdp2"
    sizes = bucket["sizes"]
    problem_sizes = None
    if case.granularity == "parameter":
        problem_sizes = [SKETCH_WORLD * n for n in sizes] if fsdp else sizes
    return bucket_bytes(
        "fsdp_moo_sketch" if fsdp else "bucket_moo_sketch",
        bucket["numel"],
        SKETCH_WORLD,
        num_objectives,
        bucket["element_size"],
        parameters=len(sizes) if fsdp or case.find_unused_parameters else 0,
        sketch_size=case.sketch_size,
        problem_sizes=problem_sizes,
    )


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(SKETCH_CASES)), ids=[c.name for c in SKETCH_CASES])
def test_sketch_bytes_are_what_the_hook_counts(index: int) -> None:
    case = SKETCH_CASES[index]
    for rank_result in SKETCH_RUN.results():
        result = rank_result[index]
        assert result["overhead"] == {"objective_exchange": cost_model.exchange_bytes(4)}
        assert result["buckets"]
        for bucket in result["buckets"]:
            expected = predicted_sketch(case, bucket, result["num_objectives"])
            assert bucket["sent"] == expected, (bucket["index"], bucket["sizes"])


@pytest.mark.slow
def test_sketch_cases_cover_every_path() -> None:
    """Both collectives, folded and whole problems, presence counted and not."""
    k = DEFAULT_SKETCH_SIZE
    seen = set()
    for case, result in zip(SKETCH_CASES, SKETCH_RUN.results()[0], strict=True):
        for bucket in result["buckets"]:
            sent = set(bucket["sent"])
            seen.add("gather" if "all_gather" in sent else "reduce")
            sizes = bucket["sizes"] if case.granularity == "parameter" else [bucket["numel"]]
            width = case.sketch_size or k
            seen |= {"folded" if n > width else "whole" for n in sizes}
            seen.add(
                "between p and k" if any(fold_width(width) < n <= width for n in sizes) else ""
            )
            seen.add("presence" if result["presence"] else "no presence")
    assert seen >= {
        "gather",
        "reduce",
        "folded",
        "whole",
        "between p and k",
        "presence",
        "no presence",
    }
