from collections.abc import Sequence

import torch
from torch import Tensor

from .._device_path import to_device
from ._base import BatchedWeighting, WeightingContext
from ._solvers import diagonal, normalise_by_trace

_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF


class PCGrad(BatchedWeighting):
    r"""PCGrad: projects conflicting gradients ("gradient surgery"), as weights on the gradients.

    Yu, Kumar, Gupta, Levine, Hausman & Finn 2020, "Gradient Surgery for Multi-Task Learning"
    (NeurIPS), Algorithm 1: every objective gradient in turn is projected off each other objective
    gradient it conflicts with, visiting the others in a random order,

    .. math:: g_i' \leftarrow g_i' - \frac{\min(\langle g_i', \bar g_j\rangle, 0)}
              {\|\bar g_j\|^2}\, \bar g_j \quad (j \ne i,\ \text{random order}), \qquad
              d = \frac1L \textstyle\sum_i g_i'.

    The projections are tracked as coefficients, ``g_i' = Σ_k C_ik ḡ_k`` (``C = I`` at the start),
    so only the Gramian is needed: ``⟨g_i', ḡ_j⟩ = (C G)_ij``; the weights are the column means of
    ``C``. All ``L`` objectives are projected at once, one position of their orders per step
    (``L − 1`` steps, each an ``L×L`` matmul and elementwise work; float64, no host sync).

    Normalisation: the paper sums the projected gradients (``d = Σ_i g_i'``, as torchjd does);
    here they are averaged so that identical gradients give that gradient back
    (docs/design.md §4), i.e. the weights are the paper's divided by ``L``.

    Random order: every objective ``i`` visits the others in the order of 32-bit keys drawn from
    a counter-based generator (a SplitMix64 mix of ``(seed, step, bucket)`` in Python integers,
    then a bijective 32-bit integer hash of ``(i, j)`` evaluated with int64 tensor ops on the
    Gramian's device). It is therefore identical on every rank and every device, needs no host
    round trip, and changes with ``context.step``, ``context.bucket`` and, with per-parameter
    granularity, ``context.segment`` (``step = bucket = 0`` without a context). Because the order
    depends on the objectives' positions, PCGrad is not permutation equivariant for ``L ≥ 3``
    (nor is the paper's method).

    Guard: a projection coefficient is clamped so that ``|⟨g_i', ḡ_j⟩| ≤ ‖g_i'‖ ‖ḡ_j‖``
    (Cauchy–Schwarz, exact for a true Gramian), so round-off in the Gramian of a near-zero
    gradient cannot blow a coefficient up; a zero gradient is never projected off. A zero Gramian
    therefore gives ``C = I``, the uniform weights ``1/L``.

    Args:
        seed: Seeds the random orders (must be the same on every rank).
    """

    name = "pcgrad"
    description = "Projects each gradient off the ones it conflicts with, random order (Yu 2020)."

    def __init__(self, seed: int = 0) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.seed = seed

    def visiting_ranks(
        self, num_objectives: int, context: WeightingContext | None, device: torch.device | str
    ) -> Tensor:
        """``R[i, j]``: the position at which objective ``i`` visits objective ``j`` (``R[i, i]`` is
        ``L − 1``, never visited). ``R[i].argsort()`` is objective ``i``'s order."""
        return self.batch_visiting_ranks(num_objectives, [context], torch.device(device))[0]

    def batch_visiting_ranks(
        self,
        num_objectives: int,
        contexts: Sequence[WeightingContext | None],
        device: torch.device,
    ) -> Tensor:
        """:meth:`visiting_ranks` of every context, ``[S, L, L]``, in one set of device ops (the
        seeds are mixed on the host and copied once)."""
        halves = []
        for context in contexts:
            if context is None:
                base = _mix(self.seed, 0, 0)
            else:
                segment = getattr(context, "segment", None)
                parts = (context.step, context.bucket) + (() if segment is None else (segment,))
                base = _mix(self.seed, *parts)
            halves.append((base & _MASK32, base >> 32))
        low, high = to_device(torch.tensor(halves, dtype=torch.int64), device).unbind(dim=1)
        counter = torch.arange(num_objectives * num_objectives, device=device, dtype=torch.int64)
        keys = _hash32(_hash32(counter ^ low[:, None]) ^ high[:, None])
        keys = keys.reshape(len(contexts), num_objectives, num_objectives)
        # The hash is a bijection on 32-bit integers, so keys are distinct; the diagonal goes last.
        diagonal(keys).fill_(1 << 40)
        return (keys.unsqueeze(-2) < keys.unsqueeze(-1)).sum(dim=-1)

    def solve_batch(self, gramians: Tensor, contexts: Sequence[WeightingContext | None]) -> Tensor:
        num_objectives = gramians.shape[-1]
        g, _ = normalise_by_trace(gramians)
        ranks = self.batch_visiting_ranks(num_objectives, contexts, g.device).view(g.shape)
        positions = torch.arange(num_objectives - 1, device=g.device)
        # visited[t, ..., i] is the one-hot of the objective j that objective i visits at step t.
        visited = (ranks == positions.view(-1, *(1,) * ranks.dim())).to(g.dtype)
        squared_norms = (visited * diagonal(g).unsqueeze(-2)).sum(dim=-1)  # ‖ḡ_j‖², [steps, S, L]
        inverse_norms = torch.where(
            squared_norms > 0, 1.0 / squared_norms.clamp_min(1e-300), 0.0
        )  # a zero gradient is never projected off
        coefficients = torch.eye(num_objectives, dtype=g.dtype, device=g.device).expand_as(g)
        for step_visited, norm_j, inverse_j in zip(
            visited, squared_norms, inverse_norms, strict=True
        ):
            products = coefficients @ g  # (C G)_ik = ⟨g_i', ḡ_k⟩
            inner = (products * step_visited).sum(dim=-1)
            norm_i = (products * coefficients).sum(dim=-1).clamp_min(0.0)
            inner = torch.maximum(inner, -torch.sqrt(norm_i * norm_j)).clamp(max=0.0)
            coefficients = torch.addcmul(
                coefficients, (inner * inverse_j).unsqueeze(-1), step_visited, value=-1.0
            )
        return coefficients.mean(dim=-2).to(gramians.dtype)

    def __repr__(self) -> str:
        return f"PCGrad(seed={self.seed})"


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _mix(*values: int) -> int:
    """A 64-bit mix of integers (Python arithmetic: exact, the same on every rank, no ``hash``)."""
    state = 0
    for value in values:
        state = _splitmix64(state ^ (value & _MASK64))
    return state


def _hash32(x: Tensor) -> Tensor:
    """A bijective 32-bit integer hash on int64 tensors holding values in ``[0, 2³²)``.

    Multipliers stay below 2³¹ so no int64 product overflows: bit-identical on every device.
    """
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    return (x >> 16) ^ x
