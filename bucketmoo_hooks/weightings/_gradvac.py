from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ._base import BatchedWeighting, WeightingContext
from ._pcgrad import PCGrad
from ._solvers import diagonal, matvec, normalise_by_trace
from ._tables import Lookup, ObjectiveTable, Problem, load_tables, tables_state


class GradVac(BatchedWeighting):
    r"""Gradient Vaccine: align every objective gradient towards an EMA target cosine.

    Wang, Tsvetkov, Firat & Cao 2021, "Gradient Vaccine: Investigating and Improving Multi-task
    Optimization in Massively Multilingual Models" (ICLR), Algorithm 1. Every objective gradient
    in turn visits the others in a random order; when its cosine with ``ḡ_j`` is below the target
    ``φ̂_ij``, it is moved towards ``ḡ_j`` until the cosine equals the target,

    .. math:: g_i' \leftarrow g_i' + \frac{\|g_i'\|\,\bigl(\hat\phi_{ij}\sqrt{1-\phi_{ij}^2}
              - \phi_{ij}\sqrt{1-\hat\phi_{ij}^2}\bigr)}{\|\bar g_j\|\sqrt{1-\hat\phi_{ij}^2}}
              \,\bar g_j \quad\text{if } \phi_{ij} = \cos(g_i', \bar g_j) < \hat\phi_{ij},

    and the target follows ``φ̂_ij ← (1 − β) φ̂_ij + β φ_ij``. With ``φ̂ = 0`` this is PCGrad's
    projection. The update is ``d = (1/L) Σ_i g_i'`` (the paper sums; the mean keeps identical
    gradients unchanged, docs/design.md §4).

    The targets are kept per problem (``context.problem``: a DDP bucket, a parameter, or the
    model, as in the paper's per-layer-group variant and LibMTL's implementation) and per ordered
    objective pair, by objective key, so they survive per-step language sampling and DDP's bucket
    rebuild, and are saved by :meth:`state_dict`. Targets start at 0. The projections are tracked
    as coefficients on the ``ḡ_k`` exactly as in :class:`PCGrad` (same order, same guards), in
    float64 on the Gramian's device with no host synchronisation.

    Args:
        beta: EMA rate of the targets (0.01 in the paper).
        seed: Seeds the visiting order, as :class:`PCGrad` (must be equal on all ranks).
    """

    name = "gradvac"
    description = "Moves each gradient towards an EMA target cosine per pair (Wang 2021)."

    def __init__(self, beta: float = 0.01, seed: int = 0) -> None:
        if isinstance(beta, bool) or not isinstance(beta, int | float) or not 0 < beta <= 1:
            raise ValueError(f"beta must be a number in (0, 1], got {beta!r}")
        self.beta = float(beta)
        self._order = PCGrad(seed)
        self._targets: dict[Problem, ObjectiveTable] = {}

    def solve_batch(self, gramians: Tensor, contexts: Sequence[WeightingContext | None]) -> Tensor:
        num_objectives = gramians.shape[-1]
        if any(context is not None and context.problem is None for context in contexts):
            raise ValueError(
                "gradvac keeps targets per bucket and needs stable bucket keys: register the "
                "hook with bucketmoo_hooks.install_bucket_moo(model, state)"
            )
        tables, keys = [], []
        for context in contexts:
            problem = None if context is None else context.problem
            table = self._targets.get(problem)
            if table is None:
                table = self._targets[problem] = ObjectiveTable.empty(ndim=2)
            tables.append(table)
            keys.append(tuple(range(num_objectives)) if context is None else context.objectives)
        g, _ = normalise_by_trace(gramians)
        lookup = Lookup.read(tables, keys, g.device, fill=0.0)
        target = lookup.values.view(g.shape)

        ranks = self._order.batch_visiting_ranks(num_objectives, contexts, g.device).view(g.shape)
        coefficients = torch.eye(num_objectives, dtype=g.dtype, device=g.device).expand_as(g)
        norms_j_squared = diagonal(g)
        for position in range(num_objectives - 1):
            visited = (ranks == position).to(g.dtype)  # visited[s, i, j]: i visits j now
            products = coefficients @ g  # ⟨g_i', ḡ_k⟩
            inner = (products * visited).sum(dim=-1)
            norm_i = (products * coefficients).sum(dim=-1).clamp_min(0.0).sqrt()
            norm_j = matvec(visited, norms_j_squared).clamp_min(0.0).sqrt()
            scale = norm_i * norm_j
            nonzero = scale > 0
            cosine = torch.where(nonzero, inner / scale.clamp_min(1e-300), 0.0).clamp(-1.0, 1.0)
            goal = (target * visited).sum(dim=-1)
            room = (1 - goal * goal).clamp_min(1e-12).sqrt()
            step = norm_i * (goal * (1 - cosine * cosine).sqrt() - cosine * room)
            step = step / (norm_j.clamp_min(1e-300) * room)
            step = torch.where(nonzero & (cosine < goal), step, 0.0)
            coefficients = coefficients + step.unsqueeze(-1) * visited
            moved = (1 - self.beta) * goal + self.beta * cosine
            target = torch.where(
                visited.bool() & nonzero.unsqueeze(-1), moved.unsqueeze(-1), target
            )
        lookup.write(target)
        return coefficients.mean(dim=-2).to(gramians.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {"targets": tables_state(self._targets, "cosines")}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if set(state_dict) != {"targets"}:
            raise ValueError(f"not a GradVac state: keys {sorted(state_dict)}")
        self._targets = load_tables(state_dict["targets"], "cosines", ndim=2, owner="GradVac")

    def __repr__(self) -> str:
        return f"GradVac(beta={self.beta}, seed={self._order.seed})"
