"""The ranks' agreement on each step: its number, the configuration, and who trains what.

At the start of every step (DDP's bucket 0, FSDP's first unit of a backward pass) the ranks
all-gather ``(step, config digest, objective key)``, 3 int64 each, on a host-side group: a
mismatch raises on every rank instead of silently combining wrong rows.
"""

from collections.abc import Hashable
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from ._collectives import all_gather_bytes, nbytes
from ._compat import all_gather_single
from ._objectives import ObjectiveMap, canonical_objective, objective_key

if TYPE_CHECKING:
    from ._state import BucketMOOState


class StepAgreement:
    """The objective this rank set for itself, and the objective map of the current step.

    Pickles without the step's map (a step does not outlive its process).
    """

    __slots__ = ("objective", "objective_map")

    def __init__(self) -> None:
        # (id, key) given to set_objective, else None: objective_of_rank applies.
        self.objective: tuple[Hashable, int] | None = None
        # The rank → objective map of the step in progress, else of the last step.
        self.objective_map: ObjectiveMap | None = None

    def set_objective(self, objective: Hashable) -> Hashable:
        objective = canonical_objective(objective)
        self.objective = (objective, objective_key(objective))
        return objective

    def own_key(self, state: "BucketMOOState", rank: int) -> int:
        if self.objective is not None:
            return self.objective[1]
        if state.objective_of_rank is not None:
            return objective_key(state.objective_of_rank[rank])
        return objective_key(rank)

    def begin(self, state: "BucketMOOState", group: dist.ProcessGroup) -> ObjectiveMap:
        """Exchange ``(step, config digest, objective key)`` with every rank and build the map.

        The step's low bit tells whether the rank's objective was set by ``set_objective``
        (``2·iter + set``), so the payload stays 3 int64. The exchange is host-side (a gloo group
        over the same ranks when the group itself has no CPU backend), so it never synchronises
        with a GPU.
        """
        world_size, rank = group.size(), group.rank()
        state._check_world_size(world_size)
        state.ledger.world_size = world_size
        if state.diagnostics is not None and state.objective_of_rank is None:
            state.diagnostics.add_labels(range(world_size))  # the default ids
        config = state._config_digest(world_size)
        stamp = 2 * state.iter + (self.objective is not None)
        payload = torch.tensor([stamp, config, self.own_key(state, rank)])
        gathered = torch.empty(world_size * payload.numel(), dtype=torch.int64)
        all_gather_single(gathered, payload, group=state._runtime.host_group(group))
        state.ledger.record_overhead(
            "objective_exchange", all_gather_bytes(nbytes(gathered), world_size)
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
        self.objective = saved["objective"]  # type: ignore[assignment]
        self.objective_map = None
