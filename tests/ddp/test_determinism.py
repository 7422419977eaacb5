"""Determinism: replicas stay bitwise identical with every weighting, and two identical CPU runs
give the same bits (real gloo processes)."""

import torch
from _ddp_workers import make_model, replica_agreement
from _distributed import run_distributed

from bucketmoo_hooks import weighting_names

STEPS = 200
REPEATED = 40  # steps of the second run, compared bit for bit with the first


def test_replicas_agree_bitwise_over_200_steps_and_runs_repeat_exactly() -> None:
    names = weighting_names()
    first = run_distributed(3, replica_agreement, names, STEPS, REPEATED - 1, timeout=900)
    second = run_distributed(3, replica_agreement, names, REPEATED, REPEATED - 1, timeout=900)
    model = make_model((13,), torch.float32)
    initial = torch.cat([p.detach().flatten() for p in model.parameters()])
    for name in names:
        for rank in range(3):
            assert first[rank][name]["agreeing_steps"] == STEPS, (name, rank)
            assert second[rank][name]["agreeing_steps"] == REPEATED, (name, rank)
            assert torch.equal(first[rank][name]["snapshot"], second[rank][name]["snapshot"])
        assert not torch.equal(first[0][name]["snapshot"], initial), name  # training moved them
