"""The single-process reference, objective keys and maps, and the byte ledger."""

import os
import subprocess
import sys

import pytest
import torch

from bucketmoo_hooks import CommLedger, ObjectiveMap, objective_key, reference
from bucketmoo_hooks._collectives import all_reduce_bytes


def grads_of(world_size: int, numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(world_size * 1000 + numel)
    return torch.randn(world_size, numel, generator=generator).to(dtype)


def test_objective_gradients_average_each_group_in_first_appearance_order() -> None:
    grads = grads_of(4, 10)
    objective_grads, objective_map = reference.objective_gradients(grads, ["de", "en", "de", "ja"])
    torch.testing.assert_close(objective_grads[0], (grads[0] + grads[2]) / 2)
    torch.testing.assert_close(objective_grads[1], grads[1])
    torch.testing.assert_close(objective_grads[2], grads[3])
    assert objective_map.group_sizes == (2, 1, 1)
    assert objective_map.objectives == tuple(objective_key(i) for i in ("de", "en", "ja"))


@pytest.mark.parametrize(
    ("dtype", "compute"),
    [
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.float64, torch.float64),
    ],
)
def test_gramian_is_at_least_fp32_and_the_update_keeps_the_dtype(
    dtype: torch.dtype, compute: torch.dtype
) -> None:
    grads = grads_of(3, 17, dtype)
    objective_grads, _ = reference.objective_gradients(grads)
    assert objective_grads.dtype == compute
    assert reference.bucket_update(grads, weighting="mgda").dtype == dtype


def test_mean_with_equal_groups_is_the_average() -> None:
    grads = grads_of(4, 33)
    update = reference.bucket_update(grads, [0, 1, 0, 1], "mean")
    torch.testing.assert_close(update, grads.mean(dim=0))


def test_one_objective_is_the_average_for_every_weighting() -> None:
    grads = grads_of(3, 21)
    for weighting in ("mean", "mgda"):
        update = reference.bucket_update(grads, ["x", "x", "x"], weighting)
        torch.testing.assert_close(update, grads.mean(dim=0))


def test_model_update_solves_every_bucket_on_its_own() -> None:
    grads = grads_of(3, 50)
    sizes = [7, 30, 13]
    update = reference.model_update(grads, sizes, weighting="mgda")
    parts = torch.split(grads, sizes, dim=1)
    expected = torch.cat([reference.bucket_update(part, weighting="mgda") for part in parts])
    torch.testing.assert_close(update, expected)
    whole = reference.bucket_update(grads, weighting="mgda")
    assert not torch.allclose(update, whole)  # bucket-level ≠ global weights


def test_bad_reference_input_is_refused() -> None:
    with pytest.raises(ValueError, match=r"grads must be a floating-point tensor \[R, n\]"):
        reference.bucket_update(torch.ones(5))
    with pytest.raises(ValueError, match=r"grads must be a floating-point tensor \[R, n\]"):
        reference.bucket_update(torch.ones(2, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="objective_of_rank has 3 entries but grads has 2 rows"):
        reference.bucket_update(torch.ones(2, 5), [0, 1, 2])
    with pytest.raises(ValueError, match="bucket_sizes must be positive and sum to"):
        reference.model_update(torch.ones(2, 5), [2, 2])
    with pytest.raises(ValueError, match="bucket_sizes must be positive and sum to"):
        reference.model_update(torch.ones(2, 5), [6, -1])


def test_shard_segments_cover_each_piece_once() -> None:
    """Parameter granularity: every parameter's elements land in exactly one rank's slice."""
    from bucketmoo_hooks._shard import shard_segments

    sizes, world_size = [5, 1, 9, 3], 3
    shard = -(-sum(sizes) // world_size)  # 6
    per_rank = [shard_segments(sizes, rank, shard) for rank in range(world_size)]
    assert per_rank[0] == [(0, 5), (5, 6), (0, 0), (0, 0)]
    assert per_rank[1] == [(0, 0), (0, 0), (0, 6), (0, 0)]
    assert per_rank[2] == [(0, 0), (0, 0), (0, 3), (3, 6)]
    for piece, size in enumerate(sizes):
        assert sum(segments[piece][1] - segments[piece][0] for segments in per_rank) == size


# -- objective keys and maps ---------------------------------------------------------------------


def test_objective_keys_are_the_same_in_every_process() -> None:
    """Unlike hash(), the key must not depend on the process (PYTHONHASHSEED differs per rank)."""
    ids = ["en", 3, ("de", 1), b"ja", None]
    code = f"from bucketmoo_hooks import objective_key;print([objective_key(i) for i in {ids!r}])"
    processes = [  # both at once
        subprocess.Popen(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            stdout=subprocess.PIPE,
            text=True,
        )
        for seed in ("1", "2")
    ]
    outputs = {process.communicate(timeout=120)[0] for process in processes}
    assert [process.returncode for process in processes] == [0, 0]
    assert outputs == {f"{[objective_key(i) for i in ids]}\n"}


def test_objective_keys_distinguish_ids() -> None:
    ids = ["en", "de", 0, 1, 1.0, (0,), "0"]
    assert len({objective_key(i) for i in ids}) == len(ids)


def test_unusable_objective_ids_are_refused() -> None:
    with pytest.raises(TypeError, match="must be hashable, got \\['en'\\] of type list"):
        objective_key(["en"])
    with pytest.raises(TypeError, match="must be picklable"):
        objective_key(lambda: 0)


def test_objective_map_and_averaging_matrix() -> None:
    objective_map = ObjectiveMap.from_ids(["a", "b", "b", "b"])
    assert objective_map.num_objectives == 2
    assert objective_map.world_size == 4
    assert objective_map.group_of_rank == (0, 1, 1, 1)
    expected = torch.tensor([[1.0, 0, 0, 0], [0, 1 / 3, 1 / 3, 1 / 3]])
    torch.testing.assert_close(objective_map.averaging_matrix(), expected)


# -- byte ledger ---------------------------------------------------------------------------------


def test_ring_allreduce_bytes() -> None:
    assert all_reduce_bytes(1000 * 4, 4) == 6000  # 2·3/4·1000·4
    assert all_reduce_bytes(1000 * 2, 1) == 0


def test_ledger_closes_steps_and_keeps_totals() -> None:
    ledger = CommLedger(world_size=4)
    for step in range(2):
        ledger.record_overhead("objective_exchange", 72)
        for index, numel in enumerate((100, 60)):
            traffic = ledger.open_bucket(index, numel, 4)
            traffic.add("all_to_all", 300 + step)
            traffic.add("all_gather", 300)
        ledger.close_step()
    assert ledger.steps == 2
    assert [t.numel for t in ledger.last_step] == [100, 60]
    assert ledger.step_overhead == {"objective_exchange": 72}
    assert ledger.last_step_bytes() == 2 * 301 + 2 * 300 + 72
    assert ledger.last_step_allreduce_bytes() == all_reduce_bytes(160 * 4, 4)
    assert ledger.totals == {"objective_exchange": 144, "all_to_all": 1202, "all_gather": 1200}
