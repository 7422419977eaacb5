"""Non-finite gradients: by default an overflow on one rank reaches every rank's update, so AMP's
``GradScaler`` sees it and skips the step on every replica; with ``nonfinite="raise"`` every rank
raises, naming the bucket, step, objective and ranks (real gloo processes)."""

import re

import pytest
import torch
from _ddp_workers import grad_scaler_run, nonfinite_raise_run
from _distributed import shared_spawn

from bucketmoo_hooks import BucketMOOState, weighting_names

GRAD_SCALER = shared_spawn(3).add(grad_scaler_run, weighting_names(), 1, 2)
RAISE_CASES = [("bucket", True), ("parameter", False), ("global", True)]
RAISED = {case: shared_spawn(3).add(nonfinite_raise_run, *case) for case in RAISE_CASES}


@pytest.mark.slow
def test_grad_scaler_skips_the_overflowing_step_on_every_rank() -> None:
    names = weighting_names()
    per_rank = GRAD_SCALER.results()
    for name in names:
        for rank_result in per_rank:
            scales, params = rank_result[name]["scales"], rank_result[name]["params"]
            assert scales == [1024.0, 512.0, 512.0, 512.0], (name, scales)  # step 1 skipped
            assert torch.equal(params[1], params[0]), name  # ... and left the model alone
            assert not torch.equal(params[2], params[1]), name  # training resumed
            assert all(torch.isfinite(p).all() for p in params), name
        for rank_result in per_rank[1:]:
            assert torch.equal(rank_result[name]["params"][-1], per_rank[0][name]["params"][-1])


@pytest.mark.slow
@pytest.mark.parametrize(("granularity", "overlap"), RAISE_CASES)
def test_raise_policy_names_the_bucket_step_objective_and_ranks(
    granularity: str, overlap: bool
) -> None:
    per_rank = RAISED[granularity, overlap].results()
    for result in per_rank:
        assert list(result["errors"]) == [1], result  # step 0 went through
        message = result["errors"][1]
        assert "NonFiniteGradientError" in message or "not finite" in message, message
        assert re.search(
            r"bucket \d+ at step 1: the gradient of objective 'ja' \(ranks \[2\]\)"
            r" is not finite",
            message,
        ), message


def test_nonfinite_policy_is_validated() -> None:
    with pytest.raises(ValueError, match=r"nonfinite must be one of \('propagate', 'raise'\)"):
        BucketMOOState(nonfinite="skip")
