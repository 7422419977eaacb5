"""What the kernel tests share (CPU emulator and GPU): inputs, float64 references, tolerances."""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from bucketmoo_hooks import ObjectiveMap
from bucketmoo_hooks._absent import solve_weights
from bucketmoo_hooks._core import weigh_and_combine
from bucketmoo_hooks._protocol import Bucket, Gradient, Request
from bucketmoo_hooks._shard import exchange_shards
from bucketmoo_hooks.weightings import Weighting, WeightingContext

Segments = Sequence[tuple[int, int]] | None


def bucket(
    ids: list[int], columns: int, dtype: torch.dtype, seed: int = 0, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, ObjectiveMap]:
    """A received block S ``[R, c]`` whose rows share a component (languages mostly agree), the
    averaging matrix M of ``ids`` and their map."""
    generator = torch.Generator(device).manual_seed(seed)
    shared = torch.randn(1, columns, generator=generator, device=device)
    shards = shared + torch.randn(len(ids), columns, generator=generator, device=device)
    objective_map = ObjectiveMap.from_ids(ids)
    return shards.to(dtype), objective_map.averaging_matrix(device), objective_map


def contexts_for(objective_map: ObjectiveMap, segments: Segments) -> list[WeightingContext]:
    count = 1 if segments is None else len(segments)
    return [WeightingContext(0, 0, objective_map.objectives, segment=s) for s in range(count)]


def exact_gramians(shards: torch.Tensor, averaging: torch.Tensor, segments: Segments):
    """The segments' Gramians of A = M S in float64."""
    objectives = averaging.double() @ shards.double()
    whole = [(0, shards.shape[1])] if segments is None else segments
    return torch.stack([objectives[:, lo:hi] @ objectives[:, lo:hi].T for lo, hi in whole])


def gramian_error(gramians: torch.Tensor, exact: torch.Tensor) -> float:
    """Largest |G − G_exact| relative to ‖ā_ℓ‖‖ā_k‖ (0 for zero gradients)."""
    norms = exact.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt()
    scale = (norms[:, :, None] * norms[:, None, :]).clamp_min(1e-300)
    return ((gramians.double() - exact).abs() / scale).max().item()


def assert_gramians_close(gramians: torch.Tensor, exact: torch.Tensor, tolerance: float) -> None:
    assert torch.equal(gramians, gramians.transpose(1, 2))
    assert gramian_error(gramians, exact) <= tolerance


def assert_update_close(update: torch.Tensor, expected: torch.Tensor) -> None:
    """fp32: round-off of a sum of L products; bf16/fp16: at most one rounding step apart."""
    assert update.dtype == expected.dtype and update.shape == expected.shape
    eps = torch.finfo(update.dtype).eps
    scale = expected.float().abs().max().clamp_min(1e-30).item()
    torch.testing.assert_close(
        update.float(), expected.float(), rtol=eps, atol=(1e-5 if eps < 1e-6 else eps) * scale
    )


class LocalComm:
    """One process: the all-reduce of the Gramians is the identity."""

    class Done:
        def wait(self) -> None:
            pass

    def all_reduce(self, tensor: torch.Tensor) -> "LocalComm.Done":
        return self.Done()

    all_reduce_unit = all_reduce


@dataclass(frozen=True)
class Solved:
    update: torch.Tensor
    gramians: torch.Tensor
    weights: torch.Tensor


def solve_shards(
    comm: object,
    shards: torch.Tensor,
    averaging: torch.Tensor,
    weighting: Weighting,
    contexts: Sequence[WeightingContext],
    segments: Segments,
    kernels: str,
) -> Solved:
    """Steps 2–6 of the shard protocol on a given slice ``S_j`` (every segment a problem, or the
    slice one problem), as the core runs them: phase 1, the weights, phase 2's combination."""
    per_parameter = segments is not None
    parameters = list(segments) if per_parameter else [(0, shards.shape[1])]
    bucket = Bucket(0, "bucket 0", None, [None] * len(parameters))
    request = Request(0, bucket, per_parameter, presence=False, kernels=kernels, workspace=None)
    # A reduce-scatter's shape: phase 2 would write the [c] output.
    gradient = Gradient(shards.reshape(-1), shards.new_empty(shards.shape[1]), [])
    exchange = exchange_shards(comm, gradient, shards, averaging, parameters, request)
    weights, update = weigh_and_combine(weighting, exchange, contexts, range(len(contexts)))
    return Solved(update, exchange.gramians, weights)


def problem_weights(
    weighting: Weighting, gramians: torch.Tensor, contexts: Sequence[WeightingContext]
) -> torch.Tensor:
    """Step 5 as the core runs it, every objective present: ``[S, L]``."""
    weights, _ = solve_weights(weighting, gramians, None, contexts, [])
    assert weights is not None
    return weights
