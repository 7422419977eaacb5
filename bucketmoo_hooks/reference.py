"""Single-process reference of the bucket-level combination: what the hook must return.

Given the stacked per-rank gradients of a bucket, it averages them by objective, forms the full
Gramian, weights it and combines, with no sharding and no communication. It is the test oracle
of the distributed hook, and it lets a user with one device compute a bucket-level MOO update
from per-objective gradients::

    from bucketmoo_hooks import reference
    update = reference.bucket_update(torch.stack([g_en, g_de, g_ja]), weighting="mgda")
"""

import bisect
import itertools
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ._absent import check_absent, partly_present, presence_counts, solve_weights
from ._linalg import combine_segments, gramian_of, row_segments
from ._objectives import ObjectiveMap
from ._sketch import SignTable, check_sketch_size, problem_seed, sketch
from .weightings import Weighting, WeightingContext, get_weighting

__all__ = [
    "Combination",
    "bucket_update",
    "combine",
    "model_update",
    "objective_gradients",
    "presence",
    "sketch_gramian",
]

WeightingSpec = str | Weighting | Callable[[Tensor], Tensor]
# The sketch's fixed per-element signs (σ depends on the element's index only): one table for
# every call, grown on demand, rather than 2²⁰ fresh random signs per call.
_SIGNS = SignTable()


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
    objective_map = _objective_map(grads, objective_of_rank)
    compute = grads.to(torch.promote_types(grads.dtype, torch.float32))
    rows = torch.tensor(objective_map.group_of_rank, device=grads.device)
    means = [compute[rows == group].mean(dim=0) for group in range(objective_map.num_objectives)]
    return torch.stack(means), objective_map


def _objective_map(grads: Tensor, objective_of_rank: Sequence[Hashable] | None) -> ObjectiveMap:
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
    return ObjectiveMap.from_ids(list(objective_of_rank))


def sketch_gramian(
    objective_grads: Tensor,
    sketch_size: int,
    *,
    step: int = 0,
    bucket: int = 0,
    problem: int = 0,
) -> Tensor:
    """``Ĝ = (ΦA)(ΦA)ᵀ``: the Gramian of the objective gradients ``A`` (``[L, n]``) as
    ``BucketMOOState(protocol="sketch", sketch_size=k)`` estimates it for problem ``problem``
    (0 for a bucket, the parameter's position in its bucket with ``granularity="parameter"``) of
    bucket ``bucket`` at step ``step``: the same random map ``Φ`` (exact when ``n ≤ k``).
    ``A``'s elements must be in the engine's layout of the problem (DDP: the bucket's flat
    gradient)."""
    check_sketch_size(sketch_size, "sketch")
    compute = objective_grads.to(torch.promote_types(objective_grads.dtype, torch.float32))
    seed = problem_seed(step, bucket, problem)
    sketches = torch.stack([sketch(row, sketch_size, seed, _SIGNS) for row in compute])
    return gramian_of(sketches)


def combine(
    objective_grads: Tensor,
    weighting: WeightingSpec = "mgda",
    context: WeightingContext | None = None,
    *,
    present: Tensor | None = None,
    parameter_sizes: Sequence[int] | None = None,
    gramian: Tensor | None = None,
) -> Combination:
    """Weight the objective gradients ``[L, n]`` by ``weighting(G)``, ``G = A Aᵀ``, and sum them.

    With ``present`` (``[P, L]`` bool: objective ``ℓ`` used parameter ``p``; ``parameter_sizes``
    the ``P`` parameters' lengths, summing to ``n``), absent objectives are left out as the hook
    does with ``BucketMOOState(absent="exclude")`` (:mod:`bucketmoo_hooks._absent`): weights
    solved over the objectives present somewhere, and a parameter with fewer of them weighted
    by the weighting of ``G`` restricted to those. ``gramian``: weight this one instead of ``G``
    (e.g. :func:`sketch_gramian`'s estimate). The update keeps the dtype of ``objective_grads``.
    """
    resolved = get_weighting(weighting)
    compute = objective_grads.to(torch.promote_types(objective_grads.dtype, torch.float32))
    if gramian is None:
        gramian = gramian_of(compute)
    parameters = [(0, compute.shape[1])]
    if present is not None:
        parameters = _parameter_segments(parameter_sizes, compute.shape[1], present.shape[0])
        if partly_present(present) is not None:  # sub-problems need objective keys
            context = context or WeightingContext(0, 0, tuple(range(compute.shape[0])))
    weights, parameter_weights = solve_weights(
        resolved, gramian[None], present, [context], [0] * len(parameters)
    )
    assert weights is not None
    if parameter_weights is None:
        update = combine_segments(weights, compute, [(0, compute.shape[1])], objective_grads.dtype)
    else:
        update = combine_segments(parameter_weights, compute, parameters, objective_grads.dtype)
    return Combination(update, gramian, weights[0])


def _parameter_segments(
    parameter_sizes: Sequence[int] | None, numel: int, count: int
) -> list[tuple[int, int]]:
    sizes = [numel] if parameter_sizes is None else list(parameter_sizes)
    if len(sizes) != count or sum(sizes) != numel or any(size < 0 for size in sizes):
        raise ValueError(
            f"parameter_sizes must give the length of each of the {count} parameters of present, "
            f"summing to the gradient length {numel}; got {parameter_sizes!r}"
        )
    return row_segments(sizes)


def presence(
    grads: Tensor,
    objective_of_rank: Sequence[Hashable] | None = None,
    parameter_sizes: Sequence[int] | None = None,
) -> Tensor:
    """``[P, L]`` bool: objective ``ℓ`` present on parameter ``p`` of the rows ``grads``
    (``[R, n]``), i.e. some rank of ``ℓ`` has a nonzero gradient there (an unused parameter's
    gradient is zero-filled). Objectives in the order of :func:`objective_gradients`."""
    objective_map = _objective_map(grads, objective_of_rank)
    sizes = [grads.shape[1]] if parameter_sizes is None else list(parameter_sizes)
    parameters = _parameter_segments(sizes, grads.shape[1], len(sizes))
    averaging = objective_map.averaging_matrix(grads.device)
    return presence_counts(grads, averaging, parameters) > 0


def bucket_update(
    grads: Tensor,
    objective_of_rank: Sequence[Hashable] | None = None,
    weighting: WeightingSpec = "mgda",
    *,
    step: int = 0,
    bucket: int = 0,
    problem: tuple[int, ...] | None = (),
    segment: int | None = None,
    parameter_sizes: Sequence[int] | None = None,
    absent: str = "exclude",
    sketch_size: int | None = None,
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
        parameter_sizes: The lengths of the bucket's parameters, in bucket order (default: one
            parameter), for telling on which ones an objective is absent.
        absent: As for :class:`BucketMOOState`: ``"exclude"`` leaves out, per parameter, the
            objectives none of whose rows has a nonzero gradient there; ``"zero"`` counts them.
        sketch_size: As for ``BucketMOOState(protocol="sketch")``: weight the Gramian estimated
            with the hook's random sketch of this step, bucket and segment
            (:func:`sketch_gramian`); ``None`` (default): the exact Gramian.

    Returns:
        The combined update ``[n]`` in the dtype of ``grads``.
    """
    objective_grads, objective_map = objective_gradients(grads, objective_of_rank)
    context = WeightingContext(step, bucket, objective_map.objectives, segment, problem)
    gramian = None
    if sketch_size is not None:
        gramian = sketch_gramian(
            objective_grads, sketch_size, step=step, bucket=bucket, problem=segment or 0
        )
    present = None
    if check_absent(absent) == "exclude":
        present = presence(grads, objective_of_rank, parameter_sizes)
        parameter_sizes = parameter_sizes or [grads.shape[1]]
    combination = combine(
        objective_grads,
        weighting,
        context,
        present=present,
        parameter_sizes=parameter_sizes,
        gramian=gramian,
    )
    return combination.update.to(grads.dtype)


def model_update(
    grads: Tensor,
    bucket_sizes: Sequence[int],
    objective_of_rank: Sequence[Hashable] | None = None,
    weighting: WeightingSpec = "mgda",
    *,
    step: int = 0,
    parameter_sizes: Sequence[int] | None = None,
    absent: str = "exclude",
    sketch_size: int | None = None,
) -> Tensor:
    """Update of a whole flat gradient ``[R, N]`` split into consecutive independent problems.

    ``bucket_sizes`` must sum to ``N``; every piece gets its own weights. It expresses every
    granularity of the hook: DDP's bucket sizes for ``"bucket"``, the parameter sizes for
    ``"parameter"`` (each parameter is solved on its own), ``[N]`` for ``"global"``.
    ``parameter_sizes`` (default: each piece is one parameter) splits the pieces into parameters,
    on which objectives may be absent (``absent``, as in :func:`bucket_update`); every piece must
    hold whole parameters. ``sketch_size``: as in :func:`bucket_update` (piece ``i`` is
    bucket ``i``).
    """
    if any(size <= 0 for size in bucket_sizes) or sum(bucket_sizes) != grads.shape[-1]:
        raise ValueError(
            f"bucket_sizes must be positive and sum to the gradient length {grads.shape[-1]}, "
            f"got {list(bucket_sizes)}"
        )
    pieces = _parameters_of_pieces(bucket_sizes, parameter_sizes)
    parts = torch.split(grads, list(bucket_sizes), dim=1)
    resolved = get_weighting(weighting)  # one instance for every piece
    return torch.cat(
        [
            bucket_update(
                part,
                objective_of_rank,
                resolved,
                step=step,
                bucket=i,
                problem=(i,),
                parameter_sizes=sizes,
                absent=absent,
                sketch_size=sketch_size,
            )
            for i, (part, sizes) in enumerate(zip(parts, pieces, strict=True))
        ]
    )


def _parameters_of_pieces(
    bucket_sizes: Sequence[int], parameter_sizes: Sequence[int] | None
) -> list[list[int]]:
    """The parameter lengths of each piece of ``bucket_sizes``."""
    if parameter_sizes is None:
        return [[size] for size in bucket_sizes]
    bounds = list(itertools.accumulate(bucket_sizes))
    pieces: list[list[int]] = [[] for _ in bucket_sizes]
    offset = 0
    for size in parameter_sizes:
        # The piece the parameter starts in (a zero-size one at the very end: the last piece).
        piece = min(bisect.bisect_right(bounds, offset), len(bounds) - 1)
        if size < 0 or offset + size > bounds[piece]:
            break
        pieces[piece].append(size)
        offset += size
    else:
        if offset == bounds[-1]:
            return pieces
    raise ValueError(
        f"parameter_sizes {list(parameter_sizes)} must split every piece of bucket_sizes "
        f"{list(bucket_sizes)} into whole parameters"
    )
