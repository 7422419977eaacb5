"""How separable languages are in a layer's hidden states: a linear probe and a variance ratio.

Used by ``scripts/finetune_multilingual.py --probe`` to compare, layer by layer, how much
language-specific structure plain DDP and bucket-level MOO leave in the representations.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["language_separability"]


def language_separability(
    features: dict[str, Tensor], iterations: int = 100, weight_decay: float = 1e-3
) -> dict[str, float]:
    """Separability of languages from one layer's features.

    Args:
        features: ``{language: [n, d]}``, e.g. mean-pooled hidden states of ``n`` text windows.
            Every language needs at least 2 rows.
        iterations: L-BFGS iterations of the probe.
        weight_decay: L2 penalty of the probe (on standardised features).

    Returns:
        ``probe_accuracy``: a multinomial logistic regression trained on the even rows of every
        language and tested on the odd rows (chance = 1 / languages); ``variance_ratio``: the
        share of the total feature variance that the language means explain (between-language
        over total sum of squares, 0 = no language structure, 1 = each language a point).
    """
    if len(features) < 2 or any(f.ndim != 2 or f.shape[0] < 2 for f in features.values()):
        raise ValueError("need >= 2 languages with >= 2 feature rows [n, d] each")
    x = torch.cat([f.double() for f in features.values()])
    y = torch.cat([torch.full((len(f),), i) for i, f in enumerate(features.values())])
    centred = x - x.mean(dim=0)
    total = centred.square().sum()
    means = torch.stack([centred[y == i].mean(dim=0) for i in range(len(features))])
    between = sum((y == i).sum() * means[i].square().sum() for i in range(len(features)))
    ratio = float(between / total.clamp_min(1e-300))

    even = torch.cat([torch.arange(len(f)) % 2 == 0 for f in features.values()])
    scale = centred[even].std(dim=0).clamp_min(1e-12)
    z = centred / scale
    linear = torch.nn.Linear(z.shape[1], len(features), dtype=torch.float64)
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=iterations)

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(z[even]), y[even])
        loss = loss + weight_decay * linear.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        accuracy = float((linear(z[~even]).argmax(dim=1) == y[~even]).double().mean())
    return {"probe_accuracy": accuracy, "variance_ratio": ratio}
