"""The ranks' agreement on each step: its number, the configuration, and who trains what.

Every step the ranks all-gather ``(step, config digest, objective key)``, 3 int64 each, on a
host-side group: a mismatch raises on every rank instead of silently combining wrong rows.

The all-gather is started before backward and waited for at the step's first bucket (DDP's
bucket 0, FSDP's first unit): started there, it would stop the fastest rank from launching the
rest of its backward until the slowest rank reached its first bucket. It starts at the step's
first forward with gradients enabled (a forward pre-hook the installers register), from the
second step of the process on; the first step, and a hook registered without an installer,
exchange at the first bucket. Whether a step starts early depends on nothing a rank decides
alone (not on where or whether it calls ``set_objective``), so every rank issues the same
all-gather on the same group. An objective changed by ``set_objective`` after the step's
exchange started cannot reach that step: the next exchange reports it and every rank raises.
"""

import time
from collections.abc import Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from ._collectives import all_gather_bytes, nbytes
from ._compat import all_gather_single
from ._objectives import ObjectiveMap, canonical_objective, objective_key

if TYPE_CHECKING:
    from ._state import BucketMOOState


@dataclass(slots=True)
class _Pending:
    """An all-gather of the step's payloads in flight."""

    step: int
    config: int
    key: int  # this rank's objective key as sent
    gathered: torch.Tensor
    work: dist.Work


class StepAgreement:
    """The objective this rank set for itself, and the objective map of the current step.

    Pickles without the step's map and exchange (a step does not outlive its process).

    Attributes:
        waited_s: How long the last step's first bucket waited for the exchange (host seconds).
    """

    __slots__ = ("_late", "_pending", "_warm", "objective", "objective_map", "waited_s")

    def __init__(self) -> None:
        # (id, key) given to set_objective, else None: objective_of_rank applies.
        self.objective: tuple[Hashable, int] | None = None
        # The rank → objective map of the step in progress, else of the last step.
        self.objective_map: ObjectiveMap | None = None
        self._pending: _Pending | None = None
        # This rank changed its objective after the step's exchange had started (reported to
        # every rank by the next exchange).
        self._late = False
        self._warm = False  # a step was opened in this process: early starts are allowed
        self.waited_s = 0.0

    def set_objective(self, objective: Hashable, state: "BucketMOOState") -> Hashable:
        objective = canonical_objective(objective)
        self.objective = (objective, objective_key(objective))
        pending = self._pending
        if pending is not None and pending.step == state.iter and pending.key != self.objective[1]:
            self._late = True
        return objective

    def start(self, state: "BucketMOOState") -> None:
        """The forward pre-hook: start the step's exchange over the state's group unless it has
        started, with gradients enabled (a no-op in the process's first step)."""
        if not (self._warm and torch.is_grad_enabled()):
            return
        if state.process_group is None or not dist.is_initialized():
            return
        if self._pending is None or self._pending.step != state.iter:
            self._pending = self._issue(state, state.process_group)

    def own_key(self, state: "BucketMOOState", rank: int) -> int:
        if self.objective is not None:
            return self.objective[1]
        if state.objective_of_rank is not None:
            return objective_key(state.objective_of_rank[rank])
        return objective_key(rank)

    def _issue(self, state: "BucketMOOState", group: dist.ProcessGroup) -> _Pending:
        """Start the all-gather of ``(stamp, config digest, objective key)``.

        The stamp ``4·iter + 2·late + set`` carries whether the rank's objective was set by
        ``set_objective`` and whether it changed after the previous step's exchange had started,
        so the payload stays 3 int64. The exchange is host-side (a gloo group over the same ranks
        when the group itself has no CPU backend), so it never synchronises with a GPU.
        """
        world_size, rank = group.size(), group.rank()
        state._check_world_size(world_size)
        config = state._config_digest(world_size)
        key = self.own_key(state, rank)
        stamp = 4 * state.iter + 2 * self._late + (self.objective is not None)
        self._late = False
        payload = torch.tensor([stamp, config, key])
        gathered = torch.empty(world_size * payload.numel(), dtype=torch.int64)
        work = all_gather_single(
            gathered, payload, group=state._runtime.host_group(group), async_op=True
        )
        assert work is not None
        return _Pending(state.iter, config, key, gathered, work)

    def begin(self, state: "BucketMOOState", group: dist.ProcessGroup) -> ObjectiveMap:
        """Wait for the step's exchange (issued here if it was not started early), check that
        every rank is at this step with this configuration, and build the objective map."""
        world_size = group.size()
        pending, self._pending = self._pending, None
        if pending is None or pending.step != state.iter:
            pending = self._issue(state, group)
        start = time.perf_counter()
        pending.work.wait()
        self.waited_s = time.perf_counter() - start
        self._warm = True
        state.ledger.world_size = world_size
        if state.diagnostics is not None and state.objective_of_rank is None:
            state.diagnostics.add_labels(range(world_size))  # the default ids
        gathered, config = pending.gathered, pending.config
        state.ledger.record_overhead(
            "objective_exchange", all_gather_bytes(nbytes(gathered), world_size)
        )
        stamps, configs, keys = gathered.view(world_size, -1).T.tolist()
        steps = [s >> 2 for s in stamps]
        if len(set(steps)) != 1:
            raise RuntimeError(
                f"ranks are at different steps of the hook (state.iter per rank: {steps}); "
                "all ranks must construct or restore their BucketMOOState identically"
            )
        if len(set(configs)) != 1:
            raise ValueError(
                "ranks disagree on the BucketMOOState configuration (weighting, world size, "
                "objective_of_rank, granularity, nonfinite, absent, protocol, sketch_size and "
                "ranks_per_node, or "
                "how it was registered: register every rank's model alike); this rank has "
                f"weighting={state.weighting.config()}, "
                f"objective_of_rank={state.objective_of_rank!r}, protocol={state.protocol!r}, "
                f"sketch_size={state.sketch_size!r}, ranks_per_node={state.ranks_per_node!r}; "
                "ranks with a different "
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
        late = [r for r, s in enumerate(stamps) if s & 2]
        if late:
            raise ValueError(
                f"ranks {late} called state.set_objective with a new objective during step "
                f"{steps[0] - 1} after its first forward with gradients enabled, when the ranks "
                "had already started exchanging their objectives: that step trained the "
                "objective set before; call state.set_objective(id) before the step's forward"
            )
        self.objective_map = ObjectiveMap.from_keys(keys)
        return self.objective_map

    def end(self, state: "BucketMOOState") -> None:
        if state.diagnostics is not None:
            state.diagnostics.end_step(state.iter)
        state.iter += 1
        state.ledger.close_step()

    def __getstate__(self) -> dict[str, object]:
        return {"objective": self.objective}

    def __setstate__(self, saved: dict[str, object]) -> None:
        self.__init__()  # type: ignore[misc]
        self.objective = saved["objective"]  # type: ignore[assignment]
