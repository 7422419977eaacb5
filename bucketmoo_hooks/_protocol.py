"""What an exchange protocol is: how the ranks' gradients of one bucket become its Gramians
(phase 1) and how weights become the engine's reduced output (phase 2).

The core (:mod:`._core`) runs every bucket, unit or HSDP shard through one protocol object,
chosen by ``BucketMOOState(protocol=...)``; the engines (DDP, FSDP2, HSDP, FSDP1) only hand it
a :class:`Gradient`. ``"shard"`` (:mod:`._shard`) is the paper's exact method; ``"sketch"``
(:mod:`._sketch`) estimates the Gramians from a random sketch and hands the engine's own
reduction the rank's scaled gradient.
"""

import operator
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from .weightings import Weighting

if TYPE_CHECKING:
    from ._collectives import Collectives
    from ._runtime import Workspace


@dataclass(frozen=True, slots=True)
class Bucket:
    """One DDP bucket or FSDP unit, as the core names and keys it.

    Attributes:
        index: The bucket id (weighting contexts, diagnostics, the ledger).
        label: For messages, e.g. ``"bucket 3"`` or ``"FSDP unit 2 ('layers.1')"``.
        problem: Stable key of the bucket's problem (:attr:`WeightingContext.problem`), or
            ``None`` when the model is unknown (a raw ``register_comm_hook``).
        parameter_problems: One key per parameter (``granularity="parameter"``).
    """

    index: int
    label: str
    problem: tuple[int, ...] | None
    parameter_problems: Sequence[tuple[int, ...] | None]


@dataclass(frozen=True, slots=True)
class Gradient:
    """One bucket or unit as the engine hands it over.

    Attributes:
        flat: This rank's gradient. With ``output=None`` (an all-reduce: DDP, FSDP1
            ``NO_SHARD``, HSDP across replicas) a flat ``[n]`` that the reduced gradient replaces;
            else a reduce-scatter's input ``[R·c]`` whose chunk ``r`` is the shard rank ``r`` owns.
        output: The reduce-scatter's ``[c]`` output (FSDP), or ``None``.
        sizes: Elements of each parameter, in order: consecutive in ``flat`` (DDP, FSDP1), or,
            with ``rows``, in every chunk (FSDP2 shards every parameter, padded, across ranks).
        rows: Whether ``sizes`` describe one chunk (FSDP2) rather than ``flat``.
    """

    flat: Tensor
    output: Tensor | None
    sizes: Sequence[int]
    rows: bool = False


@dataclass(frozen=True, slots=True)
class Request:
    """What the core asks of phase 1, and the identity of the problem.

    Attributes:
        step: The step (``state.iter``); with ``bucket``, what a protocol that draws per step
            and problem (a random sketch) seeds from, alike on every rank.
        bucket: The bucket or unit.
        per_parameter: One Gramian per parameter (``granularity="parameter"``), else one.
        presence: Also count, per parameter, the ranks of each objective with a nonzero gradient
            there (``absent="exclude"``), in the Gramian's all-reduce.
        kernels: ``BucketMOOState.kernels``.
        workspace: CPU buffers reused from bucket to bucket, or ``None`` when the exchange must
            outlive the next bucket's (global MOO holds it).
    """

    step: int
    bucket: Bucket
    per_parameter: bool
    presence: bool
    kernels: str
    workspace: "Workspace | None"


class Exchange(ABC):
    """Phase 1's outcome for one bucket, and phase 2.

    Attributes:
        gramians: The all-reduced Gramians of the bucket's problems, ``[S, L, L]`` (fp32; fp64
            for fp64 gradients).
        counts: With ``Request.presence``, the all-reduced presence counts ``[P, L]`` of its
            ``P = len(Gradient.sizes)`` parameters (``> 0``: present), else ``None``.
        sketched: Per problem, whether its Gramian is an estimate (a random sketch), not exact.
    """

    gramians: Tensor
    counts: Tensor | None
    sketched: tuple[bool, ...] = ()

    def solves(self, weighting: Weighting) -> bool:
        """Whether :meth:`combine` computes ``weighting``'s weights itself (fused kernels)."""
        return False

    @property
    @abstractmethod
    def held_bytes(self) -> int:
        """Bytes this exchange keeps until :meth:`combine` (global MOO reports them)."""

    @abstractmethod
    def hold(self) -> None:
        """Keep only what :meth:`combine` needs, in as little memory as it can: the exchange
        waits for the weights of the whole model (global MOO)."""

    @abstractmethod
    def combine(
        self, weighting: Weighting, weights: Tensor | None, parameter_weights: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """Phase 2, compute: ``(weights, combined)``.

        Args:
            weights: ``[S, L]``, one weight vector per problem; ``None`` when :meth:`solves`.
            parameter_weights: ``[P, L]``, one per parameter, where some parameter lacks some of
                its problem's objectives (then they apply instead of ``weights``), else ``None``.
        """

    @abstractmethod
    def deliver(self, combined: Tensor) -> torch.futures.Future[Tensor] | None:
        """Phase 2, communication: the engine's output. A future resolving to the reduced
        ``flat`` for an all-reduce; ``None`` for a reduce-scatter, ``output`` written."""


class ExchangeProtocol(ABC):
    """How the ranks exchange one bucket; one object per state serves every bucket (built from
    the state's options by :func:`._core.protocol_of`)."""

    name: ClassVar[str]

    @abstractmethod
    def exchange(
        self,
        comm: "Collectives",
        gradient: Gradient,
        averaging: Tensor,
        request: Request,
    ) -> Exchange:
        """Phase 1: exchange ``gradient`` over ``comm`` and all-reduce its Gramians.

        ``averaging`` is ``M ∈ ℝ^{L×R}`` (:meth:`ObjectiveMap.averaging_matrix`), row ``ℓ``
        averaging the ranks of objective ``ℓ``.
        """


def checked_int(value: object, name: str, meaning: str) -> int:
    """A protocol option that must be an int (numpy integers too; not a bool): ``value`` as an
    int, or ``TypeError`` naming ``name`` and what it means."""
    if not isinstance(value, bool) and hasattr(value, "__index__"):
        value = operator.index(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int ({meaning}), got {type(value).__name__} {value!r}")
    return value
