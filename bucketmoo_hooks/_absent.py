r"""Absent objectives: parameters that some objectives did not use (docs/design.md §9).

A language adapter, a language head or a language embedding is used by the ranks of one
objective only. DDP (``find_unused_parameters=True``), FSDP and the reference see its gradient
as zero on every other rank, but for those objectives the parameter is *absent*, not a zero
gradient: as a zero row, MGDA's min-norm point of ``{0, g}`` would be 0 and the adapter would
never train.

The rule (``BucketMOOState(absent="exclude")``, the default). Objective ``ℓ`` is present on
parameter ``p`` when some rank of ``ℓ`` has a nonzero gradient for ``p`` (an unused parameter's
gradient is zero-filled). For each problem (a bucket, a parameter, the model) with Gramian ``G``:

1. The problem's weights are the weighting on ``G`` restricted to the objectives present on at
   least one of its parameters, ``w = weighting(G[P, P])``; the others get weight 0. When every
   objective is present this is the ordinary solve, so parameters on which every objective is
   present get what ``absent="zero"`` gives them.
2. A parameter on which only ``Π_p ⊊ P`` are present gets the weighting on ``G[Π_p, Π_p]``
   (solved once per distinct ``Π_p`` in the problem, with its own state for stateful
   weightings; the solves of all problems over the same objectives form one batch):
   ``d_p = Σ_{ℓ∈Π_p} w^{Π_p}_ℓ ḡ_ℓ``. With one objective present, ``d_p = ḡ_ℓ``: exactly that
   objective's average gradient (the scaling contract), whatever the weighting.

DDP's plain average gives such a parameter ``(m_ℓ/R) ḡ_ℓ`` instead (half of it with two equal
language groups). ``absent="zero"`` keeps DDP's convention: absent objectives count as zero
gradients, as if every parameter were shared.
"""

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor

from ._device_path import to_device
from ._linalg import Segment
from .weightings import Weighting, WeightingContext

#: Values of ``BucketMOOState(absent=...)``.
ABSENT_CHOICES = ("exclude", "zero")


def check_absent(choice: object) -> str:
    if not isinstance(choice, str) or choice not in ABSENT_CHOICES:
        raise ValueError(
            f"absent must be one of {ABSENT_CHOICES} ('exclude': an objective that did not use a "
            f"parameter is left out there; 'zero': DDP's convention, its zero gradient counts), "
            f"got {choice!r}"
        )
    return choice


def presence_counts(rows: Tensor, averaging: Tensor, segments: Sequence[Segment]) -> Tensor:
    """``[P, L]`` fp32: for each parameter, how many ranks of each objective have a nonzero
    gradient in it, within ``rows`` (``[R, c]``, row ``r`` = rank ``r``'s gradient or slice).

    Summed over the slices of all ranks (an all-reduce), a count above 0 means present. A NaN
    counts as nonzero, so a non-finite gradient still reaches the update.
    """
    ranks = rows.shape[0]
    # max and min rather than the max of |x|: no temporary copy of the slice, 3-5x faster on CPU.
    touched = torch.stack(
        [
            (rows[:, lo:hi].amax(dim=1) != 0) | (rows[:, lo:hi].amin(dim=1) != 0)
            if hi > lo
            else rows.new_zeros(ranks, dtype=torch.bool)
            for lo, hi in segments
        ]
    )
    members = (averaging != 0).to(torch.float32)  # [L, R]: rank r trains objective ℓ
    return touched.to(torch.float32) @ members.T


def touched(piece: Tensor) -> Tensor:
    """0-d bool: some element of ``piece`` (one rank's gradient of a parameter) is nonzero; a
    NaN counts. On the device: no host synchronisation."""
    if piece.numel() == 0:
        return torch.zeros((), dtype=torch.bool, device=piece.device)
    return (piece.amax() != 0) | (piece.amin() != 0)


def partly_present(counts: Tensor) -> Tensor | None:
    """``[P, L]`` presence on the host from all-reduced counts, or ``None`` when no parameter
    has some objectives but not others (then nothing changes from the ordinary solve)."""
    present = counts.cpu() > 0
    if bool((present.all(dim=1) | ~present.any(dim=1)).all()):
        return None
    return present


def solve_weights(
    weighting: Weighting,
    gramians: Tensor,
    counts: Tensor | None,
    contexts: Sequence[WeightingContext],
    problems: Sequence[int],
    solved_later: bool = False,
) -> tuple[Tensor | None, Tensor | None]:
    """Step 5: the weights of every problem, over the objectives present on it.

    Args:
        gramians: ``[S, L, L]``, one per problem, solved with ``contexts[s]``.
        counts: ``[P, L]`` presence counts of the problems' parameters (``> 0``: present; a
            bool tensor will do), or ``None``: every objective is present everywhere.
        problems: The problem of each of the ``P`` parameters.
        solved_later: The combination solves the weighting itself (the fused kernels): return
            ``None`` weights unless presence calls for per-parameter ones.

    Returns:
        ``[S, L]`` problem weights, and ``[P, L]`` per-parameter weights or ``None`` when every
        parameter has all of its problem's objectives (:func:`solve_present`).
    """
    present = None if counts is None else partly_present(counts)
    if present is not None:
        return solve_present(weighting, gramians, contexts, present, problems)
    if solved_later:
        return None, None
    return weighting.solve(gramians, contexts), None


def solve_present(
    weighting: Weighting,
    gramians: Tensor,
    contexts: Sequence[WeightingContext],
    present: Tensor,
    problems: Sequence[int],
) -> tuple[Tensor, Tensor | None]:
    """Weights of every problem over its present objectives, and of every parameter over its own.

    Args:
        gramians: ``[S, L, L]``, one per problem.
        contexts: One weighting context per problem.
        present: ``[P, L]`` bool on the host: objective ``ℓ`` present on parameter ``p``.
        problems: The problem of every parameter.

    Returns:
        ``[S, L]``: each problem's weights over the objectives present on it (0 for the others),
        and ``[P, L]`` per-parameter weights, or ``None`` when every parameter has all of its
        problem's objectives (then the problem weights apply as they are).
    """
    num_problems, num_objectives = gramians.shape[:2]
    rows = [tuple(row) for row in present.tolist()]
    of_problem = [(False,) * num_objectives for _ in range(num_problems)]
    for row, problem in zip(rows, problems, strict=True):
        of_problem[problem] = tuple(a or b for a, b in zip(of_problem[problem], row, strict=True))
    # Every (problem, pattern) to solve: each problem over its objectives, each parameter over
    # its own (a parameter no objective touched has a zero update whatever its weights).
    needed = list(enumerate(of_problem))
    needed += [(p, row) for row, p in zip(rows, problems, strict=True) if any(row)]
    by_pattern: dict[tuple[bool, ...], list[int]] = {}
    for problem, pattern in dict.fromkeys(needed):
        by_pattern.setdefault(pattern, []).append(problem)
    solved: dict[tuple[int, tuple[bool, ...]], Tensor] = {}
    for pattern, members in by_pattern.items():
        weights = _solve_pattern(weighting, gramians, contexts, pattern, members, of_problem)
        solved.update(zip(((p, pattern) for p in members), weights, strict=True))

    problem_weights = torch.stack([solved[p, pattern] for p, pattern in enumerate(of_problem)])
    if all(row == of_problem[p] or not any(row) for row, p in zip(rows, problems, strict=True)):
        return problem_weights, None
    return problem_weights, torch.stack(
        [
            solved[p, row] if any(row) else problem_weights[p]
            for row, p in zip(rows, problems, strict=True)
        ]
    )


def _solve_pattern(
    weighting: Weighting,
    gramians: Tensor,
    contexts: Sequence[WeightingContext],
    pattern: tuple[bool, ...],
    members: list[int],
    of_problem: list[tuple[bool, ...]],
) -> Tensor:
    """``[len(members), L]``: the weighting on the Gramians of the problems ``members``
    restricted to the objectives of ``pattern``, solved as one batch (0 for the others)."""
    num_problems, num_objectives = gramians.shape[:2]
    device = gramians.device
    keep = [i for i, here in enumerate(pattern) if here]
    if not keep:  # every gradient is zero there: nothing to weigh (as for G = 0)
        return gramians.new_full((len(members), num_objectives), 1.0 / num_objectives)
    if members == list(range(num_problems)):
        batch = gramians
    else:
        batch = gramians.index_select(0, to_device(torch.tensor(members), device))
    if len(keep) == num_objectives:
        return weighting.solve(batch, [contexts[p] for p in members])
    index = to_device(torch.tensor(keep), device)
    if len(keep) == 1:  # exactly the objective's gradient (every weighting gives 1)
        sub_weights = batch.new_ones(len(members), 1)
    else:
        sub = batch.index_select(1, index).index_select(2, index)
        sub_contexts = [_sub_context(contexts[p], keep, pattern, of_problem[p]) for p in members]
        sub_weights = weighting.solve(sub, sub_contexts)
    return batch.new_zeros(len(members), num_objectives).index_copy(1, index, sub_weights)


def _sub_context(
    context: WeightingContext,
    keep: list[int],
    pattern: tuple[bool, ...],
    of_problem: tuple[bool, ...],
) -> WeightingContext:
    """The context of a solve over the objectives ``keep``: their keys; for a subset of the
    problem's objectives, a problem key of its own (stateful weightings keep state per key, and
    the pattern's solve must not advance the problem's)."""
    objectives = tuple(context.objectives[i] for i in keep)
    problem = context.problem
    if pattern != of_problem and problem is not None:
        problem = (*problem, -1, *objectives)  # -1: no parameter position
    return replace(context, objectives=objectives, problem=problem)
