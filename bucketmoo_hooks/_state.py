"""``BucketMOOState``: the configuration, progress and checkpoints of bucket-level MOO."""

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch.distributed as dist
from torch import Tensor

from ._absent import check_absent
from ._core import PROTOCOLS
from ._diagnostics import Diagnostics
from ._hierarchical import check_ranks_per_node
from ._kernels import check_kernels
from ._ledger import CommLedger
from ._nonfinite import check_nonfinite
from ._objectives import ObjectiveMap, canonical_objective, objective_key
from ._runtime import Runtime, described_group
from ._sketch import check_sketch_size
from ._steps import StepAgreement
from .weightings import CallableWeighting, Weighting, get_weighting

# Rebuilt after unpickling rather than saved: tied to the process.
_TRANSIENT = ("process_group", "_runtime")
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
            of the group the model reduces over (:func:`~bucketmoo_hooks.install_bucket_moo`
            checks). ``None`` (default): ``install_bucket_moo`` adopts the model's group, and with
            ``register_comm_hook`` directly the hook uses the default group. A given group checks
            ``objective_of_rank`` here; with ``None`` that waits for the adopted group.
        diagnostics: A :class:`~bucketmoo_hooks.Diagnostics` to record cosine similarities,
            norms, weights and update norms per bucket and step (on the device; pulled to the
            host every ``log_every`` steps). ``None`` (default) records nothing.
        granularity: What one weight vector covers (docs/design.md §5). ``"bucket"`` (default): one
            per DDP bucket, the paper's method. ``"parameter"``: one per parameter tensor in the
            bucket; the ``S`` Gramians of a bucket's ``S`` parameters go in one all-reduce
            (``S·L²`` fp32 numbers). ``"global"``: one for the whole model from the sum of the
            bucket Gramians (the paper's global-MOO baseline); every bucket's slice is held until
            the last bucket (``L·⌈n/R⌉`` fp32, or the ``R·⌈n/R⌉`` received elements the fused
            kernels read when that is smaller), so memory grows with the model
            (:attr:`held_bytes`).
        kernels: Where a bucket's compute (group averages, Gramian, weights, combination; the
            sketch protocol's fold) runs.
            ``"auto"`` (default): the fused CUDA kernels (README, "CUDA kernels") for CUDA buckets
            when CuPy is installed (``pip install bucketmoo_hooks[cuda]``) and the bucket is
            supported, else the torch path; the choice is logged once. ``"torch"``: always the
            torch path. ``"cuda"``: always the kernels (raises ``RuntimeError`` here without CuPy
            or a GPU, and in the hook for a bucket they cannot run).
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
            :func:`~bucketmoo_hooks.install_bucket_moo`): every rank then uses every
            parameter. ``"zero"``: DDP's convention, the zero gradient counts (MGDA then gives
            such a parameter no update when another objective is present).
        protocol: How the ranks exchange a bucket (docs/protocols.md). ``"shard"`` (default):
            the paper's exact all-to-all / Gramian all-reduce / all-gather, the bytes of a ring
            all-reduce plus ``L²`` fp32 numbers per bucket. ``"sketch"``: the weights first, from
            Gramians estimated by a random sketch of ``sketch_size`` numbers per objective (one
            small collective), then each rank scales its own gradient by its weight and the
            engine's ordinary SUM all-reduce (or reduce-scatter) sums them: the engine's
            topology-optimal collective, plus ``2(R−1)/R·L·k`` fp32 numbers per bucket. Unbiased,
            with a relative error of about ``√(2/k)`` on each Gramian entry; problems of at most
            ``sketch_size`` elements are exact (docs/protocols.md, "The sketch protocol").
            ``"hierarchical"``: the shard protocol's exact result, exchanged within each node
            first and then across nodes among the ranks with the same local index, so that a
            rank sends ``(L_k+1)·c·(N−1)`` elements across nodes (``L_k`` objectives on its
            node, ``c = ⌈n/R⌉``) where the flat all-to-all sends ``2·G·c·(N−1)``: a ring's
            bytes when every node trains one objective (docs/protocols.md, "The hierarchical
            protocol"). Needs ``ranks_per_node``.
        sketch_size: ``k`` for ``protocol="sketch"`` (default 4096, in [16, 2²⁰]); not accepted
            with another protocol.
        ranks_per_node: ``G``, the ranks on each node, consecutive in global rank order as
            torchrun numbers them. ``None`` (default): torchrun's ``LOCAL_WORLD_SIZE``, or the
            DeepSpeed launcher's ``LOCAL_SIZE``, when set; else unknown. The hierarchical
            protocol runs on it (it must divide the process group's size, whose ranks must come
            node by node; registration checks, on every rank alike); every protocol uses it to
            split the ledger's bytes by link class (:attr:`CommLedger.link_totals`; unknown: all
            within one node).

    Attributes:
        iter: Synchronised backward passes completed (advanced on the last bucket of each step).
        ledger: :class:`~bucketmoo_hooks.CommLedger` with the bytes this rank sent, per bucket and
            per step, through every collective of the hook.
        held_bytes: Bytes of bucket slices the last step held until its last bucket
            (``granularity="global"``; 0 otherwise).

    Pickling drops the process group (and anything tied to it): an unpickled state uses the
    default group; set ``state.process_group`` afterwards if another group is needed.
    """

    __slots__ = (  # noqa: RUF023 (grouped by role, as the docstring lists them)
        # -- configuration (what the ranks must agree on; see _config_digest) ----------------------
        "absent",
        "diagnostics",
        "granularity",
        "kernels",
        "nonfinite",
        "objective_of_rank",
        "overlap",
        "process_group",
        "protocol",
        "ranks_per_node",
        "sketch_size",
        "weighting",
        # -- progress (iter and the ledger's totals are saved by state_dict) -----------------------
        "iter",
        "ledger",
        "held_bytes",
        # -- owned ---------------------------------------------------------------------------------
        "_steps",  # StepAgreement: set_objective's value and the step's objective map
        "_runtime",  # Runtime: model, groups, worker, streams, buffers; never pickled
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
        protocol: str = "shard",
        sketch_size: int | None = None,
        ranks_per_node: int | None = None,
    ) -> None:
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {tuple(PROTOCOLS)}, got {protocol!r}")
        self.sketch_size = check_sketch_size(sketch_size, protocol)
        self.ranks_per_node = check_ranks_per_node(ranks_per_node)
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
        self.protocol = protocol
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
        self.ledger = CommLedger()
        self._steps = StepAgreement()
        self._runtime = Runtime()
        if process_group is not None:  # else the group is known at registration
            self._check_world_size(
                process_group.size(), described_group("process_group", process_group)
            )

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
        """Set the objective this rank trains from the next step on (call before the forward).

        Lets the rank → objective map change every step, e.g. when there are more languages than
        ranks and each step samples some. The value overrides ``objective_of_rank`` for this rank
        and stays until changed. A step that has already started (its first bucket was reduced)
        keeps its map.

        Call it before the step's forward: from the second step of the process on, the ranks
        start exchanging their objectives at the forward (so that backward does not wait for
        it), and an objective changed after that cannot reach the step's map (the step keeps the
        previous one, and the next step raises on every rank).

        Call it on every rank or on none: a step where some ranks set their objective and others
        did not raises on every rank (a forgotten call would silently make that rank's default
        id an objective of its own). A 0-d tensor or numpy scalar counts as its Python value
        (``tensor(0)`` is ``0``); a tensor with dimensions and NaN are refused.
        """
        objective = self._steps.set_objective(objective, self)
        if self.diagnostics is not None:
            self.diagnostics.add_labels([objective])

    @property
    def objective_map(self) -> ObjectiveMap | None:
        """The rank → objective map of the step in progress, else of the last step (or ``None``)."""
        return self._steps.objective_map

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
            "protocol": self.protocol,
            "sketch_size": self.sketch_size,
            "ranks_per_node": self.ranks_per_node,
            "ledger_totals": dict(self.ledger.totals),
            "ledger_link_totals": dict(self.ledger.link_totals),
            "ledger_steps": self.ledger.steps,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; the configuration must match this state's.

        Raises:
            TypeError: ``state_dict`` is not a dict, or an entry has the wrong type.
            ValueError: Missing or unknown keys, another version, or a checkpoint saved with a
                different weighting, granularity or ``objective_of_rank``. The protocol, its
                ``sketch_size`` and ``ranks_per_node`` may differ: a run can resume under
                another protocol, on other nodes.
        """
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        expected = set(self.state_dict())
        # Checkpoints saved before the sketch protocol existed were of the shard protocol; those
        # saved before ranks_per_node, of unknown nodes (their ledger: no link classes).
        state_dict = {
            "protocol": "shard",
            "sketch_size": None,
            "ranks_per_node": None,
            "ledger_link_totals": self.ledger.link_totals,
            **state_dict,
        }
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
        # The protocol may change on resume (to "sketch" when a run outgrows a node): the
        # weighting's state and the step do not depend on how buckets are exchanged.
        if state_dict["protocol"] not in PROTOCOLS:
            raise ValueError(
                f"state_dict['protocol'] must be one of {tuple(PROTOCOLS)}, "
                f"got {state_dict['protocol']!r}"
            )
        check_sketch_size(state_dict["sketch_size"], state_dict["protocol"])
        if state_dict["ranks_per_node"] is not None:
            check_ranks_per_node(state_dict["ranks_per_node"])
        links = state_dict["ledger_link_totals"]
        if not isinstance(links, dict) or set(links) != set(self.ledger.link_totals):
            raise ValueError(
                f"state_dict['ledger_link_totals'] must have the keys "
                f"{sorted(self.ledger.link_totals)}, got {links!r}"
            )
        self.weighting.load_state_dict(state_dict["weighting_state"])
        self.iter = step
        self.ledger.totals = dict(state_dict["ledger_totals"])
        self.ledger.link_totals = {link: int(n) for link, n in links.items()}
        self.ledger.steps = int(state_dict["ledger_steps"])

    # -- used by the hook ------------------------------------------------------------------------

    def _check_world_size(self, world_size: int, group: str = "the process group") -> None:
        if self.objective_of_rank is not None and len(self.objective_of_rank) != world_size:
            raise ValueError(
                f"objective_of_rank has {len(self.objective_of_rank)} entries but {group} has "
                f"{world_size} ranks; give one objective id per rank of that group"
            )

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
                self._runtime.every_parameter_used,
                self.protocol,
                self.sketch_size,
                # Only the hierarchical protocol's exchange depends on it (elsewhere it labels
                # the ledger's bytes, and nodes of different sizes are fine).
                self.ranks_per_node if self.protocol == "hierarchical" else None,
            )
        )

    def close(self) -> None:
        """Stop the overlap worker thread, if any, once the buckets handed to it are reduced.

        The thread is shared by the states over the same ranks; a later CPU bucket of any of
        them starts a new one (on the same copy of the process group). Optional: it also stops
        once no state holds it and at interpreter exit.
        """
        self._runtime.close()

    # -- pickling, as PowerSGDState: without the process group -----------------------------------

    def __getstate__(self) -> dict[str, object]:
        return {slot: getattr(self, slot) for slot in self.__slots__ if slot not in _TRANSIENT}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.process_group = None
        self._runtime = Runtime()
        # States pickled by earlier versions: options they predate, set_objective's value.
        self.absent, self.protocol, self.sketch_size = "exclude", "shard", None
        self.ranks_per_node = None
        self._steps = StepAgreement()
        if "_objective" in state:
            self._steps.objective = state["_objective"]  # type: ignore[assignment]
        for slot, value in state.items():
            if slot in self.__slots__:
                setattr(self, slot, value)

    def __repr__(self) -> str:
        return (
            f"BucketMOOState(objective_of_rank={self.objective_of_rank!r}, "
            f"weighting={self.weighting!r}, granularity={self.granularity!r}, "
            f"protocol={self.protocol!r}, "
            + (f"sketch_size={self.sketch_size}, " if self.sketch_size is not None else "")
            + (f"ranks_per_node={self.ranks_per_node}, " if self.ranks_per_node is not None else "")
            + f"iter={self.iter})"
        )
