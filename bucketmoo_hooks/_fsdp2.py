"""FSDP2 (``fully_shard``): every unit's reduce-scatter goes through the core.

FSDP2 lays a unit's gradients out as ``[R, c]``, row ``r`` being the shard rank ``r`` will own
(every parameter padded to a multiple of ``R`` rows). With the shard protocol (docs/design.md
§3) that is step 1's layout already, so it runs without padding and without step 7: an
all-to-all gives rank ``j`` its slice ``S_j`` of every rank's gradient, and the combined slice
``d_j`` *is* the reduce-scatter output. Per rank it sends ``(R−1)·c·b`` bytes, exactly a
reduce-scatter, plus the ``L×L`` fp32 Gramian all-reduce.

HSDP (a ``(replicate, shard)`` mesh, one objective per replica): each replica reduce-scatters its
gradient as usual (one objective, a plain sum), and the all-reduce across replicas becomes the
conflict-aware step, run on the rank's shard through FSDP's all-reduce hook, with the Gramian
summed over the shard group too so that it covers the whole unit.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ReduceOp
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter

from . import _core
from ._collectives import Collectives
from ._ledger import BucketTraffic
from ._objectives import ObjectiveMap
from ._protocol import Gradient
from ._runtime import ranks_of, register
from ._state import BucketMOOState
from ._units import BackwardSteps, FSDPUnit

# What install_bucket_moo calls on every unit; FSDP2 of torch < 2.11 lacks some of them.
_REQUIRED_API = (
    "set_custom_reduce_scatter",
    "set_gradient_divide_factor",
    "set_force_sum_reduction_for_comms",
    "set_all_reduce_hook",
    "set_reduce_scatter_unused_params",
)


def _param_groups(module: FSDPModule) -> list:
    """The FSDP2 parameter groups of ``module`` (a list since torch 2.13, one group before)."""
    state = module._get_fsdp_state()
    if hasattr(state, "_fsdp_param_groups"):
        return list(state._fsdp_param_groups)
    if hasattr(state, "_fsdp_param_group"):
        group = state._fsdp_param_group
        return [] if group is None else [group]
    raise RuntimeError(
        f"unsupported FSDP2 version (torch {torch.__version__}): its state has neither "
        "_fsdp_param_groups nor _fsdp_param_group; bucketmoo_hooks supports torch 2.11 to 2.13"
    )


@dataclass(slots=True)
class _Hybrid:
    """HSDP layout: the replicate and shard groups of this rank, and every replica's ranks."""

    replicate_group: dist.ProcessGroup
    shard_group: dist.ProcessGroup
    replicas: list[list[int]]  # global ranks of every replica (mesh rows)
    positions: dict[int, int]  # global rank → position in the state's group

    def replica_map(self, world_map: ObjectiveMap) -> ObjectiveMap:
        """The objective of every rank of the replicate group (one per replica).

        Raises on every rank alike (all ranks hold the same world map) if a replica's ranks do
        not all train the same objective: their gradients are summed before any weighting.
        """
        keys = world_map.keys
        for replica in self.replicas:
            replica_keys = {keys[self.positions[r]] for r in replica}
            if len(replica_keys) != 1:
                raise ValueError(
                    f"HSDP with bucket-MOO needs one objective per replica, but the ranks "
                    f"{replica} of one replica train {len(replica_keys)} objectives this step; "
                    "give every rank of a replica the same objective id"
                )
        return ObjectiveMap.from_keys(
            [keys[self.positions[r]] for r in ranks_of(self.replicate_group)]
        )


class BucketMOOReduceScatter(ReduceScatter):
    r"""FSDP2 reduce-scatter of one unit that combines the ranks' objective gradients.

    Installed by :func:`install_bucket_moo` (``FSDPModule.set_custom_reduce_scatter``). FSDP calls
    it with the unit's flat gradient ``[R·c]`` (row ``r`` = the shard rank ``r`` owns) and a
    ``[c]`` output; it writes this rank's shard of ``d = Σ_ℓ w_ℓ ḡ_ℓ``, ``w`` from the unit's
    Gramian, on the scale of an average. FSDP must therefore divide nothing: ``op`` must be
    ``AVG``, or ``SUM`` with a gradient divide factor of 1 (what :func:`install_bucket_moo` sets);
    any other request (``PREMUL_SUM`` from a custom divide factor, or a ``SUM`` that FSDP would
    divide afterwards) raises instead of returning a wrongly scaled gradient. The work is done
    when the call returns (on CUDA: queued on the current stream), so nothing is returned to
    wait on.
    """

    def __init__(
        self,
        state: BucketMOOState,
        unit: FSDPUnit,
        steps: BackwardSteps,
        param_group: object,
        hybrid: _Hybrid | None,
    ) -> None:
        self.state = state
        self.unit = unit
        self._steps = steps
        self._param_group = param_group  # FSDPParamGroup: its divide factor is read per call
        self._hybrid = hybrid
        # HSDP: opened by the reduce-scatter, finished by the all-reduce hook.
        self._pending: tuple[BucketTraffic, ObjectiveMap] | None = None

    def allocate(self, size: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> Tensor:
        return torch.empty(size, dtype=dtype, device=device)

    def __call__(
        self,
        output_tensor: Tensor,
        input_tensor: Tensor,
        group: dist.ProcessGroup,
        op: object,
        async_op: bool = False,
    ) -> None:
        self._check_scaling(op)
        if not input_tensor.is_floating_point():
            raise TypeError(
                f"{self.unit.label}: bucket-MOO needs floating-point gradients, "
                f"got {input_tensor.dtype}"
            )
        traffic, objective_map = self._open(input_tensor)
        comm = Collectives(group, traffic, ranks_per_node=self.state.ranks_per_node)
        if self._hybrid is not None:
            # Within a replica every rank trains one objective: a plain sum; the conflict-aware
            # step is the cross-replica all-reduce (``cross_replica``).
            comm.reduce_scatter(output_tensor, input_tensor).wait()
            self._pending = (traffic, objective_map)
            return
        unit = self._reduced_unit(input_tensor.numel() // comm.world_size)
        averaging = self.state._runtime.averaging(objective_map, input_tensor.device)
        gradient = Gradient(input_tensor, output_tensor, unit.segment_sizes, rows=True)
        _core.reduce(self.state, comm, unit.bucket, gradient, objective_map, averaging)

    def cross_replica(self, output: Tensor) -> None:
        """HSDP all-reduce hook: replace the average over replicas by the conflict-aware step.

        ``output`` holds this rank's shard summed over its replica (``m`` ranks): ``R'`` replicate
        ranks run the protocol on it as an all-reduce, with averaging matrix ``M/m`` so that row
        ``ℓ`` is objective ``ℓ``'s mean gradient, and the Gramian all-reduced over the shard
        group as well, so that it covers the whole unit. Bytes: those of the all-reduce it
        replaces.
        """
        hybrid = self._hybrid
        assert hybrid is not None
        # Without a reduce-scatter (one rank per replica), FSDP calls the hook directly.
        traffic, objective_map = self._pending or self._open(output)
        self._pending = None
        comm = Collectives(
            hybrid.replicate_group, traffic, hybrid.shard_group, self.state.ranks_per_node
        )
        averaging = self.state._runtime.averaging(objective_map, output.device)
        averaging = averaging / hybrid.shard_group.size()
        unit = self._reduced_unit(output.numel())
        gradient = Gradient(output, None, unit.segment_sizes)
        future = _core.reduce(self.state, comm, unit.bucket, gradient, objective_map, averaging)
        assert future is not None  # an all-reduce's result
        future.wait()

    def _open(self, flat: Tensor) -> tuple[BucketTraffic, ObjectiveMap]:
        """Open the unit (and the step at a backward pass's first unit): its traffic record, and
        the objective map of the ranks the protocol runs over (HSDP: the replicate group, checked
        here, before any collective of the unit)."""
        objective_map = self._steps.objective_map(self.state.group, self.unit)
        if self._hybrid is not None:
            objective_map = self._hybrid.replica_map(objective_map)
        traffic = self.state.ledger.open_bucket(self.unit.index, flat.numel(), flat.element_size())
        return traffic, objective_map

    def _reduced_unit(self, row: int) -> FSDPUnit:
        """The unit as FSDP laid out its row of ``row`` elements: every parameter that needs a
        gradient (FSDP leaves frozen ones out, e.g. a LoRA's base weights)."""
        fsdp_params = self._param_group.fsdp_params
        kept = [i for i, p in enumerate(fsdp_params) if p.sharded_param.requires_grad]
        unit = self.unit if len(kept) == len(fsdp_params) else self.unit.only(kept)
        sizes = unit.segment_sizes
        if sum(sizes) != row:
            raise RuntimeError(
                f"{self.unit.label}: bucket-MOO needs a gradient for every parameter of the "
                f"unit, but FSDP reduced a row of {row} elements instead of {sum(sizes)} (some "
                "parameters got no gradient, and ranks that used different parameters would "
                "reduce mismatched rows); install_bucket_moo calls "
                "set_reduce_scatter_unused_params(True) on every unit: do not turn it off"
            )
        return unit

    def _check_scaling(self, op: object) -> None:
        if op == ReduceOp.AVG:
            return
        factor = getattr(self._param_group, "gradient_divide_factor", None)
        if op == ReduceOp.SUM and factor == 1.0:
            return
        name = getattr(op, "name", "PREMUL_SUM")
        raise ValueError(
            f"{self.unit.label}: FSDP asked for a reduce-scatter with op {name} and gradient "
            f"divide factor {factor}; bucket-MOO writes the combined gradient on the scale of an "
            "average, so FSDP must divide nothing: install with install_bucket_moo (it calls "
            "set_gradient_divide_factor(1.0) and set_force_sum_reduction_for_comms(True)) and do "
            "not change either afterwards"
        )


def _unit_of(index: int, name: str, param_group: object, positions: dict[int, int]) -> FSDPUnit:
    fsdp_params = param_group.fsdp_params
    problems = tuple((positions[id(p.sharded_param)],) for p in fsdp_params)
    return FSDPUnit(
        index=index,
        name=name,
        problem=tuple(p for (p,) in problems),
        parameter_problems=problems,
        segment_sizes=tuple(p.padded_sharded_param_size.numel() for p in fsdp_params),
    )


def _mesh_of(label: str, param_group: object) -> DeviceMesh:
    """The unit's mesh; refuses native HSDP / replicate meshes (FSDP all-reduces them itself)."""
    param = param_group.fsdp_params[0].sharded_param
    mesh = param.device_mesh
    if any(p.sharded_param.device_mesh != mesh for p in param_group.fsdp_params):
        raise ValueError(f"{label}: its parameters are sharded on different meshes")
    if mesh.ndim != 1:
        raise ValueError(
            f"{label} is sharded on a {mesh.ndim}-D mesh ({param.placements}): native HSDP "
            "all-reduces the replicas' gradients itself after the reduce-scatter, which no hook "
            "can replace. Shard over the shard dimension only (fully_shard(module, "
            "mesh=mesh['shard'])) and pass the 2-D mesh as install_bucket_moo(..., hsdp_mesh=mesh)"
        )
    return mesh


def install_fsdp2(
    model: nn.Module,
    state: BucketMOOState,
    *,
    hsdp_mesh: DeviceMesh | None = None,
) -> list[FSDPUnit]:
    """:func:`~bucketmoo_hooks.install_bucket_moo` for FSDP2: a :class:`BucketMOOReduceScatter`
    on every ``fully_shard`` unit, in module order (unit ``i`` is the ``i``-th, its bucket id),
    and FSDP's gradient scaling taken over: ``set_gradient_divide_factor(1.0)`` and
    ``set_force_sum_reduction_for_comms(True)`` (the combination is already on the scale of an
    average), ``set_reduce_scatter_unused_params(True)`` (ranks that used different parameters
    reduce the same layout, an unused parameter's zero gradient marking its objective absent).
    With ``hsdp_mesh``, the cross-replica all-reduce hook too. Returns the units."""
    modules = [(n, m) for n, m in model.named_modules() if isinstance(m, FSDPModule)]
    if state.granularity == "global":
        raise ValueError(
            "granularity='global' is DDP-only: FSDP consumes each unit's reduce-scatter output "
            "as soon as it returns, so no unit can wait for the whole model's weights; use "
            "granularity='bucket' or 'parameter'"
        )
    positions = {id(p): i for i, p in enumerate(model.parameters())}
    planned: list[tuple[FSDPModule, object, FSDPUnit]] = []
    meshes: list[DeviceMesh] = []
    shard_groups = set()
    for index, (name, module) in enumerate(modules):
        label = f"FSDP unit {index} ({name or 'root'!r})"
        missing = [api for api in _REQUIRED_API if not hasattr(module, api)]
        if missing:
            raise RuntimeError(
                f"{label}: the installed FSDP2 (torch {torch.__version__}) lacks {missing}; "
                "bucketmoo_hooks supports torch 2.11 to 2.13"
            )
        groups = _param_groups(module)
        if len(groups) > 1:
            raise ValueError(
                f"{label} has {len(groups)} parameter groups (per-parameter meshes from "
                "shard_placement_fn); a custom reduce-scatter serves one group per module. "
                "Shard it as one group, or wrap the groups in separate fully_shard modules"
            )
        if not groups:
            continue
        param_group = groups[0]
        current = getattr(param_group, "_reduce_scatter_comm", None)
        if isinstance(current, BucketMOOReduceScatter):
            raise ValueError(f"{label} already has bucket-MOO installed; install it once")
        # FSDP's own reduce-scatters (default, process-group or symmetric-memory buffers) are
        # what bucket-MOO replaces; anyone else's is not ours to drop.
        if current is not None and not type(current).__module__.startswith("torch."):
            raise ValueError(
                f"{label} already has a custom reduce-scatter ({type(current).__name__}); "
                "FSDP runs one per unit"
            )
        meshes.append(_mesh_of(label, param_group))
        shard_groups.add(tuple(ranks_of(meshes[-1].get_group())))
        planned.append((module, param_group, _unit_of(index, name, param_group, positions)))
    if not planned:
        raise TypeError(f"no fully_shard module of {type(model).__name__} manages parameters")
    if len(shard_groups) != 1:
        raise ValueError(
            f"the units are sharded over different groups {sorted(shard_groups)}; bucket-MOO "
            "needs every unit on the same shard group"
        )
    shard_group = meshes[0].get_group()
    if hsdp_mesh is not None and state.protocol == "hierarchical":
        raise ValueError(
            "protocol='hierarchical' does not run under HSDP: the protocol runs over the "
            "replicate group, across nodes already; use protocol='shard' or 'sketch'"
        )
    hybrid = None if hsdp_mesh is None else _hybrid_layout(state, hsdp_mesh, shard_group)
    # HSDP: the state's own group, checked to span the mesh; else the units' shard group.
    register(state, model, None if hybrid else shard_group, cpu_buckets=False)
    steps = BackwardSteps(state)
    for module, param_group, unit in planned:
        comm = BucketMOOReduceScatter(state, unit, steps, param_group, hybrid)
        module.set_custom_reduce_scatter(comm)
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)
        # Ranks that used different parameters (language adapters) must still reduce the same
        # row layout; an unused parameter's zero gradient then marks its objective absent.
        module.set_reduce_scatter_unused_params(True, recurse=False)
        if hybrid is not None:
            module.set_all_reduce_hook(comm.cross_replica)
    return [unit for *_, unit in planned]


def _hybrid_layout(
    state: BucketMOOState, mesh: DeviceMesh, shard_group: dist.ProcessGroup
) -> _Hybrid:
    if not isinstance(mesh, DeviceMesh) or mesh.ndim != 2:
        raise ValueError(
            "hsdp_mesh must be the 2-D (replicate, shard) DeviceMesh the units are sharded on "
            f"the second dimension of, got {mesh!r}"
        )
    if ranks_of(mesh.get_group(1)) != ranks_of(shard_group):
        raise ValueError(
            f"the units are sharded over ranks {ranks_of(shard_group)}, which is not this rank's "
            f"shard group of hsdp_mesh ({ranks_of(mesh.get_group(1))}); shard with "
            "fully_shard(module, mesh=hsdp_mesh['shard'])"
        )
    group_ranks = ranks_of(state.group)
    replicas = mesh.mesh.tolist()
    if sorted(r for replica in replicas for r in replica) != sorted(group_ranks):
        raise ValueError(
            f"state's process group (ranks {group_ranks}) must span hsdp_mesh (ranks "
            f"{sorted(r for replica in replicas for r in replica)}): objective_of_rank names "
            "the objective of every rank of the mesh"
        )
    return _Hybrid(
        replicate_group=mesh.get_group(0),
        shard_group=mesh.get_group(1),
        replicas=replicas,
        positions={rank: i for i, rank in enumerate(group_ranks)},
    )
