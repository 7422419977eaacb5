import functools
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._absent import ParameterLayout, Segment, check_absent
from ._compat import all_gather_single
from ._diagnostics import Diagnostics
from ._groups import HOST, OVERLAP, helper_group, shared_worker
from ._kernels import check_kernels
from ._ledger import CommLedger
from ._nonfinite import check_nonfinite, raise_if_nonfinite
from ._objectives import ObjectiveMap, canonical_objective, objective_key
from ._protocol import Workspace
from ._worker import BucketWorker
from .weightings import CallableWeighting, Weighting, get_weighting

# Distinct (objective map, device) pairs whose averaging matrix is kept; per-step sampling of
# languages can produce many maps, so the cache is bounded.
_AVERAGING_CACHE_SIZE = 64
# Attributes that are rebuilt after unpickling rather than saved.
_TRANSIENT = (
    "process_group",
    "_metadata_group",
    "_averaging",
    "_step_map",
    "_held",
    "_parameter_index",
    "_side_streams",
    "_worker",
    "_workspace",
    "_every_parameter_used",
    "_model",
)
GRANULARITIES = ("bucket", "parameter", "global")
_STATE_DICT_VERSION = 1


def _keys_of(objective_of_rank: Sequence[Hashable] | None) -> list[int] | None:
    """Objective ids as their keys: comparable across processes and safe to save."""
    return None if objective_of_rank is None else [objective_key(o) for o in objective_of_rank]


def _weighting_configs(weighting: Weighting) -> tuple[str, ...]:
    """The ``weighting`` entries of a checkpoint that match ``weighting``: its config, and for a
    named callable (a function, a method) also ``CallableWeighting(<qualified name>)``, all that
    checkpoints of ``_STATE_DICT_VERSION`` 1 recorded before callables were described by module
    and captured values."""
    config = weighting.config()
    name = getattr(getattr(weighting, "function", None), "__qualname__", None)
    if isinstance(weighting, CallableWeighting) and isinstance(name, str):
        return config, f"CallableWeighting({name})"
    return (config,)


class BucketMOOState:
    r"""State of :func:`bucket_moo_hook`: which objective each rank trains, and how to weight them.

    Each rank's gradient is the gradient of its objective (its language group). In every bucket
    the hook replaces DDP's average by ``d = Σ_ℓ w_ℓ ḡ_ℓ``, where ``ḡ_ℓ`` is the average gradient
    of the ranks training objective ``ℓ`` and ``w = weighting(G)`` is computed from the bucket's
    ``L×L`` Gramian ``G_ab = ⟨ḡ_a, ḡ_b⟩`` (docs/design.md §3).

    Ranks agree on the objective map through a tiny host-side exchange (3 int64 per rank) at the
    start of every step, which also checks that all ranks are at the same step with the same
    configuration, and that :meth:`set_objective` was called on all ranks or on none; a mismatch
    raises on every rank instead of silently combining wrong rows.

    Args:
        objective_of_rank: The objective (language) id of every rank of the process group, in rank
            order. Ids are any hashable, picklable values (a 0-d tensor or numpy scalar counts as
            its Python value; NaN is refused); ranks with equal ids form a group whose gradients
            are averaged first. ``None`` (default): every rank is its own objective, with its
            rank as id. Its length must equal the process group's size.
        weighting: How ``G`` becomes weights: a name (:func:`bucketmoo_hooks.weighting_names`,
            e.g. ``"mean"``, ``"mgda"``), a :class:`~bucketmoo_hooks.weightings.Weighting`, or a
            callable ``(gramian: Tensor[L, L]) -> Tensor[L]`` run on the Gramian's device.
        process_group: The group the hook communicates over. It must have the ranks (in order)
            of the group the model reduces over (the registration functions check). ``None``
            (default): the registration functions adopt the model's group, and with
            ``register_comm_hook`` directly the hook uses the default group. A given group checks
            ``objective_of_rank`` here; with ``None`` that waits for the adopted group.
        diagnostics: A :class:`~bucketmoo_hooks.Diagnostics` to record cosine similarities,
            norms, weights and update norms per bucket and step (on the device; pulled to the
            host every ``log_every`` steps). ``None`` (default) records nothing.
        granularity: What one weight vector covers (docs/design.md §5). ``"bucket"`` (default): one
            per DDP bucket, the paper's method. ``"parameter"``: one per parameter tensor in the
            bucket; the ``S`` Gramians of a bucket's ``S`` parameters go in one all-reduce
            (``S·L²`` fp32 numbers). ``"global"``: one for the whole model from the sum of the
            bucket Gramians (the paper's global-MOO baseline); every bucket's objective slices
            (``L·⌈n/R⌉`` fp32 per bucket) are held until the last bucket, so memory grows with
            the model (:attr:`held_bytes`).
        kernels: Where a bucket's compute (group averages, Gramian, weights, combination) runs.
            ``"auto"`` (default): the fused CUDA kernels (README, "CUDA kernels") for CUDA buckets
            when CuPy is installed (``pip install bucketmoo_hooks[cuda]``) and the bucket is
            supported, else the torch path; the choice is logged once. ``"torch"``: always the
            torch path. ``"cuda"``: always the kernels (raises ``RuntimeError`` here without CuPy
            or a GPU, and in the hook for a bucket they cannot run). ``granularity="global"``
            always uses the torch path.
        overlap: Let backward run on while the DDP hook reduces a bucket (default ``True``), as
            ``allreduce_hook`` does: CUDA buckets are reduced on a side stream, CPU (gloo)
            buckets on a worker thread that reduces them in order over a gloo copy of the
            process group (README, "Process groups"; the thread is shared by the states over the
            same ranks and stops when none holds it, at exit, or on :meth:`close`). The worker
            also runs the step's objective exchange, so errors found there (ranks at different
            steps or configured differently) reach ``backward()`` as a ``RuntimeError`` whose
            message names the bucket and step. CPU
            buckets reuse two exchange buffers of the largest bucket, kept by the state. ``False``
            reduces every bucket in the hook body, blocking backward while its collectives run.
            Results are bitwise the same either way; FSDP paths are unaffected.
        nonfinite: What a non-finite gradient (an inf or NaN in some rank's bucket) does.
            ``"propagate"`` (default): it reaches the combined update (``0·inf`` is NaN, so
            whatever the weights), where AMP's ``GradScaler`` sees it and skips the step on every
            rank. ``"raise"``: every rank raises
            :class:`~bucketmoo_hooks.NonFiniteGradientError` at that bucket (the Gramian is
            all-reduced, so all see it), naming the bucket, the step, the objective and its
            ranks; costs one host synchronisation per bucket on a GPU.
        absent: What an objective whose ranks did not use a parameter (a language adapter or
            head; its gradient is zero on those ranks) is for that parameter. ``"exclude"``
            (default): absent. Each problem's weights are solved over the objectives present on
            it, and a parameter with fewer of them gets the weighting of the Gramian restricted
            to those, so a parameter used by one objective gets exactly that objective's average
            gradient (README, "Language-specific parameters"). The presence counts ride in the
            Gramian all-reduce (``L`` numbers per parameter); on a GPU they are read on the
            host, one synchronisation per bucket. Skipped when the model is DDP without
            ``find_unused_parameters`` or ``static_graph`` (registered with
            :func:`~bucketmoo_hooks.register_bucket_moo_hook`): every rank then uses every
            parameter. ``"zero"``: DDP's convention, the zero gradient counts (MGDA then gives
            such a parameter no update when another objective is present).

    Attributes:
        iter: Synchronised backward passes completed (advanced on the last bucket of each step).
        ledger: :class:`~bucketmoo_hooks.CommLedger` with the bytes this rank sent, per bucket and
            per step, through every collective of the hook.
        held_bytes: Bytes of objective slices the last step held until its last bucket
            (``granularity="global"``; 0 otherwise).

    Pickling drops the process group (and anything tied to it): an unpickled state uses the
    default group; set ``state.process_group`` afterwards if another group is needed.
    """

    __slots__ = (
        "_averaging",
        "_every_parameter_used",
        "_held",
        "_metadata_group",
        "_model",
        "_objective",
        "_parameter_index",
        "_side_streams",
        "_step_map",
        "_worker",
        "_workspace",
        "absent",
        "diagnostics",
        "granularity",
        "held_bytes",
        "iter",
        "kernels",
        "ledger",
        "nonfinite",
        "objective_of_rank",
        "overlap",
        "process_group",
        "weighting",
    )

    def __init__(
        self,
        objective_of_rank: Sequence[Hashable] | None = None,
        weighting: "str | Weighting | Callable[[Tensor], Tensor]" = "mgda",
        process_group: dist.ProcessGroup | None = None,
        granularity: str = "bucket",
        diagnostics: Diagnostics | None = None,
        kernels: str = "auto",
        overlap: bool = True,
        nonfinite: str = "propagate",
        absent: str = "exclude",
    ) -> None:
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if objective_of_rank is not None:
            if isinstance(objective_of_rank, str | bytes) or not isinstance(
                objective_of_rank, Sequence
            ):
                raise TypeError(
                    "objective_of_rank must be a sequence with one objective id per rank "
                    f"(e.g. [0, 0, 1, 1] or ['en', 'de']), got {objective_of_rank!r}"
                )
            if len(objective_of_rank) == 0:
                raise ValueError("objective_of_rank must name the objective of every rank, got []")
            # As values (a 0-d tensor's pickle holds its address), for the digest and the labels.
            objective_of_rank = tuple(canonical_objective(o) for o in objective_of_rank)
            for objective in objective_of_rank:
                objective_key(objective)  # raises a clear TypeError for unusable ids
        if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
            raise TypeError(
                f"process_group must be a torch.distributed.ProcessGroup or None, "
                f"got {type(process_group).__name__}"
            )
        self.objective_of_rank: tuple[Hashable, ...] | None = objective_of_rank
        self.weighting: Weighting = get_weighting(weighting)
        self.process_group = process_group
        self.granularity = granularity
        self.kernels = check_kernels(kernels)
        if not isinstance(overlap, bool):
            raise TypeError(f"overlap must be a bool, got {overlap!r}")
        self.overlap = overlap
        self.nonfinite = check_nonfinite(nonfinite)
        self.absent = check_absent(absent)
        # Set by the registration functions when the engine guarantees that every rank uses every
        # parameter (DDP without find_unused_parameters): then nothing can be absent.
        self._every_parameter_used = False
        if diagnostics is not None and not isinstance(diagnostics, Diagnostics):
            raise TypeError(
                f"diagnostics must be a bucketmoo_hooks.Diagnostics or None, "
                f"got {type(diagnostics).__name__}"
            )
        self.diagnostics = diagnostics
        if diagnostics is not None:
            diagnostics.add_labels(objective_of_rank or ())
        self.iter = 0
        self.held_bytes = 0
        self._held: list = []
        self._objective: tuple[Hashable, int] | None = None
        self._metadata_group: dist.ProcessGroup | None = None
        self._averaging: OrderedDict[tuple[tuple[int, ...], torch.device], Tensor] = OrderedDict()
        self._step_map: ObjectiveMap | None = None
        # id(parameter) → position in model.parameters(), set by register_bucket_moo_hook.
        self._parameter_index: dict[int, int] | None = None
        self._worker: BucketWorker | None = None
        self._side_streams: dict[torch.device, torch.cuda.Stream] = {}
        self._workspace = Workspace()  # CPU exchange buffers, reused from bucket to bucket
        self.ledger = CommLedger()
        # The model a registration function installed this state on (weakly): one per state.
        self._model: weakref.ref[nn.Module] | None = None
        if process_group is not None:  # else the group is known at registration
            self._check_world_size(process_group.size(), _described("process_group", process_group))

    @property
    def group(self) -> dist.ProcessGroup:
        """The process group in use (the default group when ``process_group`` is ``None``)."""
        if self.process_group is not None:
            return self.process_group
        if not dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is not initialised: call init_process_group before the hook "
                "runs, or pass process_group="
            )
        return dist.group.WORLD

    def set_objective(self, objective: Hashable) -> None:
        """Set the objective this rank trains from the next step on (call before ``backward()``).

        Lets the rank → objective map change every step, e.g. when there are more languages than
        ranks and each step samples some. The value overrides ``objective_of_rank`` for this rank
        and stays until changed. A step that has already started (its first bucket was reduced)
        keeps its map.

        Call it on every rank or on none: a step where some ranks set their objective and others
        did not raises on every rank (a forgotten call would silently make that rank's default
        id an objective of its own). A 0-d tensor or numpy scalar counts as its Python value
        (``tensor(0)`` is ``0``); a tensor with dimensions and NaN are refused.
        """
        objective = canonical_objective(objective)
        self._objective = (objective, objective_key(objective))
        if self.diagnostics is not None:
            self.diagnostics.add_labels([objective])

    @property
    def objective_map(self) -> ObjectiveMap | None:
        """The rank → objective map of the step in progress, else of the last step (or ``None``)."""
        return self._step_map

    # -- checkpointing ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to resume: progress, weighting state, and the configuration
        it was saved with (checked by :meth:`load_state_dict`).

        Only ints, strings, lists and tensors: safe for ``torch.load(..., weights_only=True)``.
        ``set_objective`` is a per-rank, per-step input and is not saved: call it again before
        the next ``backward()``.
        """
        return {
            "version": _STATE_DICT_VERSION,
            "iter": self.iter,
            "granularity": self.granularity,
            "weighting": self.weighting.config(),
            "weighting_state": self.weighting.state_dict(),
            "objective_keys": _keys_of(self.objective_of_rank),
            "ledger_totals": dict(self.ledger.totals),
            "ledger_steps": self.ledger.steps,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; the configuration must match this state's.

        Raises:
            TypeError: ``state_dict`` is not a dict, or an entry has the wrong type.
            ValueError: Missing or unknown keys, another version, or a checkpoint saved with a
                different weighting, granularity or ``objective_of_rank``.
        """
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        expected = set(self.state_dict())
        if set(state_dict) != expected:
            missing, unknown = expected - set(state_dict), set(state_dict) - expected
            raise ValueError(
                f"not a BucketMOOState state_dict: missing keys {sorted(missing)}, "
                f"unknown keys {sorted(unknown)}"
            )
        if state_dict["version"] != _STATE_DICT_VERSION:
            raise ValueError(
                f"state_dict version {state_dict['version']!r} is not {_STATE_DICT_VERSION}"
            )
        step = state_dict["iter"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise TypeError(f"state_dict['iter'] must be a non-negative int, got {step!r}")
        for name, accepted in (
            ("granularity", (self.granularity,)),
            ("weighting", _weighting_configs(self.weighting)),
            ("objective_keys", (_keys_of(self.objective_of_rank),)),
        ):
            if state_dict[name] not in accepted:
                raise ValueError(
                    f"the checkpoint was saved with {name}={state_dict[name]!r}, but this state "
                    f"has {name}={accepted[0]!r}; build the state as it was when saved"
                )
        self.weighting.load_state_dict(state_dict["weighting_state"])
        self.iter = step
        self.ledger.totals = dict(state_dict["ledger_totals"])
        self.ledger.steps = int(state_dict["ledger_steps"])

    # -- used by the hook ------------------------------------------------------------------------

    def _check_world_size(self, world_size: int, group: str = "the process group") -> None:
        if self.objective_of_rank is not None and len(self.objective_of_rank) != world_size:
            raise ValueError(
                f"objective_of_rank has {len(self.objective_of_rank)} entries but {group} has "
                f"{world_size} ranks; give one objective id per rank of that group"
            )

    def _register(
        self, model: nn.Module, group: dist.ProcessGroup | None, cpu_buckets: bool
    ) -> None:
        """What every registration function does once the model is checked, before it installs
        anything: refuse a state registered on another live model; adopt ``group`` (the one the
        model reduces over; ``None``: the state's own) if ``process_group`` is ``None``, else
        check that ``process_group`` has its ranks in order; check ``objective_of_rank`` against
        the group adopted; create the gloo groups the hook will use beside it (a rendezvous of
        its ranks, here rather than inside backward). Raises alike on every rank, before the
        rendezvous.
        """
        registered = None if self._model is None else self._model()
        if registered is not None:
            raise ValueError(
                f"this BucketMOOState is already registered on another model "
                f"({type(registered).__name__}); create one state per DDP or FSDP model"
            )
        if group is None:
            group, described = self.group, "the state's process group"
        elif self.process_group is None:
            described = "the model's process group"
        elif _ranks(self.process_group) != _ranks(group):
            raise ValueError(
                f"state.process_group (ranks {_ranks(self.process_group)}) is not the process "
                f"group the model reduces over (ranks {_ranks(group)}); pass process_group=None "
                "to adopt the model's group, or a group with its ranks"
            )
        else:  # the state's own group over the model's ranks: the one the hook uses
            group, described = self.process_group, "process_group"
        self._check_world_size(group.size(), _described(described, group))
        self._host_group(group)
        if self.overlap and cpu_buckets:
            helper_group(group, OVERLAP)
        self.process_group = group
        self._model = weakref.ref(model)

    def _own_objective_key(self, rank: int) -> int:
        if self._objective is not None:
            return self._objective[1]
        if self.objective_of_rank is not None:
            return objective_key(self.objective_of_rank[rank])
        return objective_key(rank)

    def _config_digest(self, world_size: int) -> int:
        """What all ranks must agree on, besides the step: weighting, granularity, default map."""
        return objective_key(
            (
                self.weighting.config(),
                self.granularity,
                world_size,
                self.objective_of_rank,
                self.nonfinite,
                # Whether presence counts ride in the Gramian all-reduce: its size.
                self.absent,
                self._every_parameter_used,
            )
        )

    def _begin_step(self, group: dist.ProcessGroup) -> ObjectiveMap:
        """Exchange ``(step, config digest, objective key)`` with every rank and build the map.

        The step's low bit tells whether the rank's objective was set by :meth:`set_objective`
        (``2·iter + set``), so the payload stays 3 int64. The exchange is host-side (a gloo group
        over the same ranks when the group itself has no CPU backend), so it never synchronises
        with a GPU.
        """
        world_size, rank = group.size(), group.rank()
        self._check_world_size(world_size)
        self.ledger.world_size = world_size
        if self.diagnostics is not None and self.objective_of_rank is None:
            self.diagnostics.add_labels(range(world_size))  # the default ids
        config = self._config_digest(world_size)
        stamp = 2 * self.iter + (self._objective is not None)
        payload = torch.tensor([stamp, config, self._own_objective_key(rank)])
        gathered = torch.empty(world_size * payload.numel(), dtype=torch.int64)
        all_gather_single(gathered, payload, group=self._host_group(group))
        self.ledger.record_overhead(
            "objective_exchange", (world_size - 1) * payload.numel() * payload.element_size()
        )
        stamps, configs, keys = gathered.view(world_size, -1).T.tolist()
        steps = [s >> 1 for s in stamps]
        if len(set(steps)) != 1:
            raise RuntimeError(
                f"ranks are at different steps of the hook (state.iter per rank: {steps}); "
                "all ranks must construct or restore their BucketMOOState identically"
            )
        if len(set(configs)) != 1:
            raise ValueError(
                "ranks disagree on the BucketMOOState configuration (weighting, world size, "
                "objective_of_rank, granularity, nonfinite, absent, or how it was registered: "
                "register every rank's model alike); this rank has "
                f"weighting={self.weighting.config()}, "
                f"objective_of_rank={self.objective_of_rank!r}; ranks with a different "
                f"configuration: {[r for r, c in enumerate(configs) if c != config]}"
            )
        set_on = [r for r, s in enumerate(stamps) if s & 1]
        if 0 < len(set_on) < world_size:
            # A forgotten call would silently make that rank's default id an objective of its own.
            unset = [r for r, s in enumerate(stamps) if not s & 1]
            raise ValueError(
                f"state.set_objective was called on ranks {set_on} but not on ranks {unset} "
                f"before step {steps[0]}; a rank without it trains its default objective "
                "(objective_of_rank, else its rank) apart from the others: call "
                "state.set_objective(id) on every rank before backward(), or on none"
            )
        self._step_map = ObjectiveMap.from_keys(keys)
        self._held = []  # slices of an interrupted step are stale
        return self._step_map

    def _gramian_check(
        self, where: str, objectives: tuple[int, ...], averaging: Tensor
    ) -> Callable[[Tensor], None] | None:
        """What ``solve_shards`` calls on the all-reduced Gramians (``nonfinite="raise"``)."""
        if self.nonfinite != "raise":
            return None
        ids = self.objective_of_rank or range(averaging.shape[1])
        names = {objective_key(i): i for i in ids}
        if self._objective is not None:
            names[self._objective[1]] = self._objective[0]
        return functools.partial(
            raise_if_nonfinite, where=where, objectives=objectives, averaging=averaging, names=names
        )

    def _end_step(self) -> None:
        if self.diagnostics is not None:
            self.diagnostics.end_step(self.iter)
        self.iter += 1
        self.ledger.close_step()

    def _parameter_layout(self, segments: Sequence[Segment]) -> ParameterLayout | None:
        """The parameters of a slice (``segments``), when objectives may be absent from some."""
        if self.absent == "zero" or self._every_parameter_used:
            return None
        return ParameterLayout.of(segments, self.granularity)

    def _parameter_positions(self, bucket: dist.GradBucket) -> tuple[int, ...] | None:
        """Positions in ``model.parameters()`` of the bucket's parameters, if the model is known."""
        if self._parameter_index is None:
            return None
        try:
            return tuple(self._parameter_index[id(p)] for p in bucket.parameters())
        except KeyError:
            raise ValueError(
                f"bucket_moo_hook: bucket {bucket.index()} holds parameters of another model than "
                "the one this BucketMOOState was registered on; create one state per DDP model"
            ) from None

    def _host_group(self, group: dist.ProcessGroup) -> dist.ProcessGroup:
        if _has_cpu_backend(group):
            return group
        if self._metadata_group is None:
            self._metadata_group = helper_group(group, HOST)
        return self._metadata_group

    def _overlap_worker(self, group: dist.ProcessGroup) -> BucketWorker:
        """The worker thread for CPU buckets, over the copy of ``group`` that every state over
        its ranks shares (made at registration; with ``register_comm_hook`` directly, here at
        bucket 0, where every rank of the group makes it alike)."""
        if self._worker is None or self._worker.closed:
            self._worker = shared_worker(helper_group(group, OVERLAP))
        return self._worker

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        stream = self._side_streams.get(device)
        if stream is None:
            stream = self._side_streams[device] = torch.cuda.Stream(device)
        return stream

    def close(self) -> None:
        """Stop the overlap worker thread, if any, once the buckets handed to it are reduced.

        The thread is shared by the states over the same ranks; a later CPU bucket of any of
        them starts a new one (on the same copy of the process group). Optional: it also stops
        once no state holds it and at interpreter exit.
        """
        if self._worker is not None:
            self._worker.close()

    def _averaging_matrix(self, objective_map: ObjectiveMap, device: torch.device) -> Tensor:
        cache_key = (objective_map.keys, device)
        matrix = self._averaging.get(cache_key)
        if matrix is None:
            matrix = objective_map.averaging_matrix(device)
            self._averaging[cache_key] = matrix
            if len(self._averaging) > _AVERAGING_CACHE_SIZE:
                self._averaging.popitem(last=False)
        else:
            self._averaging.move_to_end(cache_key)
        return matrix

    # -- pickling, as PowerSGDState: without the process group -----------------------------------

    def __getstate__(self) -> dict[str, object]:
        return {slot: getattr(self, slot) for slot in self.__slots__ if slot not in _TRANSIENT}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.process_group = None
        self._metadata_group = None
        self._averaging = OrderedDict()
        self._step_map = None
        self._held = []
        self._parameter_index = None
        self._worker = None
        self._side_streams = {}
        self._workspace = Workspace()
        self._every_parameter_used = False
        self._model = None
        self.absent = "exclude"  # states pickled before the option existed
        for slot, value in state.items():
            setattr(self, slot, value)

    def __repr__(self) -> str:
        return (
            f"BucketMOOState(objective_of_rank={self.objective_of_rank!r}, "
            f"weighting={self.weighting!r}, granularity={self.granularity!r}, iter={self.iter})"
        )


def _ranks(group: dist.ProcessGroup) -> list[int]:
    return dist.get_process_group_ranks(group)


def _described(name: str, group: dist.ProcessGroup) -> str:
    return f"{name} (global ranks {_ranks(group)})"


def _has_cpu_backend(group: dist.ProcessGroup) -> bool:
    """Whether collectives on CPU tensors run on ``group`` (gloo, or a ``cpu:gloo,...`` group)."""
    return "gloo" in dist.get_backend(group)
