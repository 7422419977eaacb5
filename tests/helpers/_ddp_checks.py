"""What the DDP tests check a recorded scenario against (the parent side of
``_ddp_workers.train``): each bucket's reference output at the scenario's granularity."""

from typing import Any

import torch
from _ddp_workers import Scenario

from bucketmoo_hooks import reference
from bucketmoo_hooks.weightings import WeightingContext, get_weighting


def objective_ids(scenario: Scenario, step: int, world_size: int) -> tuple:
    if scenario.per_step_objectives is not None:
        return scenario.per_step_objectives[step]
    if scenario.objective_of_rank is not None:
        return scenario.objective_of_rank
    return tuple(range(world_size))


def relative_error(
    output: torch.Tensor, expected: torch.Tensor, inputs: torch.Tensor, ids: tuple
) -> float:
    """``‖d − d_ref‖ / max_ℓ ‖ḡ_ℓ‖``: error on the scale of the objective gradients.

    When objectives conflict, MGDA's update is much shorter than the gradients it combines, and
    fp32 cancellation in ``Σ w_ℓ ḡ_ℓ`` makes any two summation orders differ by round-off of the
    gradients' size, not of the update's (seen: ‖d‖ = 0.07 max‖ḡ‖, error 2.5e-7 of max‖ḡ‖).
    """
    objective_grads, _ = reference.objective_gradients(inputs.double(), ids)
    scale = objective_grads.norm(dim=1).max()
    return ((output.double() - expected.double()).norm() / scale).item()


def expected_outputs(
    scenario: Scenario, rank_result: dict[str, Any], world_size: int
) -> list[torch.Tensor]:
    """The reference's answer for every recorded bucket, at the scenario's granularity.

    One weighting instance serves the whole run, in the hook's order and with its contexts, so
    stateful weightings (GradVac) evolve as in the hook.
    """
    weighting = get_weighting(scenario.weighting)
    expected: list[torch.Tensor] = []
    records = rank_result["records"]
    for step in sorted({r["step"] for r in records}):
        ids = objective_ids(scenario, step, world_size)
        in_step = [r for r in records if r["step"] == step]
        if scenario.granularity == "global":  # one problem over every bucket of the step
            inputs = torch.cat([r["inputs"] for r in in_step], dim=1)
            # Bucket -1: the whole model (stable when DDP rebuilds its buckets).
            if scenario.sketch_size is None:
                update = reference.bucket_update(inputs, ids, weighting, step=step, bucket=-1)
            else:  # the sum of the buckets' sketched Gramians, each with its own map
                update = global_sketched_update(scenario, in_step, ids, weighting, step)
            expected += update.split([r["inputs"].shape[1] for r in in_step])
        for record in in_step:
            if scenario.granularity == "parameter":  # every parameter on its own
                pieces = record["inputs"].split(record["sizes"], dim=1)
                updates = [
                    reference.bucket_update(
                        piece,
                        ids,
                        weighting,
                        step=step,
                        bucket=record["index"],
                        problem=(record["params"][segment],),
                        segment=segment,
                        sketch_size=scenario.sketch_size,
                    )
                    for segment, piece in enumerate(pieces)
                ]
                expected.append(torch.cat(updates))
            elif scenario.granularity == "bucket":
                update = reference.bucket_update(
                    record["inputs"],
                    ids,
                    weighting,
                    step=step,
                    bucket=record["index"],
                    problem=tuple(record["params"]),
                    sketch_size=scenario.sketch_size,
                )
                expected.append(update)
    return expected


def global_sketched_update(
    scenario: Scenario, in_step: list[dict[str, Any]], ids: tuple, weighting: Any, step: int
) -> torch.Tensor:
    """Global MOO under the sketch protocol: the weights of the sum of every bucket's sketched
    Gramian (bucket ``index``, problem 0), applied to the whole model."""
    assert scenario.sketch_size is not None
    gramian = sum(
        reference.sketch_gramian(
            reference.objective_gradients(r["inputs"], ids)[0],
            scenario.sketch_size,
            step=step,
            bucket=r["index"],
        )
        for r in in_step
    )
    inputs = torch.cat([r["inputs"] for r in in_step], dim=1)
    objective_grads, objective_map = reference.objective_gradients(inputs, ids)
    context = WeightingContext(step, -1, objective_map.objectives, None, ())
    present = reference.presence(inputs, ids)
    combination = reference.combine(
        objective_grads, weighting, context, present=present, gramian=gramian
    )
    return combination.update.to(inputs.dtype)
