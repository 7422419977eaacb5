"""``BucketMOOState(nonfinite="raise")``: stop at a non-finite Gramian, naming where it came from.

The default (``"propagate"``) needs nothing: a non-finite gradient always reaches the update
(``d = wᵀA`` multiplies the offending column by a weight, and ``0·inf`` is NaN), so AMP's
``GradScaler`` skips the step. Raising instead costs one host synchronisation per bucket on a
GPU (reading whether the Gramian is finite). The Gramian is all-reduced, so every rank sees the
same one and raises at the same bucket.
"""

from collections.abc import Hashable, Mapping

import torch
from torch import Tensor

NONFINITE_POLICIES = ("propagate", "raise")


class NonFiniteGradientError(RuntimeError):
    """A bucket's (or FSDP unit's) Gramian is not finite: some objective's gradient has an inf or
    a NaN there, or their inner products overflow float32."""


def check_nonfinite(policy: object) -> str:
    if policy not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {policy!r}")
    return policy  # type: ignore[return-value]


def raise_if_nonfinite(
    gramians: Tensor,
    where: str,
    objectives: tuple[int, ...],
    averaging: Tensor,
    names: Mapping[int, Hashable],
) -> None:
    """Raise :class:`NonFiniteGradientError` if ``gramians`` (``[S, L, L]``) is not finite.

    Names the objectives whose squared norm (a diagonal entry) is not finite, with the ranks that
    train them (the nonzero columns of the averaging matrix ``M``).
    """
    if bool(torch.isfinite(gramians).all()):
        return
    diagonal = gramians.diagonal(dim1=-2, dim2=-1).reshape(-1, len(objectives))
    bad = (~torch.isfinite(diagonal)).any(dim=0).tolist()
    ranks = averaging.cpu() != 0
    culprits = [
        f"{names.get(key, f'key {key}')!r} (ranks {ranks[i].nonzero().flatten().tolist()})"
        for i, key in enumerate(objectives)
        if bad[i]
    ]
    what = (
        f"the gradient of objective {', '.join(culprits)} is not finite (inf or NaN)"
        if culprits
        else "the objectives' inner products overflow float32 (every gradient is finite)"
    )
    raise NonFiniteGradientError(
        f"{where}: {what}. BucketMOOState(nonfinite='raise') stops here; with the default "
        "'propagate' the non-finite values reach the update and AMP's GradScaler skips the step"
    )
