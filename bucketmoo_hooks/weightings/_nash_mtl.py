from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .._device_path import cpu_path
from ._base import BatchedWeighting, WeightingContext
from ._solvers import (
    check_iterations,
    diagonal,
    dot,
    matvec,
    noise_level,
    normalise_by_trace,
    positive_definite_ridge,
    quadratic,
    unit_gramian,
)
from ._tables import Lookup, ObjectiveTable, Problem, load_tables, tables_state

_NORMALIZATIONS = ("sum", "none")


class NashMTL(BatchedWeighting):
    r"""Nash-MTL: the Nash bargaining solution between the objectives.

    Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik & Fetaya 2022, "Multi-Task Learning as a
    Bargaining Game" (ICML). The update ``d = Σ_i α_i ḡ_i`` maximises ``Σ_i log⟨d, ḡ_i⟩`` over a
    ball; its weights solve ``α_i (Gα)_i = 1`` with ``α > 0`` (Theorem 5.1), i.e. they minimise the
    strictly convex

    .. math:: f(\alpha) = \tfrac12 \alpha^\top G \alpha - \textstyle\sum_i \log \alpha_i .

    Substituting ``α_i = β_i / ‖ḡ_i‖`` turns the equation into ``β_i (Cβ)_i = 1`` with ``C`` the
    Gramian of the unit gradients (the solution's direction does not depend on the gradients'
    lengths), which is what is solved: damped Newton steps ``β ← β − Δ/(1 + λ)`` (``Δ = H⁻¹∇f``,
    ``λ² = ∇fᵀΔ``, which keeps ``β > 0`` since ``f`` is self-concordant), each followed by the exact
    minimisation of ``f`` along the ray ``tβ``, in float64 on the Gramian's device with a fixed
    number of iterations. The paper solves the same equation by a sequence of convex programs
    (cvxpy); torchjd's ``NashMTL`` is that solver.

    ``C`` gets a ridge of its round-off (:func:`noise_level`, raised until ``C`` is numerically
    positive definite, :func:`positive_definite_ridge`): without it the equation has no
    solution when the gradients admit no direction that improves them all (``0`` in their convex
    hull), and with it the weights tend to the min-norm combination there, so ``d`` becomes tiny,
    as with MGDA. For ``L = 2``, ``C`` is symmetric under swapping the objectives, so ``β₀ = β₁``
    and ``w_i ∝ 1/‖ḡ_i‖``. An objective whose gradient is zero cannot gain or lose and gets
    weight 0; if every gradient is zero the weights are uniform.

    State: the last solution ``β`` of each problem (``context.problem``: a DDP bucket, a parameter
    or the model) and objective, by objective key, warm-starts the next solve, as in the paper's
    implementation; it is saved by :meth:`state_dict`. A call without a problem key starts cold.

    Args:
        iterations: Newton iterations; ``None`` means ``2L + 16``. From a cold start on random
            Gramians of rank 1 to ``L − 1`` (most without a bargaining solution, the slow case)
            the weights reach 1e-7 of their limit within 20, 25, 31 and 39 iterations for
            ``L`` = 4, 8, 16 and 32; full-rank ones within 10.
        normalization: ``"sum"`` (default) returns ``α / Σα``, so identical gradients give that
            gradient back (docs/design.md §4); ``‖d‖`` is then a weighted harmonic mean of the
            objectives' norms. ``"none"`` returns the paper's ``α``, for which ``‖d‖`` does not
            depend on the gradients' lengths (``√L`` for ``L`` identical gradients); torchjd
            further clips ``‖d‖`` to ``max_norm``.
    """

    name = "nash_mtl"
    description = "Nash bargaining solution α_i (Gα)_i = 1 (Navon et al. 2022)."

    def __init__(self, iterations: int | None = None, normalization: str = "sum") -> None:
        self.iterations = check_iterations(iterations)
        if normalization not in _NORMALIZATIONS:
            raise ValueError(
                f"normalization must be one of {_NORMALIZATIONS}, got {normalization!r}"
            )
        self.normalization = normalization
        self._starts: dict[Problem, ObjectiveTable] = {}

    def solve_batch(self, gramians: Tensor, contexts: Sequence[WeightingContext | None]) -> Tensor:
        num_objectives = gramians.shape[-1]
        c, inverse, nonzero = unit_problem(gramians)
        iterations = 2 * num_objectives + 16 if self.iterations is None else self.iterations
        tables, keys = [], []
        for context in contexts:
            problem = None if context is None else context.problem
            table = None if problem is None else self._starts.get(problem)
            if table is None:
                # A problem without a key starts cold, from a table of its own that is dropped.
                table = ObjectiveTable.empty(ndim=1)
                if problem is not None:
                    self._starts[problem] = table
            tables.append(table)
            keys.append(tuple(range(num_objectives)) if context is None else context.objectives)
        starts = Lookup.read(tables, keys, c.device, fill=1.0)
        beta = bargain(c, starts.values.view(inverse.shape), iterations, cpu_path(c.device))
        starts.write(beta)

        alpha = beta * inverse  # in trace-normalised units: 1/‖ḡ_i‖ relative to √tr G
        if self.normalization == "sum":
            total = alpha.sum(dim=-1, keepdim=True)
            weights = alpha / total.clamp_min(torch.finfo(torch.float64).tiny)
            weights = torch.where(nonzero, weights, 1.0 / num_objectives)
        else:
            trace = diagonal(gramians.to(torch.float64)).sum(dim=-1, keepdim=True)
            weights = alpha / torch.where(nonzero, trace, 1.0).sqrt()
        return weights.to(gramians.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {"starts": tables_state(self._starts, "beta")}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if set(state_dict) != {"starts"}:
            raise ValueError(f"not a NashMTL state: keys {sorted(state_dict)}")
        self._starts = load_tables(state_dict["starts"], "beta", ndim=1, owner="NashMTL")

    def __repr__(self) -> str:
        return f"NashMTL(iterations={self.iterations}, normalization={self.normalization!r})"


def unit_problem(gramian: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``C`` (the unit-gradient Gramian, positive definite), ``1/‖ḡ_i‖`` relative to ``√tr G`` (0
    for a zero gradient), and whether ``G ≠ 0``; float64, for a batch ``[..., L, L]``."""
    num_objectives = gramian.shape[-1]
    g, nonzero = normalise_by_trace(gramian)
    unit, inverse = unit_gramian(g)
    live = inverse > 0
    eye = torch.eye(num_objectives, dtype=g.dtype, device=g.device)
    # Objectives with a zero gradient get the row of an uncoupled objective (β_i = 1).
    c = torch.where(live.unsqueeze(-1) & live.unsqueeze(-2), unit, eye)
    c = c + positive_definite_ridge(c, noise_level(gramian.dtype, num_objectives)) * eye
    return c, inverse, nonzero


def bargain(c: Tensor, start: Tensor, iterations: int, stop_at_fixed_point: bool) -> Tensor:
    r"""``β > 0`` with ``β_i (Cβ)_i = 1`` for a positive definite ``C``, from ``start > 0``.

    Minimises ``f(β) = ½βᵀCβ − Σ log β_i`` by damped Newton steps, each followed by the optimal
    scaling ``t* = √(L / βᵀCβ)`` of ``f(tβ)``. Fixed work and no host synchronisation, except the
    optional stop at an exact fixed point (taken on the CPU only, where it costs nothing).
    """
    num_objectives = c.shape[-1]
    beta = start * (num_objectives / quadratic(c, start)).sqrt()
    for _ in range(iterations):
        gradient = matvec(c, beta) - 1.0 / beta
        hessian = c + torch.diag_embed(1.0 / (beta * beta))
        step = torch.linalg.solve_ex(hessian, gradient)[0]
        decrement = dot(gradient, step).clamp_min(0.0).sqrt()
        # 1/(1 + λ) keeps β > 0 in exact arithmetic; the cap keeps it there under round-off.
        largest = (step / beta).amax(dim=-1, keepdim=True).clamp_min(0.0)
        damping = torch.minimum(1.0 / (1.0 + decrement), 0.9 / largest)
        new = beta - damping * step
        new = new * (num_objectives / quadratic(c, new)).sqrt()
        if stop_at_fixed_point and torch.equal(new, beta):
            break
        beta = new
    return beta
