"""Objective ids, their 64-bit keys, and the rank → objective grouping of one step."""

import cmath
import hashlib
import pickle
import sys
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ._device_path import to_device


def canonical_objective(objective: object) -> Hashable:
    """The objective id as ranks compare it.

    A 0-d tensor or a numpy scalar becomes its Python value (``.item()``: an int, float, bool or
    complex), so ``torch.tensor(0)`` and ``0`` are the same objective: a tensor's pickle holds its
    storage address, which differs between processes. Tensors and arrays with dimensions are
    refused, as is NaN (it never equals itself, and its bit patterns differ). Plain tuples are
    canonicalised element by element. Anything else is returned as it is.
    """
    numpy = sys.modules.get("numpy")  # a numpy value implies numpy is imported
    if isinstance(objective, Tensor) or (
        numpy is not None and isinstance(objective, numpy.ndarray | numpy.generic)
    ):
        if objective.ndim != 0:
            raise TypeError(
                f"an objective id must be a scalar, got a {type(objective).__name__} of shape "
                f"{tuple(objective.shape)}; pass this rank's id as a Python value or a 0-d "
                "tensor, e.g. batch['lang_id'][0].item()"
            )
        objective = objective.item()
    elif type(objective) is tuple:
        items = tuple(canonical_objective(item) for item in objective)
        if any(a is not b for a, b in zip(items, objective, strict=True)):
            objective = items
    elif isinstance(objective, frozenset):
        # Its pickle lists the items in hash order, which Python salts per process for strings.
        raise TypeError(
            f"an objective id must not be a frozenset, got {objective!r}: its items are pickled "
            "in an order that differs between processes; use a sorted tuple or a string"
        )
    if isinstance(objective, float | complex) and cmath.isnan(objective):
        raise ValueError(
            f"an objective id must not be NaN, got {objective!r}: NaN never equals itself, so "
            "ranks could not agree on it; use a string or an int"
        )
    if type(objective) is float and objective == 0.0:
        return 0.0  # -0.0 == 0.0, but it pickles differently
    return objective


def objective_key(objective: Hashable) -> int:
    """Map an objective id to a signed 64-bit key that is the same in every process.

    Python's ``hash`` is salted per process for strings, so ranks could not compare it. The key
    is a digest of the pickle of the id's :func:`canonical_objective` form instead: two ids are
    the same objective exactly when those pickles are equal (so ``1`` and ``True`` are different
    objectives, as are ``1`` and ``1.0``, while ``1`` and ``torch.tensor(1)`` are the same).
    """
    objective = canonical_objective(objective)
    try:
        hash(objective)
    except TypeError:
        kind = type(objective).__name__
        message = f"an objective id must be hashable, got {objective!r} of type {kind}"
        raise TypeError(message) from None
    try:
        payload = pickle.dumps(objective, protocol=4)
    except Exception as error:
        raise TypeError(
            f"an objective id must be picklable so that ranks can compare it, got {objective!r} "
            f"({type(error).__name__}: {error})"
        ) from None
    digest = hashlib.blake2b(payload, digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


@dataclass(frozen=True, slots=True)
class ObjectiveMap:
    """Which objective each rank trains this step.

    Attributes:
        keys: The objective key of every rank (length ``R``), see :func:`objective_key`.
        objectives: The distinct keys in order of first appearance over the ranks (length ``L``).
            This order is the row order of the Gramian and of the weights.
        group_of_rank: For every rank, the index of its objective in ``objectives``.
        group_sizes: ``m_ℓ``, the number of ranks of every objective.
    """

    keys: tuple[int, ...]
    objectives: tuple[int, ...]
    group_of_rank: tuple[int, ...]
    group_sizes: tuple[int, ...]

    @classmethod
    def from_keys(cls, keys: Sequence[int]) -> "ObjectiveMap":
        position: dict[int, int] = {}
        for key in keys:
            position.setdefault(key, len(position))
        group_of_rank = tuple(position[key] for key in keys)
        sizes = [0] * len(position)
        for group in group_of_rank:
            sizes[group] += 1
        return cls(tuple(keys), tuple(position), group_of_rank, tuple(sizes))

    @classmethod
    def from_ids(cls, objective_of_rank: Sequence[Hashable]) -> "ObjectiveMap":
        return cls.from_keys([objective_key(objective) for objective in objective_of_rank])

    @property
    def world_size(self) -> int:
        return len(self.keys)

    @property
    def num_objectives(self) -> int:
        return len(self.objectives)

    def averaging_matrix(self, device: torch.device | str = "cpu") -> Tensor:
        """``M ∈ ℝ^{L×R}`` with ``M[ℓ, r] = 1/m_ℓ`` if rank ``r`` trains ``ℓ``: ``A = M S``.

        On CUDA the matrix goes through pinned memory with a non-blocking copy, so building it
        never synchronises the host with the device.
        """
        matrix = torch.zeros(self.num_objectives, self.world_size, dtype=torch.float32)
        for rank, group in enumerate(self.group_of_rank):
            matrix[group, rank] = 1.0 / self.group_sizes[group]
        return to_device(matrix, torch.device(device))
