"""Overlap of the DDP hook with backward (``BucketMOOState(overlap=True)``, the default) on gloo:
the hook returns at once, a worker thread reduces the buckets in order, results and bytes are
bitwise those of the blocking hook, errors reach ``backward()`` on every rank, and the thread
stops cleanly."""

import pytest
import torch
from _distributed import run_distributed, shared_spawn
from _overlap_workers import (
    early_exchange,
    hook_body_times,
    overlap_on_and_off,
    worker_error,
    worker_shutdown,
)

pytestmark = pytest.mark.slow  # every test reads a launch of processes

GRANULARITIES = ["bucket", "parameter", "global"]
ON_AND_OFF = {g: shared_spawn(3).add(overlap_on_and_off, g) for g in GRANULARITIES}
DELAY = 0.2
BODY_TIMES = shared_spawn(2).add(hook_body_times, DELAY)
EARLY = shared_spawn(2).add(early_exchange, 2 * DELAY)
ERROR_CASES = [("bucket", 1), ("global", -1)]
WORKER_ERRORS = {case: shared_spawn(2).add(worker_error, *case) for case in ERROR_CASES}


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_overlap_gives_the_blocking_hook_bit_for_bit(granularity: str) -> None:
    # find_unused_parameters=True: DDP all-reduces its unused-parameter map on the autograd
    # thread after the last bucket, while the worker may still be exchanging buckets.
    for rank_result in ON_AND_OFF[granularity].results():
        overlapped, blocking = rank_result["True"], rank_result["False"]
        assert torch.equal(overlapped["params"], blocking["params"])
        assert overlapped["ledgers"] == blocking["ledgers"]
        assert overlapped["iter"] == blocking["iter"] == 4
        assert overlapped["held_bytes"] == blocking["held_bytes"]
        assert (overlapped["held_bytes"] > 0) == (granularity == "global")
        # Exchange buffers are reused from bucket to bucket: at most an input and an output of
        # the largest (padded) bucket; global MOO holds its slices instead.
        for run in (overlapped, blocking):
            padded = run["largest_bucket_bytes"] + 3 * 4
            assert run["workspace_bytes"] <= 2 * padded
            assert (run["workspace_bytes"] > 0) == (granularity != "global")


def test_hook_returns_before_the_bucket_is_reduced() -> None:
    delay = DELAY
    for times in BODY_TIMES.results():
        assert len(times["True"]) == len(times["False"]) > 2
        assert max(times["True"]) < delay / 2, times["True"]
        assert min(times["False"]) >= delay, times["False"]


def test_objective_exchange_starts_before_backward() -> None:
    """Rank 1 reaches backward 0.4 s after rank 0. From the second step on, rank 0's bucket 0
    finds the exchange done (started at the forward), where at bucket 0 it waits for rank 1.
    (The first step, which exchanges at bucket 0 in every setup, is left out: rank 0's own
    first-step costs shorten its wait by an amount that depends on the machine's load.)"""
    delay = 2 * DELAY
    fast = EARLY.results()[0]["waited"]
    for setup in ("installed", "set_objective"):
        assert max(fast[setup][1:]) < delay / 4, (setup, fast[setup])
    assert min(fast["plain"][1:]) > delay / 2, fast["plain"]


def test_early_exchange_keeps_its_checks_on_every_rank() -> None:
    for result in EARLY.results():
        late, steps = result["errors"]["late"], result["errors"]["steps"]
        assert late.startswith("step 3: ") and "ranks [0, 1] called state.set_objective" in late
        assert "during step 2 after its first forward with gradients enabled" in late
        assert steps.startswith("step 2: ") and "ranks are at different steps" in steps


@pytest.mark.parametrize(("granularity", "bad"), ERROR_CASES)
def test_worker_errors_reach_backward_on_every_rank(granularity: str, bad: int) -> None:
    """The weighting fails once, in step 1, on every rank: that backward raises (global MOO: at
    the last bucket, with every earlier bucket held), and training goes on."""
    for result in WORKER_ERRORS[granularity, bad].results():
        [error] = result["errors"]
        assert "BucketHookError: bucket_moo_hook failed on bucket" in error
        assert "of step 1: " in error
        assert "ValueError: weighting broke on bucket" in error
        # A failed step does not advance the step counter (as with the blocking hook).
        assert result["iter"] == 2


def test_worker_thread_starts_and_stops() -> None:
    # A launch of its own: it counts the process's threads (a state that an earlier task in a
    # shared process left alive keeps its thread; a failed global step does: its error's frames
    # hold the state).
    for seen in run_distributed(2, worker_shutdown):
        assert seen == {
            "before": 0,
            "training": 1,
            "same_timeout": True,
            "closed": 0,
            "restarted": 1,
            "collected": 0,
        }
