"""Batched solves: a bucket's ``S`` problems (``granularity="parameter"``) are solved at once.

- Launch count: with the accelerator's code path forced, one bucket's solve dispatches as many
  ATen ops (kernel launches on a GPU) for ``S = 8`` or ``16`` segments as for one, for every
  weighting and ``L ∈ {2, 4, 8, 16}`` (``benchmarks/solver_ops.py`` counts them).
- Values: the batch gives each problem the weights it gets alone, with its own state for the
  stateful weightings, and with absent objectives (segments over different objectives).
"""

import contextlib
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from bucketmoo_hooks._absent import solve_weights
from bucketmoo_hooks._device_path import force_device_path
from bucketmoo_hooks.weightings import WeightingContext, get_weighting, weighting_names

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "solver_ops.py"
_SPEC = importlib.util.spec_from_file_location("solver_ops", _PATH)
assert _SPEC is not None and _SPEC.loader is not None
solver_ops = importlib.util.module_from_spec(_SPEC)
sys.modules["solver_ops"] = solver_ops
_SPEC.loader.exec_module(solver_ops)


@pytest.mark.parametrize("num_objectives", [2, 4, 8, 16])
@pytest.mark.parametrize("name", weighting_names())
def test_launches_do_not_grow_with_segments(name: str, num_objectives: int) -> None:
    one = solver_ops.count_solve(name, num_objectives, 1)
    for segments in (8, 16):
        many = solver_ops.count_solve(name, num_objectives, segments)
        assert many["launches"] == one["launches"], (name, num_objectives, segments, one, many)


def _contexts(segments: int, objectives: tuple[int, ...]) -> list[WeightingContext]:
    return [WeightingContext(5, 2, objectives, s, (10 + s,)) for s in range(segments)]


@pytest.mark.parametrize("device_path", [False, True])
@pytest.mark.parametrize("name", weighting_names())
def test_batch_equals_problems_alone(name: str, device_path: bool) -> None:
    """Two steps (the stateful weightings warm-start the second), each problem's own state."""
    gramians = solver_ops.gramians(5, 6).double()
    gramians[2] = 0.0  # a zero Gramian in the batch
    gramians[3, 1, :] = gramians[3, :, 1] = 0.0  # a zero gradient
    contexts = _contexts(6, (3, 1, 4, 7, 9))
    batched, alone = get_weighting(name), get_weighting(name)
    with force_device_path() if device_path else contextlib.nullcontext():
        for _ in range(2):
            together = batched.solve(gramians, contexts)
            each = torch.stack([alone(g, c) for g, c in zip(gramians, contexts, strict=True)])
            torch.testing.assert_close(together, each, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", weighting_names())
def test_absent_objectives_batched_by_pattern(name: str) -> None:
    """Segments over different sets of present objectives: each parameter's weights are the
    weighting on its own objectives, as solved alone (one batch per set of objectives)."""
    num_objectives, segments = 4, 6
    gramians = solver_ops.gramians(num_objectives, segments).double()
    present = torch.tensor(
        [
            [True, True, True, True],
            [True, False, True, True],
            [True, True, True, True],
            [True, False, True, True],
            [False, False, True, False],
            [False, False, False, False],
        ]
    )
    contexts = _contexts(segments, (0, 1, 2, 3))
    weights, per_parameter = solve_weights(
        get_weighting(name), gramians, present, contexts, list(range(segments))
    )
    assert per_parameter is None  # one parameter per problem: the problem weights are its own
    alone = get_weighting(name)
    for s in range(segments):
        keep = present[s].nonzero().flatten().tolist()
        expected = torch.full((num_objectives,), 1.0 / num_objectives, dtype=torch.float64)
        if keep:
            expected = torch.zeros(num_objectives, dtype=torch.float64)
            sub = gramians[s][keep][:, keep]
            if len(keep) == 1:
                expected[keep] = 1.0
            elif len(keep) == num_objectives:
                expected = alone(sub, contexts[s])
            else:
                context = WeightingContext(5, 2, tuple(keep), s, (10 + s,))
                expected[keep] = alone(sub, context)
        torch.testing.assert_close(weights[s], expected, rtol=1e-9, atol=1e-12)
