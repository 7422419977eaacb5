"""Single-process reference of the bucket-level combination: what the hook must return.

Given the stacked per-rank gradients of a bucket, it averages them by objective, forms the full
Gramian, weights it and combines, with no sharding and no communication. It is the test oracle
of the distributed hook, and it lets a user with one device compute a bucket-level MOO update
from per-objective gradients::

    from bucketmoo_hooks import reference
    update = reference.bucket_update(torch.stack([g_en, g_de, g_ja]), weighting="mgda")
"""

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ._objectives import ObjectiveMap
from .weightings import Weighting, WeightingContext, get_weighting

__all__ = ["Combination", "bucket_update", "combine", "model_update", "objective_gradients"]

WeightingSpec = str | Weighting | Callable[[Tensor], Tensor]


@dataclass(frozen=True, slots=True)
class Combination:
    """A combined update with the Gramian and the weights it came from.

    Attributes:
        update: ``d = Σ_ℓ w_ℓ ḡ_ℓ``.
        gramian: ``G = [⟨ḡ_a, ḡ_b⟩]`` (fp32, or fp64 for fp64 input).
        weights: ``w``, one weight per objective.
    """

    update: Tensor
    gramian: Tensor
    weights: Tensor


def objective_gradients(
    grads: Tensor, objective_of_rank: Sequence[Hashable] | None = None
) -> tuple[Tensor, ObjectiveMap]:
    """Average the rows of ``grads`` (``[R, n]``) by objective: ``ḡ_ℓ = (1/m_ℓ) Σ_{r∈ℓ} g_r``.

    Returns the objective gradients ``[L, n]`` (fp32, or fp64 for fp64 input), in order of first
    appearance of each objective over the ranks, and the :class:`ObjectiveMap`.
    """
    if not isinstance(grads, Tensor) or grads.ndim != 2 or not grads.is_floating_point():
        raise ValueError(
            "grads must be a floating-point tensor [R, n] (one row per rank), got "
            f"{tuple(grads.shape) if isinstance(grads, Tensor) else type(grads).__name__}"
        )
    world_size = grads.shape[0]
    if objective_of_rank is None:
        objective_of_rank = range(world_size)
    if len(objective_of_rank) != world_size:
        raise ValueError(
            f"objective_of_rank has {len(objective_of_rank)} entries but grads has "
            f"{world_size} rows; give one objective id per row"
        )
    objective_map = ObjectiveMap.from_ids(list(objective_of_rank))
    compute = grads.to(torch.promote_types(grads.dtype, torch.float32))
    rows = torch.tensor(objective_map.group_of_rank, device=grads.device)
    means = [compute[rows == group].mean(dim=0) for group in range(objective_map.num_objectives)]
    return torch.stack(means), objective_map


def combine(
    objective_grads: Tensor,
    weighting: WeightingSpec = "mgda",
    context: WeightingContext | None = None,
) -> Combination:
    """Weight the objective gradients ``[L, n]`` by ``weighting(G)``, ``G = A Aᵀ``, and sum them.

    The update keeps the dtype of ``objective_grads``.
    """
    resolved = get_weighting(weighting)
    compute = objective_grads.to(torch.promote_types(objective_grads.dtype, torch.float32))
    gramian = compute @ compute.T
    weights = resolved(gramian, context)
    update = (weights.to(compute.dtype) @ compute).to(objective_grads.dtype)
    return Combination(update, gramian, weights)


def bucket_update(
    grads: Tensor,
    objective_of_rank: Sequence[Hashable] | None = None,
    weighting: WeightingSpec = "mgda",
    *,
    step: int = 0,
    bucket: int = 0,
    problem: tuple[int, ...] | None = (),
    segment: int | None = None,
) -> Tensor:
    """What :func:`bucket_moo_hook` returns for a bucket whose per-rank gradients are ``grads``.

    Args:
        grads: ``[R, n]``, row ``r`` is rank ``r``'s local bucket gradient.
        objective_of_rank: Objective id of every row (default: every row its own objective).
        weighting: As for :class:`BucketMOOState`. Pass one instance over many calls to carry
            the state of a stateful weighting (e.g. GradVac's targets) from step to step.
        step, bucket, problem, segment: Passed to the weighting in its
            :class:`WeightingContext`; ``problem`` keys the state of stateful weightings (the hook
            uses the positions of the bucket's parameters in ``model.parameters()``), ``segment``
            is the parameter's position in its bucket with ``granularity="parameter"``.

    Returns:
        The combined update ``[n]`` in the dtype of ``grads``.
    """
    objective_grads, objective_map = objective_gradients(grads, objective_of_rank)
    context = WeightingContext(step, bucket, objective_map.objectives, segment, problem)
    return combine(objective_grads, weighting, context).update.to(grads.dtype)


def model_update(
    grads: Tensor,
    bucket_sizes: Sequence[int],
    objective_of_rank: Sequence[Hashable] | None = None,
    weighting: WeightingSpec = "mgda",
    *,
    step: int = 0,
) -> Tensor:
    """Update of a whole flat gradient ``[R, N]`` split into consecutive independent problems.

    ``bucket_sizes`` must sum to ``N``; every piece gets its own weights. It expresses every
    granularity of the hook: DDP's bucket sizes for ``"bucket"``, the parameter sizes for
    ``"parameter"`` (each parameter is solved on its own), ``[N]`` for ``"global"``.
    """
    if any(size <= 0 for size in bucket_sizes) or sum(bucket_sizes) != grads.shape[-1]:
        raise ValueError(
            f"bucket_sizes must be positive and sum to the gradient length {grads.shape[-1]}, "
            f"got {list(bucket_sizes)}"
        )
    parts = torch.split(grads, list(bucket_sizes), dim=1)
    resolved = get_weighting(weighting)  # one instance for every piece
    return torch.cat(
        [
            bucket_update(part, objective_of_rank, resolved, step=step, bucket=i, problem=(i,))
            for i, part in enumerate(parts)
        ]
    )
