"""Degenerate numerics through the real hook: zero, duplicated, collinear, wildly scaled and
subnormal gradients, buckets shorter than the world size, zero-size parameters, objectives on a
single rank. Every weighting gives finite output equal to the reference (4 gloo ranks)."""

import pytest
import torch
from _ddp_workers import degenerate_steps
from _distributed import shared_spawn

from bucketmoo_hooks import reference, weighting_names

pytestmark = pytest.mark.slow  # every test reads a launch of processes

OBJECTIVES = (0, 1, 2, 2)  # objectives 0 and 1 live on a single rank each
SIZES = (1, 0, 3, 29)  # 1 < R: a bucket shorter than the world size; 0: an empty parameter


def objective_vectors(case: str) -> torch.Tensor:
    """ḡ_0, ḡ_1, ḡ_2 for ``case``, float64 ``[3, Σ SIZES]``."""
    generator = torch.Generator().manual_seed(7)
    g = torch.randn(3, sum(SIZES), generator=generator, dtype=torch.float64)
    if case == "one_zero":
        g[1] = 0
    elif case == "all_zero":
        g.zero_()
    elif case == "duplicated":
        g[2] = g[0]
    elif case == "collinear":
        g[1], g[2] = -2 * g[0], 3 * g[0]
    elif case == "scaled_1e20":  # norms 1e-10, 1e10, 1: squares stay inside the fp32 range
        g[0] *= 1e-10
        g[1] *= 1e10
    elif case == "subnormal":  # fp32 subnormals: the fp32 Gramian underflows to 0
        g *= 1e-41
    return g


CASES = ("one_zero", "all_zero", "duplicated", "collinear", "scaled_1e20", "subnormal")


# Spacing of fp32 subnormals: the absolute round-off floor of a subnormal output.
SUBNORMAL_ULP = 2.0**-149


KEYS = [(case, name) for case in CASES for name in weighting_names()]
RUNS = shared_spawn(4).add(
    degenerate_steps,
    [
        (torch.stack([objective_vectors(case)[o] for o in OBJECTIVES]).float(), name)
        for case, name in KEYS
    ],
    SIZES,
    OBJECTIVES,
    timeout=900,
)


def results() -> dict[tuple[str, str], list[list[dict]]]:
    """Per (case, weighting), per rank: the bucket records of one step (one task for all)."""
    per_rank = RUNS.results()
    return {key: [rank_runs[i] for rank_runs in per_rank] for i, key in enumerate(KEYS)}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("weighting", weighting_names())
def test_degenerate_gradients_give_finite_reference_output(case: str, weighting: str) -> None:
    per_rank = results()[case, weighting]
    for records in per_rank:
        assert len(records) == 3  # the empty parameter shares a bucket
        for record in records:
            output, inputs = record["output"], record["inputs"]
            assert torch.isfinite(output).all(), (record["index"], output)
            problem = tuple(record["params"])
            expected = reference.bucket_update(
                inputs, OBJECTIVES, weighting, bucket=record["index"], problem=problem
            )
            scale = reference.objective_gradients(inputs.double(), OBJECTIVES)[0].norm(dim=1).max()
            error = (output.double() - expected.double()).norm()
            assert error <= 1e-6 * scale + 4 * SUBNORMAL_ULP, (record["index"], error, scale)
    for other in per_rank[1:]:
        for mine, theirs in zip(other, per_rank[0], strict=True):
            assert torch.equal(mine["output"], theirs["output"])
