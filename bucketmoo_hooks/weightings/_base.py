"""The Weighting interface (Gramian → weights), the registry of named weightings, and resolution
of what a user passes as ``weighting=``."""

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor


@dataclass(frozen=True, slots=True)
class WeightingContext:
    """What a weighting may know besides the Gramian.

    Attributes:
        step: The hook's step counter (synchronised backward passes so far).
        bucket: The bucket's index in this step. DDP renumbers buckets when it rebuilds them
            after the first iteration, so this is a label, not a key for long-lived state.
        objectives: The objective keys in Gramian order (see :func:`bucketmoo_hooks.objective_key`).
        segment: With ``granularity="parameter"``, the parameter's position in the bucket;
            ``None`` when the problem covers the whole bucket (or, with ``"global"``, the model).
        problem: Stable key of this problem, for weightings that keep state per problem: the
            positions in ``model.parameters()`` of the parameters it covers (``()`` for the
            whole model). It survives DDP's bucket rebuild, restarts and checkpoints. ``None``
            when the hook was registered without :func:`bucketmoo_hooks.register_bucket_moo_hook`,
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

    def state_dict(self) -> dict[str, Any]:
        """State that evolves during training (stateless weightings have none)."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            raise ValueError(
                f"{type(self).__name__} is stateless but the checkpoint holds weighting state "
                f"with keys {sorted(state_dict)}"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


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
        """A name that is the same in every process (ranks compare it to check they agree):
        a function's qualified name, or an object's ``repr`` when its class defines one (so
        hyperparameters count), else the class name (a default repr holds a memory address)."""
        function = self.function
        if hasattr(function, "__qualname__"):
            return function.__qualname__
        if type(function).__repr__ is not object.__repr__:
            return repr(function)
        return type(function).__qualname__

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
        return CallableWeighting(weighting)
    raise TypeError(
        f"weighting must be a name ({weighting_names()}), a Weighting, or a callable "
        f"(gramian [L, L]) -> weights [L]; got {type(weighting).__name__}"
    )
