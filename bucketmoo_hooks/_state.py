import datetime
import functools
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ._compat import all_gather_single
from ._diagnostics import Diagnostics
from ._kernels import check_kernels
from ._ledger import CommLedger
from ._nonfinite import check_nonfinite, raise_if_nonfinite
from ._objectives import ObjectiveMap, objective_key
from ._protocol import Workspace
from ._worker import BucketWorker
from .weightings import Weighting, get_weighting

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
)
GRANULARITIES = ("bucket", "parameter", "global")
_STATE_DICT_VERSION = 1


def _keys_of(objective_of_rank: Sequence[Hashable] | None) -> list[int] | None:
    """Objective ids as their keys: comparable across processes and safe to save."""
    return None if objective_of_rank is None else [objective_key(o) for o in objective_of_rank]


class BucketMOOState:
    r"""State of :func:`bucket_moo_hook`: which objective each rank trains, and how to weight them.

    Each rank's gradient is the gradient of its objective (its language group). In every bucket
    the hook replaces DDP's average by ``d = Σ_ℓ w_ℓ ḡ_ℓ``, where ``ḡ_ℓ`` is the average gradient
    of the ranks training objective ``ℓ`` and ``w = weighting(G)`` is computed from the bucket's
    ``L×L`` Gramian ``G_ab = ⟨ḡ_a, ḡ_b⟩`` (DESIGN.md §3).

    Ranks agree on the objective map through a tiny host-side exchange (3 int64 per rank) at the
    start of every step, which also checks that all ranks are at the same step with the same
    configuration; a mismatch raises on every rank instead of silently combining wrong rows.

    Args:
        objective_of_rank: The objective (language) id of every rank of the process group, in rank
            order. Ids are any hashable, picklable values; ranks with equal ids form a group whose
            gradients are averaged first. ``None`` (default): every rank is its own objective, with
            its rank as id. Its length must equal the process group's size.
        weighting: How ``G`` becomes weights: a name (:func:`bucketmoo_hooks.weighting_names`,
            e.g. ``"mean"``, ``"mgda"``), a :class:`~bucketmoo_hooks.weightings.Weighting`, or a
            callable ``(gramian: Tensor[L, L]) -> Tensor[L]`` run on the Gramian's device.
        process_group: The group the hook communicates over; ``None`` is the default group. It
            must be the group the DDP model reduces over (:func:`register_bucket_moo_hook` checks).
        diagnostics: A :class:`~bucketmoo_hooks.Diagnostics` to record cosine similarities,
            norms, weights and update norms per bucket and step (on the device; pulled to the
            host every ``log_every`` steps). ``None`` (default) records nothing.
        granularity: What one weight vector covers (DESIGN.md §5). ``"bucket"`` (default): one
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
            buckets on a worker thread of this state that reduces them in order over a copy of
            the process group (created at the first bucket, like the host group, with the
            group's timeout; the thread stops when the state is garbage-collected, at exit, or
            on :meth:`close`). The worker also runs the step's objective exchange, so errors
            found there (ranks at different steps or configured differently) reach
            ``backward()`` as a ``RuntimeError`` whose message names the bucket and step. CPU
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
        "_held",
        "_metadata_group",
        "_objective",
        "_parameter_index",
        "_side_streams",
        "_step_map",
        "_worker",
        "_workspace",
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
            objective_of_rank = tuple(objective_of_rank)
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
        if dist.is_initialized() or process_group is not None:
            self._check_world_size(self.group.size())

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
        """
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
            "weighting": repr(self.weighting),
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
        for name, current in (
            ("granularity", self.granularity),
            ("weighting", repr(self.weighting)),
            ("objective_keys", _keys_of(self.objective_of_rank)),
        ):
            if state_dict[name] != current:
                raise ValueError(
                    f"the checkpoint was saved with {name}={state_dict[name]!r}, but this state "
                    f"has {name}={current!r}; build the state as it was when saved"
                )
        self.weighting.load_state_dict(state_dict["weighting_state"])
        self.iter = step
        self.ledger.totals = dict(state_dict["ledger_totals"])
        self.ledger.steps = int(state_dict["ledger_steps"])

    # -- used by the hook ------------------------------------------------------------------------

    def _check_world_size(self, world_size: int) -> None:
        if self.objective_of_rank is not None and len(self.objective_of_rank) != world_size:
            raise ValueError(
                f"objective_of_rank has {len(self.objective_of_rank)} entries but the process "
                f"group has {world_size} ranks; give one objective id per rank"
            )

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
                repr(self.weighting),
                self.granularity,
                world_size,
                self.objective_of_rank,
                self.nonfinite,
            )
        )

    def _begin_step(self, group: dist.ProcessGroup) -> ObjectiveMap:
        """Exchange ``(step, config digest, objective key)`` with every rank and build the map.

        The exchange is host-side (a gloo group over the same ranks when the group itself has no
        CPU backend), so it never synchronises with a GPU.
        """
        world_size, rank = group.size(), group.rank()
        self._check_world_size(world_size)
        self.ledger.world_size = world_size
        if self.diagnostics is not None and self.objective_of_rank is None:
            self.diagnostics.add_labels(range(world_size))  # the default ids
        config = self._config_digest(world_size)
        payload = torch.tensor([self.iter, config, self._own_objective_key(rank)])
        gathered = torch.empty(world_size * payload.numel(), dtype=torch.int64)
        all_gather_single(gathered, payload, group=self._host_group(group))
        self.ledger.record_overhead(
            "objective_exchange", (world_size - 1) * payload.numel() * payload.element_size()
        )
        steps, configs, keys = gathered.view(world_size, -1).T.tolist()
        if len(set(steps)) != 1:
            raise RuntimeError(
                f"ranks are at different steps of the hook (state.iter per rank: {steps}); "
                "all ranks must construct or restore their BucketMOOState identically"
            )
        if len(set(configs)) != 1:
            raise ValueError(
                "ranks disagree on the BucketMOOState configuration (weighting, world size or "
                f"objective_of_rank); this rank has weighting={self.weighting!r}, "
                f"objective_of_rank={self.objective_of_rank!r}; ranks with a different "
                f"configuration: {[r for r, c in enumerate(configs) if c != config]}"
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

    def _parameter_positions(self, bucket: dist.GradBucket) -> tuple[int, ...] | None:
        """Positions in ``model.parameters()`` of the bucket's parameters, if the model is known."""
        if self._parameter_index is None:
            return None
        return tuple(self._parameter_index[id(p)] for p in bucket.parameters())

    def _host_group(self, group: dist.ProcessGroup) -> dist.ProcessGroup:
        if _has_cpu_backend(group):
            return group
        if self._metadata_group is None:
            self._metadata_group = dist.new_group(
                ranks=dist.get_process_group_ranks(group),
                timeout=_group_timeout(group),
                backend="gloo",
                use_local_synchronization=True,
            )
        return self._metadata_group

    def _overlap_worker(self, group: dist.ProcessGroup) -> BucketWorker:
        """The worker thread for CPU buckets, with its copy of ``group`` (made on first use, at
        bucket 0, where every rank of the group creates it alike)."""
        if self._worker is not None and not self._worker.closed:
            return self._worker
        if self._worker is not None:  # closed: a new thread on the same copy of the group
            self._worker = BucketWorker(self._worker.group)
            return self._worker
        copy = dist.new_group(
            ranks=dist.get_process_group_ranks(group),
            timeout=_group_timeout(group),
            backend="gloo",
            use_local_synchronization=True,
        )
        if copy.rank() != group.rank():  # new_group sorts the ranks, as torch's groups are
            raise RuntimeError(
                "bucket_moo_hook's overlap needs a process group whose ranks are in ascending "
                "order; pass BucketMOOState(overlap=False) for this group"
            )
        self._worker = BucketWorker(copy)
        return self._worker

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        stream = self._side_streams.get(device)
        if stream is None:
            stream = self._side_streams[device] = torch.cuda.Stream(device)
        return stream

    def close(self) -> None:
        """Stop the overlap worker thread, if any, once the buckets handed to it are reduced.

        Optional: it also stops when the state is garbage-collected and at interpreter exit.
        A later CPU bucket starts a new thread (on the same copy of the process group).
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
        for slot, value in state.items():
            setattr(self, slot, value)

    def __repr__(self) -> str:
        return (
            f"BucketMOOState(objective_of_rank={self.objective_of_rank!r}, "
            f"weighting={self.weighting!r}, granularity={self.granularity!r}, iter={self.iter})"
        )


def _group_timeout(group: dist.ProcessGroup) -> datetime.timedelta | None:
    """The collective timeout of ``group``, for the groups the state makes beside it (a stalled
    peer must fail them as soon as it fails the user's group; ``new_group`` defaults to 30
    minutes). ``None`` (``new_group``'s default) when no backend of the group reports one."""
    for device in group._device_types:
        options = getattr(group._get_backend(device), "options", None)
        timeout = getattr(options, "_timeout", None)
        if timeout is not None:
            return timeout
    return None


def _has_cpu_backend(group: dist.ProcessGroup) -> bool:
    """Whether collectives on CPU tensors run on ``group`` (gloo, or a ``cpu:gloo,...`` group)."""
    return "gloo" in dist.get_backend(group)
