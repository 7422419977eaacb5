"""Bucket-level MOO on one device: the DDP experiment without the processes.

Each rank's gradient is computed in turn (one backward per emulated rank), averaged by objective,
and combined problem by problem with :mod:`bucketmoo_hooks.reference` over the same bucket
partition DDP would use, so one GPU can run configurations that would otherwise need one GPU per
language::

    engine = SingleDeviceMOO(model.parameters(), weighting="mgda", bucket_cap_mb=25)
    for rank, language in enumerate(languages_of_ranks):
        loss_of(language).backward()
        engine.add_gradient(language)     # moves .grad into the language's row
    engine.combine()                      # writes the combined update to .grad
    optimizer.step()

The partition is DDP's with ``find_unused_parameters=True`` (:func:`ddp_bucket_partition`): fixed
from the first step, since DDP then never rebuilds its buckets. With the default
``find_unused_parameters=False`` DDP reduces the first step as one bucket and rebuilds after it.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ._absent import check_absent
from ._diagnostics import Diagnostics
from ._objectives import ObjectiveMap, objective_key
from ._sketch import check_sketch_size
from ._state import GRANULARITIES
from .reference import Combination, combine, sketch_gramian
from .weightings import Weighting, WeightingContext, get_weighting

__all__ = ["SingleDeviceMOO", "ddp_bucket_partition"]

_MIB = 1024 * 1024
_DEFAULT_BUCKET_CAP_MB = 25  # DDP's default


def ddp_bucket_partition(
    parameters: Sequence[Tensor], bucket_cap_mb: float | None = None
) -> list[list[int]]:
    """Indices into ``parameters`` of every bucket, in reduction order, as
    ``DDP(module, bucket_cap_mb=..., find_unused_parameters=True)`` builds them.

    ``parameters`` must be DDP's parameter list: ``module.parameters()`` that require a gradient,
    in order. DDP assigns them in that order to buckets of at most ``bucket_cap_mb`` MiB (a first
    bucket of 1 MiB when the cap is left at its default) and reduces the buckets in reverse order.
    """
    params = list(parameters)
    if bucket_cap_mb is None:
        limits = [dist._DEFAULT_FIRST_BUCKET_BYTES, _DEFAULT_BUCKET_CAP_MB * _MIB]
    else:
        limits = [int(bucket_cap_mb * _MIB)]
    buckets, _ = dist._compute_bucket_assignment_by_size(params, limits, [False] * len(params))
    return [list(bucket) for bucket in reversed(buckets)]


class SingleDeviceMOO:
    """Combines per-objective gradients on one device as DDP + :func:`bucket_moo_hook` would.

    Args:
        parameters: The model's parameters (those without ``requires_grad`` are skipped, as DDP
            does).
        weighting: As for :class:`BucketMOOState`; ``None`` is plain DDP: the mean over the
            emulated ranks, no MOO.
        granularity: ``"bucket"``, ``"parameter"`` or ``"global"`` (docs/design.md §5).
        bucket_cap_mb: DDP's ``bucket_cap_mb``; sets the partition.
        diagnostics: Records per problem and step, in the hook's format.
        absent: As for :class:`BucketMOOState`: ``"exclude"`` (default) leaves an objective out
            of the parameters none of its emulated ranks used (no ``.grad``, or a zero one);
            ``"zero"`` counts their zero gradient.
        sketch_size: As ``BucketMOOState(protocol="sketch", sketch_size=...)``: every problem's
            Gramian is :func:`~bucketmoo_hooks.reference.sketch_gramian`, with the seed the hook
            draws for it (step ``iter``, the DDP bucket's index, the parameter's position in its
            bucket); with ``"global"`` the model's Gramian is the sum of the buckets'. ``None``
            (default): exact Gramians.

    Attributes:
        buckets: :func:`ddp_bucket_partition` of the parameters.
        iter: Combinations done (the hook's ``state.iter``).
    """

    def __init__(
        self,
        parameters: Iterable[Tensor],
        weighting: str | Weighting | Callable[[Tensor], Tensor] | None = "mgda",
        granularity: str = "bucket",
        bucket_cap_mb: float | None = None,
        diagnostics: Diagnostics | None = None,
        absent: str = "exclude",
        sketch_size: int | None = None,
    ) -> None:
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        self.parameters = [p for p in parameters if p.requires_grad]
        self.weighting = None if weighting is None else get_weighting(weighting)
        self.granularity = granularity
        self.diagnostics = diagnostics
        self.absent = check_absent(absent)
        self.sketch_size = None if sketch_size is None else check_sketch_size(sketch_size, "sketch")
        self.buckets = ddp_bucket_partition(self.parameters, bucket_cap_mb)
        self.iter = 0
        self._order = [i for bucket in self.buckets for i in bucket]  # flat layout: bucket order
        self._rows: dict[int, Tensor] = {}  # objective key -> sum of its ranks' gradients
        self._used: dict[int, Tensor] = {}  # objective key -> [P] bool: a rank of it used p
        self._keys: list[int] = []  # objective key of every emulated rank, in rank order
        # Flat-layout position -> some emulated rank produced a .grad there. DDP leaves the grad
        # of a parameter no rank used (globally unused) as it is: None, so the optimizer skips it.
        self._touched = [False] * len(self._order)

    def add_gradient(self, objective: Hashable) -> None:
        """Take the gradients in ``.grad`` as the next emulated rank's, for ``objective``.

        Call after that rank's ``backward()`` (and its accumulation steps); clears ``.grad``.
        """
        key = objective_key(objective)
        if self.diagnostics is not None:
            self.diagnostics.add_labels([objective])
        params = [self.parameters[i] for i in self._order]
        grads = [p.grad for p in params]
        flat = torch.cat(
            [
                torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
                if grad is None
                else grad.reshape(-1)
                for p, grad in zip(params, grads, strict=True)
            ]
        )
        # On the device: read on the host once per combine(), not per parameter and rank.
        used = torch.stack(
            [
                torch.zeros((), dtype=torch.bool, device=flat.device)
                if grad is None or grad.numel() == 0
                else grad.ne(0).any()
                for grad in grads
            ]
        )
        if key in self._rows:
            self._rows[key] += flat
            self._used[key] |= used
        else:
            self._rows[key] = flat
            self._used[key] = used
        self._keys.append(key)
        self._touched = [t or g is not None for t, g in zip(self._touched, grads, strict=True)]
        for p in self.parameters:
            p.grad = None

    def combine(self) -> None:
        """Combine the gradients added since the last call and write the result to ``.grad``.

        A parameter no emulated rank produced a gradient for keeps ``.grad = None``, as DDP
        leaves a globally unused parameter's (so the optimizer skips it, weight decay included).
        """
        if not self._keys:
            raise RuntimeError("combine() needs add_gradient() first")
        objective_map = ObjectiveMap.from_keys(self._keys)
        sizes = torch.tensor(objective_map.group_sizes, dtype=torch.float64)
        rows = torch.stack([self._rows[key] for key in objective_map.objectives])
        objective_grads = rows / sizes.to(rows)[:, None]
        weighting = self.weighting
        if (
            weighting is None
        ):  # DDP's mean over ranks: each objective weighted by its share of ranks
            share = sizes / sizes.sum()
            weighting = get_weighting(lambda gramian: share)
        present = None  # plain DDP averages the zeros of unused parameters like any gradient
        if self.weighting is not None and self.absent == "exclude":
            present = torch.stack([self._used[key] for key in objective_map.objectives], 1).cpu()
        update = self._update(objective_grads, objective_map.objectives, weighting, present)
        offset = 0
        for i, touched in zip(self._order, self._touched, strict=True):
            p = self.parameters[i]
            p.grad = update[offset : offset + p.numel()].view_as(p).clone() if touched else None
            offset += p.numel()
        self._rows, self._keys, self._used = {}, [], {}
        self._touched = [False] * len(self._order)
        if self.diagnostics is not None:
            self.diagnostics.end_step(self.iter)
        self.iter += 1

    def _update(
        self,
        objective_grads: Tensor,
        objectives: tuple[int, ...],
        weighting: Weighting,
        present: Tensor | None,
    ) -> Tensor:
        """Solve every problem of the granularity (problem keys as the hook's) and combine.

        ``present``: ``[P, L]``, objective ``ℓ`` used parameter ``p`` (flat layout order), or
        ``None`` to count every objective everywhere.
        """
        parts, offset, first = [], 0, 0
        if self.granularity == "global":
            context = WeightingContext(self.iter, -1, objectives, None, ())
            sizes = [self.parameters[i].numel() for i in self._order]
            gramian, sketched = None, ()
            if self.sketch_size is not None:  # the hook: the sum of the buckets' sketches
                lengths = [sum(self.parameters[i].numel() for i in b) for b in self.buckets]
                chunks = torch.split(objective_grads, lengths, dim=1)
                gramian = torch.stack(
                    [self._sketch_gramian(c, b, 0) for b, c in enumerate(chunks)]
                ).sum(dim=0)
                sketched = (any(n > self.sketch_size for n in lengths),)
            combination = combine(
                objective_grads,
                weighting,
                context,
                present=present,
                parameter_sizes=sizes,
                gramian=gramian,
            )
            self._record(-1, objectives, [combination], False, sketched)
            return combination.update
        for b, bucket in enumerate(self.buckets):  # b: the DDP bucket's index (reduction order)
            sizes = [self.parameters[i].numel() for i in bucket]
            chunk = objective_grads[:, offset : offset + sum(sizes)]
            used = None if present is None else present[first : first + len(bucket)]
            offset, first = offset + sum(sizes), first + len(bucket)
            if self.granularity == "bucket":
                context = WeightingContext(self.iter, b, objectives, None, tuple(bucket))
                pieces = [(chunk, context, used, sizes)]
            else:
                pieces = [
                    (
                        piece,
                        WeightingContext(self.iter, b, objectives, s, (bucket[s],)),
                        None if used is None else used[s : s + 1],
                        [sizes[s]],
                    )
                    for s, piece in enumerate(torch.split(chunk, sizes, dim=1))
                ]
            # The hook's problem index: 0 for a bucket, the parameter's position in it.
            combinations = [
                combine(
                    piece,
                    weighting,
                    context,
                    present=used,
                    parameter_sizes=sizes,
                    gramian=self._sketch_gramian(piece, b, s),
                )
                for s, (piece, context, used, sizes) in enumerate(pieces)
            ]
            sketched = ()
            if self.sketch_size is not None:
                sketched = tuple(piece.shape[1] > self.sketch_size for piece, *_ in pieces)
            self._record(b, objectives, combinations, self.granularity == "parameter", sketched)
            parts += [c.update for c in combinations]
        return torch.cat(parts)

    def _sketch_gramian(self, grads: Tensor, bucket: int, problem: int) -> Tensor | None:
        """The Gramian the sketch protocol estimates for problem ``problem`` of bucket
        ``bucket`` at this step, or ``None`` (exact) without ``sketch_size``."""
        if self.sketch_size is None:
            return None
        return sketch_gramian(
            grads, self.sketch_size, step=self.iter, bucket=bucket, problem=problem
        )

    def _record(
        self,
        bucket: int,
        objectives: tuple[int, ...],
        combinations: list[Combination],
        segmented: bool,
        sketched: tuple[bool, ...],
    ) -> None:
        if self.diagnostics is not None:
            gramians = torch.stack([c.gramian for c in combinations])
            weights = torch.stack([c.weights for c in combinations])
            self.diagnostics.record(
                self.iter,
                bucket,
                objectives,
                gramians,
                weights,
                segmented,
                sketched=sketched,
                sketch_size=self.sketch_size,
            )

    def state_dict(self) -> dict[str, Any]:
        """Progress and the weighting's state (for checkpoints)."""
        weighting_state = {} if self.weighting is None else self.weighting.state_dict()
        return {"iter": self.iter, "weighting_state": weighting_state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.iter = int(state_dict["iter"])
        if self.weighting is not None:
            self.weighting.load_state_dict(state_dict["weighting_state"])
