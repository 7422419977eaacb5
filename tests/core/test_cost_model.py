"""The alpha–beta cost model: byte formulas, DDP's bucket sizes, and the time model's shape.

Its byte counts are checked against gloo measurements in
``tests/integration/test_comm_benchmark.py``.
"""

import pytest

from bucketmoo_hooks import cost_model
from bucketmoo_hooks._collectives import all_reduce_bytes
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
    with pytest.raises(ValueError, match="without shapes"):
        predict("powersgd", buckets, 8, 8)
