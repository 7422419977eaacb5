"""Gramians of structured families of gradients, shared by the weighting and kernel tests."""

import torch

KINDS = ("gaussian", "shared_component", "low_rank", "duplicated", "spread_norms", "conflicting")


def gramian_of(kind: str, num_objectives: int, seed: int, dim: int = 200) -> torch.Tensor:
    """A Gramian of ``num_objectives`` gradients of one structured family."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    if kind == "gaussian":
        grads = randn(num_objectives, dim)
    elif kind == "shared_component":  # mostly aligned, as languages usually are
        grads = 3 * randn(1, dim) + randn(num_objectives, dim)
    elif kind == "low_rank":
        grads = randn(num_objectives, 2) @ randn(2, dim)
    elif kind == "duplicated":
        base = randn(num_objectives // 2 + 1, dim)
        grads = torch.cat([base, base[: num_objectives - base.shape[0]]])
    elif kind == "spread_norms":
        grads = randn(num_objectives, dim) * torch.logspace(-3, 3, num_objectives)[:, None]
    else:  # two opposed camps
        camp = randn(1, dim)
        signs = torch.where(torch.rand(num_objectives, 1, generator=generator) < 0.5, 1.0, -1.0)
        grads = 0.3 * randn(num_objectives, dim) + signs * camp
    return (grads @ grads.T).float()
