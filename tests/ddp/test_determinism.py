"""Determinism: replicas stay bitwise identical with every weighting, and two identical CPU runs
give the same bits (real gloo processes)."""

import pytest
import torch
from _ddp_workers import make_model, replica_agreement
from _distributed import shared_spawn

from bucketmoo_hooks import weighting_names

pytestmark = pytest.mark.slow  # every test reads a launch of processes

# Steps per weighting, in each of two runs in different launches of processes. Whatever could
# make replicas or runs differ acts within a step and is met in every step: the unordered
# arrival of buckets and of the exchange's messages, the all-reduced Gramian, the solve, and
# PCGrad's per-step random orders; the state carried from step to step (momentum, DDP's rebuilt
# buckets after step 0, GradVac's targets, Nash-MTL's warm starts) is in play from step 2 on.
# 40 steps repeat each of these 40 times per weighting (400 steps in all; test_ddp_hook checks
# replicas bitwise too, on 21 steps of its longest scenarios); more steps repeat the same paths.
STEPS = 40
NAMES = weighting_names()
FIRST = shared_spawn(3).add(replica_agreement, NAMES, STEPS, STEPS - 1, timeout=900)
SECOND = shared_spawn(3, second=True).add(replica_agreement, NAMES, STEPS, STEPS - 1, timeout=900)


def test_replicas_agree_bitwise_over_40_steps_and_runs_repeat_exactly() -> None:
    names = NAMES
    first = FIRST.results()
    second = SECOND.results()
    model = make_model((13,), torch.float32)
    initial = torch.cat([p.detach().flatten() for p in model.parameters()])
    for name in names:
        for rank in range(3):
            assert first[rank][name]["agreeing_steps"] == STEPS, (name, rank)
            assert second[rank][name]["agreeing_steps"] == STEPS, (name, rank)
            assert torch.equal(first[rank][name]["snapshot"], second[rank][name]["snapshot"])
        assert not torch.equal(first[0][name]["snapshot"], initial), name  # training moved them
