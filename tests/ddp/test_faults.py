"""Faults: a rank that dies or stalls mid-step makes the others fail with an error within the
process group's timeout, never hang (real gloo processes, short timeout)."""

import pytest
from _ddp_workers import train_until_fault
from _distributed import run_with_faults

pytestmark = pytest.mark.slow  # every test reads a launch of processes

COLLECTIVE_TIMEOUT = 10.0


@pytest.mark.parametrize(
    ("fault", "longest_wait"),
    [
        ("die", 5.0),  # the peers see the closed connection at once
        ("stall", COLLECTIVE_TIMEOUT + 5.0),  # the peers wait for the collective's timeout
    ],
)
def test_a_failed_rank_makes_the_others_raise_within_the_timeout(
    fault: str, longest_wait: float
) -> None:
    results, _ = run_with_faults(
        3,
        train_until_fault,
        fault,
        1,
        2,
        survivors={0, 2},
        collective_timeout=COLLECTIVE_TIMEOUT,
    )
    for rank, result in results.items():
        assert result["step"] == 2, rank  # the steps before the fault went through
        assert result["error"] is not None and result["error"].startswith("RuntimeError"), rank
        assert result["waited"] <= longest_wait, (rank, result)
        if fault == "stall":
            assert "Timed out" in result["error"], result["error"]
            assert result["waited"] >= COLLECTIVE_TIMEOUT - 1.0
