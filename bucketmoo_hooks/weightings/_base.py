"""The Weighting interface (Gramian → weights), the registry of named weightings, and resolution
of what a user passes as ``weighting=``."""

import functools
import importlib
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

# A memory address in a repr (``<object at 0x7f...>``): it differs from process to process.
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{6,}")


@dataclass(frozen=True, slots=True)
class WeightingContext:
    """What a weighting may know besides the Gramian.

    Attributes:
        step: The hook's step counter (synchronised backward passes so far).
        bucket: The bucket's index in this step (the FSDP unit's index), ``-1`` for the whole
            model (``granularity="global"``). DDP renumbers buckets when it rebuilds them after
            the first iteration, so this is a label, not a key for long-lived state.
        objectives: The objective keys in Gramian order (see :func:`bucketmoo_hooks.objective_key`).
        segment: With ``granularity="parameter"``, the parameter's position in the bucket;
            ``None`` when the problem covers the whole bucket (or, with ``"global"``, the model).
        problem: Stable key of this problem, for weightings that keep state per problem: the
            positions in ``model.parameters()`` of the parameters it covers (``()`` for the
            whole model). It survives DDP's bucket rebuild, restarts and checkpoints. ``None``
            when the hook was registered without :func:`bucketmoo_hooks.install_bucket_moo`,
            which is what tells the state the model's parameter order.
    """

    step: int
    bucket: int
    objectives: tuple[int, ...]
    segment: int | None = None
    problem: tuple[int, ...] | None = None


class Weighting(ABC):
    """Maps the Gramian ``G ∈ ℝ^{L×L}`` of the objective gradients to weights ``w ∈ ℝ^L``.

    The combined update is ``d = Σ_ℓ w_ℓ ḡ_ℓ``. Implementations run on the Gramian's device with
    a fixed amount of work and never synchronise the host with the device (no ``.item()``, no
    Python branching on device values), because the hook calls them inside backward.

    Subclasses with a ``name`` are registered, so ``BucketMOOState(weighting=name)`` finds them.
    """

    name: ClassVar[str]
    #: One line: what the method does, and its paper.
    description: ClassVar[str]

    _registry: ClassVar[dict[str, type["Weighting"]]] = {}

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        if name is not None:
            if name in Weighting._registry:
                raise ValueError(f"a weighting named {name!r} is already registered")
            Weighting._registry[name] = cls

    def __call__(self, gramian: Tensor, context: WeightingContext | None = None) -> Tensor:
        if gramian.ndim != 2 or gramian.shape[0] != gramian.shape[1] or gramian.shape[0] == 0:
            shape = tuple(gramian.shape)
            raise ValueError(f"gramian must be a non-empty square matrix [L, L], got shape {shape}")
        return self.forward(gramian, context)

    @abstractmethod
    def forward(self, gramian: Tensor, context: WeightingContext | None) -> Tensor:
        """Return the weights ``[L]`` (float32, on the Gramian's device)."""

    def solve(self, gramians: Tensor, contexts: Sequence[WeightingContext | None]) -> Tensor:
        """The weights ``[S, L]`` of a batch of Gramians ``[S, L, L]``, ``gramians[s]`` with
        ``contexts[s]`` (the segments of a bucket with ``granularity="parameter"``).

        By default one :meth:`forward` per Gramian; the built-in weightings
        (:class:`BatchedWeighting`) solve the batch at once, with as many device ops for ``S``
        Gramians as for one.
        """
        return torch.stack(
            [self.forward(g, context) for g, context in zip(gramians, contexts, strict=True)]
        )

    def state_dict(self) -> dict[str, Any]:
        """State that evolves during training (stateless weightings have none)."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            raise ValueError(
                f"{type(self).__name__} is stateless but the checkpoint holds weighting state "
                f"with keys {sorted(state_dict)}"
            )

    def config(self) -> str:
        """The class and its hyperparameters, spelt alike in every process: ranks compare it
        (a mismatch raises on every rank) and checkpoints record it.

        The repr, which for the built-in weightings lists every constructor argument (a
        subclass whose repr leaves one out must override this). A repr holding a memory address
        would differ between processes: the class's qualified name replaces it.
        """
        text = repr(self)
        return type(self).__qualname__ if _ADDRESS.search(text) else text

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class BatchedWeighting(Weighting):
    """A weighting whose :meth:`solve` handles a batch ``[S, L, L]`` at once (one set of device
    ops whatever ``S``: on a GPU, as many kernel launches for a bucket's ``S`` segments as for
    one)."""

    def solve(self, gramians: Tensor, contexts: Sequence[WeightingContext | None]) -> Tensor:
        if len(gramians) == 1:
            # Unbatched: the same ops (and launches on a GPU), but on the CPU an op on [L, L]
            # costs less than on [1, L, L] (measured: up to 1.5× for a whole solve).
            return self.solve_batch(gramians[0], contexts).unsqueeze(0)
        return self.solve_batch(gramians, contexts)

    @abstractmethod
    def solve_batch(self, gramians: Tensor, contexts: Sequence[WeightingContext | None]) -> Tensor:
        """The weights ``[..., L]`` of the Gramians ``[..., L, L]``: ``[S, L, L]`` with one
        context each, or one Gramian ``[L, L]`` with one context."""

    def forward(self, gramian: Tensor, context: WeightingContext | None) -> Tensor:
        return self.solve_batch(gramian, [context])


class CallableWeighting(Weighting):
    """Wraps a user callable ``(gramian: Tensor[L, L]) -> Tensor[L]``, e.g. any torchjd
    ``Weighting`` over a Gramian (``torchjd.aggregation.UPGradWeighting()``).

    The callable's output shape is checked on every call (a host-side check on metadata); its
    values are taken as they are, and moved to the Gramian's device and dtype. torchjd's solvers
    run on the host (numpy/quadprog), so on a GPU every call synchronises: expect it to be much
    slower than this package's device-side weightings.
    """

    def __init__(self, function: Callable[[Tensor], Tensor]) -> None:
        self.function = function

    @property
    def label(self) -> str:
        """The callable as ranks compare it (see :func:`describe_callable`)."""
        return describe_callable(self.function)

    def config(self) -> str:
        return repr(self)  # the label is address-free by construction

    def forward(self, gramian: Tensor, context: WeightingContext | None) -> Tensor:
        weights = self.function(gramian)
        if not isinstance(weights, Tensor) or weights.shape != gramian.shape[:1]:
            shape = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
            raise ValueError(
                f"weighting callable {self.label} must return a tensor of shape "
                f"[{gramian.shape[0]}] (one weight per objective), got {shape}"
            )
        return weights.to(device=gramian.device, dtype=gramian.dtype)

    def __repr__(self) -> str:
        return f"CallableWeighting({self.label})"


def describe_callable(function: Callable[..., Any]) -> str:
    """A description of ``function`` that is the same in every process and tells apart the
    configurations ranks must agree on.

    - a function (or method, or builtin): ``module.qualified_name``, followed by the closure's
      captured variables, ``[name=value, ...]``;
    - a ``functools.partial``: ``functools.partial(<its function>, <args>, <keyword=value>)``;
    - another callable object: its ``repr`` when its class defines one without a memory address
      (torchjd's weightings), else its class's qualified name.

    Captured variables and a partial's arguments count by value when they are plain (``None``,
    bool, int, float, str, or tuples of these), else by their type only.
    """
    if isinstance(function, functools.partial):
        arguments = [_captured(a) for a in function.args]
        arguments += [f"{k}={_captured(v)}" for k, v in function.keywords.items()]
        return f"functools.partial({', '.join([describe_callable(function.func), *arguments])})"
    name = getattr(function, "__qualname__", None)
    if isinstance(name, str):
        module = getattr(function, "__module__", None)
        name = f"{module}.{name}" if module else name
        cells = getattr(function, "__closure__", None) or ()
        variables = function.__code__.co_freevars if cells else ()
        captured = []
        for variable, cell in zip(variables, cells, strict=True):
            try:
                captured.append(f"{variable}={_captured(cell.cell_contents)}")
            except ValueError:  # a cell not yet filled
                continue
        return f"{name}[{', '.join(captured)}]" if captured else name
    if type(function).__repr__ is not object.__repr__:
        text = repr(function)
        if not _ADDRESS.search(text):
            return text
    return type(function).__qualname__


def _captured(value: object) -> str:
    """A captured value or a partial's argument: its repr if plain, else ``<type name>``."""
    if _is_plain(value):
        return repr(value)
    return f"<{type(value).__qualname__}>"


def _is_plain(value: object) -> bool:
    if type(value) is tuple:
        return all(_is_plain(item) for item in value)
    return value is None or type(value) in (bool, int, float, str)


def _refuse_aggregator(weighting: object) -> None:
    """A torchjd ``Aggregator`` maps a Jacobian to an update vector, not a Gramian to weights:
    called on a Gramian it returns numbers of another method. Found by its class's ancestry, so
    that torchjd need not be imported."""
    if not any(
        c.__name__ == "Aggregator" and c.__module__.startswith("torchjd")
        for c in type(weighting).__mro__
    ):
        return
    name = type(weighting).__name__
    try:
        has_weighting = hasattr(importlib.import_module("torchjd.aggregation"), f"{name}Weighting")
    except ImportError:
        has_weighting = False
    advice = (
        f"pass torchjd.aggregation.{name}Weighting(...) with the same arguments"
        if has_weighting
        else f"torchjd has no {name}Weighting; pass a torchjd Weighting or one of "
        f"{weighting_names()}"
    )
    raise TypeError(
        f"weighting={name}(...) is a torchjd Aggregator (Jacobian → update vector), but the hook "
        f"needs a weighting (Gramian [L, L] → weights [L]); {advice}"
    )


def weighting_names() -> list[str]:
    """The names accepted as ``weighting=``, sorted."""
    return sorted(Weighting._registry)


def get_weighting(weighting: "str | Weighting | Callable[[Tensor], Tensor]") -> Weighting:
    """Resolve a weighting given by name, as a :class:`Weighting`, or as a plain callable."""
    if isinstance(weighting, Weighting):
        return weighting
    if isinstance(weighting, str):
        try:
            return Weighting._registry[weighting]()
        except KeyError:
            raise ValueError(
                f"weighting={weighting!r} is not a known weighting; expected one of "
                f"{weighting_names()} or a callable (gramian [L, L]) -> weights [L]"
            ) from None
    if callable(weighting):
        _refuse_aggregator(weighting)
        return CallableWeighting(weighting)
    raise TypeError(
        f"weighting must be a name ({weighting_names()}), a Weighting, or a callable "
        f"(gramian [L, L]) -> weights [L]; got {type(weighting).__name__}"
    )
