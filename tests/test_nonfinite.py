"""Non-finite gradients: an overflow on one rank reaches every rank's update, so AMP's
``GradScaler`` sees it and skips the step on every replica (real gloo processes)."""

import torch
from _ddp_workers import grad_scaler_run
from _distributed import run_distributed

from bucketmoo_hooks import weighting_names


def test_grad_scaler_skips_the_overflowing_step_on_every_rank() -> None:
    names = weighting_names()
    per_rank = run_distributed(3, grad_scaler_run, names, 1, 2)
    for name in names:
        for rank_result in per_rank:
            scales, params = rank_result[name]["scales"], rank_result[name]["params"]
            assert scales == [1024.0, 512.0, 512.0, 512.0], (name, scales)  # step 1 skipped
            assert torch.equal(params[1], params[0]), name  # ... and left the model alone
            assert not torch.equal(params[2], params[1]), name  # training resumed
            assert all(torch.isfinite(p).all() for p in params), name
        for rank_result in per_rank[1:]:
            assert torch.equal(rank_result[name]["params"][-1], per_rank[0][name]["params"][-1])
