"""Process groups: the hook's gloo groups are made under names every rank derives alike (subgroups
that leave ranks out cannot desynchronise them), at registration; a state adopts the group of a
model on a subgroup; one state serves one model (real gloo processes; the two-rank checks in a
launch of their own, as they count the groups the process made, with short timeouts: a hang
fails within seconds)."""

import datetime
import functools
from typing import Any

import pytest
import torch
from _distributed import run_distributed, shared_spawn
from _group_workers import subgroup_models, two_ranks

pytestmark = pytest.mark.slow  # every test reads a launch of processes

SHORT = datetime.timedelta(seconds=10)


@functools.cache
def two_rank_results() -> list[dict[str, Any]]:
    return run_distributed(2, two_ranks, timeout=90, collective_timeout=SHORT)


def test_subgroups_that_leave_ranks_out_do_not_desynchronise_the_helper_groups() -> None:
    for seen in (result["groups"] for result in two_rank_results()):
        assert seen["raw_iter"] == 2  # groups made inside backward (register_comm_hook)
        assert seen["made_at_registration"] == 2  # the host group and the overlap copy
        assert seen["made_for_second_state"] == 0  # shared by the states over the same ranks
        assert seen["made_in_backward"] == 0
        assert seen["copy_ranks"] == [1, 0]  # the user's group's order, so its ranks
        assert seen["copy_rank_is_group_rank"]
        assert seen["same_timeout"]
        assert seen["shared"]
        assert seen["iters"] == (3, 2)
        # The same objectives on the same ranks as the default-group run: the same two steps.
        torch.testing.assert_close(seen["params"], seen["raw_params"])


def test_a_state_serves_one_model() -> None:
    errors = two_rank_results()[0]["errors"]
    for path in ("ddp", "fsdp2", "fsdp1", "ddp_then_fsdp2"):
        assert errors[path].startswith(
            "ValueError: this BucketMOOState is already registered on another model"
        ), errors[path]
        assert "create one state per DDP or FSDP model" in errors[path]
    assert "bucket_moo_hook: bucket 0 holds parameters of another model" in errors["raw"]
    assert "KeyError" not in errors["raw"]


SUBGROUP_MODELS = shared_spawn(4).add(subgroup_models)


def test_a_state_adopts_the_subgroup_of_its_model() -> None:
    for rank, seen in enumerate(SUBGROUP_MODELS.results()):
        assert seen["members"] == [0, 1] if rank < 2 else [2, 3]
        assert seen["wrong_length"].startswith(
            "ValueError: objective_of_rank has 3 entries but the model's process group "
            f"(global ranks {seen['members']}) has 2 ranks"
        ), seen["wrong_length"]
        assert seen["ddp_adopted"] and seen["fsdp1_adopted"] and seen["fsdp2_adopted"]
        assert seen["ddp_error"] <= 1e-5 * seen["ddp_scale"], seen
        assert seen["fsdp1_error"] <= 1e-6 and seen["fsdp2_error"] <= 1e-6, seen
