"""What the kernel tests share (CPU emulator and GPU): inputs, float64 references, tolerances."""

from collections.abc import Sequence

import torch

from bucketmoo_hooks import ObjectiveMap
from bucketmoo_hooks.weightings import WeightingContext

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
