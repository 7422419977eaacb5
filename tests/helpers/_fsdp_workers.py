"""Functions run on every rank by the FSDP tests (module level, so spawned processes import them).

The model is the DDP tests' MLP: ``Linear, Tanh, Linear, Tanh, Linear``. Units: the first two
``Linear`` layers are FSDP units of their own, the root keeps the last one. Every training worker
records, for each unit the hook reduces, every rank's flat unit gradient as FSDP laid it out
(all-gathered beside the hook, for the oracle) and the combined result (all-gathered), and
returns the full parameters after training for the reference trajectory.
"""

import gc
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from _ddp_workers import batch, make_model
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    FullyShardedDataParallel,
    MixedPrecision,
    MixedPrecisionPolicy,
    ShardingStrategy,
    fully_shard,
)
from torch.distributed.tensor import DTensor

from bucketmoo_hooks import (
    BucketMOOReduceScatter,
    BucketMOOState,
    Diagnostics,
    install_bucket_moo,
)
from bucketmoo_hooks._compat import all_gather_single

LR, MOMENTUM = 0.02, 0.9
CPU = torch.device("cpu")  # FSDP1 looks for an accelerator unless told the device
#: Positions in ``model.parameters()`` of each unit's parameters, by unit index (module order:
#: the root first, then the wrapped layers 0 and 2).
UNIT_PARAMETERS = {0: (4, 5), 1: (0, 1), 2: (2, 3)}


@dataclass(frozen=True)
class FSDPScenario:
    """One training run of an FSDP model under bucket-MOO."""

    name: str
    version: int  # 1: FullyShardedDataParallel, 2: fully_shard
    objective_of_rank: tuple[Hashable, ...]
    weighting: str = "mgda"
    steps: int = 2
    granularity: str = "bucket"
    micro_batches: int = 1
    #: MixedPrecisionPolicy / MixedPrecision reduce dtype (parameters stay fp32).
    reduce_dtype: torch.dtype | None = None
    cpu_offload: bool = False
    strategy: ShardingStrategy = ShardingStrategy.FULL_SHARD  # FSDP1 only
    #: HSDP (FSDP2): ``(replicas, ranks per replica)``.
    hsdp: tuple[int, int] | None = None
    hidden: tuple[int, ...] = (31, 17)
    diagnostics_every: int = 0
    protocol: str = "shard"
    sketch_size: int | None = None
    #: Simulated nodes of this many consecutive ranks (the hierarchical protocol, the ledger).
    ranks_per_node: int | None = None


def shard(model: nn.Sequential, scenario: FSDPScenario) -> tuple[nn.Module, Callable, Any]:
    """Wrap ``model`` as the scenario says and install bucket-MOO; returns the wrapped model,
    a ``sync(enabled)`` switch for gradient accumulation, and the installed units."""
    state = BucketMOOState(
        scenario.objective_of_rank,
        weighting=scenario.weighting,
        granularity=scenario.granularity,
        diagnostics=Diagnostics(scenario.diagnostics_every) if scenario.diagnostics_every else None,
        protocol=scenario.protocol,
        sketch_size=scenario.sketch_size,
        ranks_per_node=scenario.ranks_per_node,
    )
    if scenario.version == 1:
        precision = None
        if scenario.reduce_dtype is not None:
            precision = MixedPrecision(reduce_dtype=scenario.reduce_dtype)
        options = {
            "sharding_strategy": scenario.strategy,
            "mixed_precision": precision,
            "device_id": CPU,
        }
        for i in (0, 2):
            model[i] = FullyShardedDataParallel(model[i], **options)
        wrapped = FullyShardedDataParallel(model, **options)
        units = list(install_bucket_moo(wrapped, state).units)
        return wrapped, None, (state, units)
    options: dict[str, Any] = {}
    if scenario.reduce_dtype is not None:
        options["mp_policy"] = MixedPrecisionPolicy(reduce_dtype=scenario.reduce_dtype)
    if scenario.cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=False)
    mesh = None
    if scenario.hsdp is not None:
        mesh = init_device_mesh("cpu", scenario.hsdp, mesh_dim_names=("replicate", "shard"))
        options["mesh"] = mesh["shard"]
    for i in (0, 2):
        fully_shard(model[i], **options)
    fully_shard(model, **options)
    units = list(install_bucket_moo(model, state, hsdp_mesh=mesh).units)
    return model, model.set_requires_gradient_sync, (state, units)


def full_parameters(model: nn.Module) -> Tensor:
    """Every parameter, unsharded, in the plain model's order (collective: call on all ranks)."""
    values = model.state_dict().values()
    return torch.cat(
        [(v.full_tensor() if isinstance(v, DTensor) else v).detach().flatten() for v in values]
    )


def gather_rows(flat: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """``[R, n]``: ``flat`` of every rank of ``group``."""
    size = dist.get_world_size(group)
    gathered = flat.new_empty(size * flat.numel())
    all_gather_single(gathered, flat.contiguous(), group=group)
    return gathered.view(size, -1)


def _record_fsdp2(model: nn.Module, records: list, step: list[int], hsdp: bool) -> None:
    """Re-install every unit's reduce-scatter behind a recorder (same object, same state)."""
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        comm = module._get_fsdp_state()._fsdp_param_groups[0]._reduce_scatter_comm
        assert isinstance(comm, BucketMOOReduceScatter)
        module.set_custom_reduce_scatter(_Recorder(comm, records, step, hsdp))
        if hsdp:
            module.set_all_reduce_hook(_recording_hook(comm, records))


class _Recorder(BucketMOOReduceScatter):
    """Delegates to ``comm``; records every rank's input and the combined output."""

    def __init__(self, comm: BucketMOOReduceScatter, records: list, step: list, hsdp: bool):
        self.comm, self.records, self.step, self.hsdp = comm, records, step, hsdp

    def __call__(
        self,
        output_tensor: Tensor,
        input_tensor: Tensor,
        group: Any,
        op: Any,
        async_op: bool = False,
    ) -> None:
        inputs = gather_rows(input_tensor)  # every rank of the world
        self.comm(output_tensor, input_tensor, group, op, async_op)
        record = {"step": self.step[0], "unit": self.comm.unit.index, "inputs": inputs}
        if not self.hsdp:
            record["output"] = gather_rows(output_tensor, group).flatten()
        self.records.append(record)


def _recording_hook(comm: BucketMOOReduceScatter, records: list) -> Callable[[Tensor], None]:
    def hook(output: Tensor) -> None:
        comm.cross_replica(output)
        shard_group = comm._hybrid.shard_group
        records[-1]["output"] = gather_rows(output, shard_group).flatten()

    return hook


def _record_fsdp1(model: nn.Module, records: list, step: list[int]) -> None:
    for module in model.modules():
        if isinstance(module, FullyShardedDataParallel) and module._handle is not None:
            module._comm_hook = _recording_fsdp1_hook(module._comm_hook, records, step)


def _recording_fsdp1_hook(hook: Callable, records: list, step: list[int]) -> Callable:
    def recording(hook_state: Any, grad: Tensor, output: Tensor | None = None) -> None:
        inputs = gather_rows(grad)
        if output is None:
            hook(hook_state, grad)
            result = grad.clone()
        else:
            hook(hook_state, grad, output)
            result = gather_rows(output).flatten()
        records.append(
            {"step": step[0], "unit": hook_state.unit.index, "inputs": inputs, "output": result}
        )

    return recording


def train_fsdp(rank: int, world_size: int, scenario: FSDPScenario) -> dict[str, Any]:
    model, sync, (state, units) = shard(make_model(scenario.hidden, torch.float32), scenario)
    records: list[dict[str, Any]] = []
    step = [0]
    if scenario.version == 2:
        _record_fsdp2(model, records, step, scenario.hsdp is not None)
    else:
        _record_fsdp1(model, records, step)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    ledger = []
    for step[0] in range(scenario.steps):
        for micro in range(scenario.micro_batches):
            last = micro == scenario.micro_batches - 1
            x, target = batch(rank, step[0], micro, torch.float32)
            if sync is not None:  # FSDP2
                sync(last)
                nn.functional.mse_loss(model(x), target).backward()
            elif last:
                nn.functional.mse_loss(model(x), target).backward()
            else:
                with model.no_sync():
                    nn.functional.mse_loss(model(x), target).backward()
        ledger.append(
            {
                "buckets": [
                    {
                        "index": t.index,
                        "numel": t.numel,
                        "size": t.element_size,
                        "sent": t.sent,
                        "links": t.links,
                    }
                    for t in state.ledger.last_step
                ],
                "overhead": dict(state.ledger.step_overhead),
            }
        )
        optimizer.step()
        optimizer.zero_grad()
    diagnostics = []
    if state.diagnostics is not None:
        state.diagnostics.pull()
        diagnostics = state.diagnostics.records
    return {
        "records": records,
        "units": [(u.index, u.problem, u.parameter_problems, u.segment_sizes) for u in units],
        "params": full_parameters(model),
        "ledger": ledger,
        "iter": state.iter,
        "diagnostics": diagnostics,
    }


def train_scenarios(
    rank: int, world_size: int, scenarios: list[FSDPScenario], checks: tuple[Callable, ...] = ()
) -> tuple[list[dict], dict[str, Any]]:
    """Every scenario, then every ``check(rank, world_size)`` (sharing the launch)."""
    trained = [train_fsdp(rank, world_size, scenario) for scenario in scenarios]
    return trained, {check.__name__: check(rank, world_size) for check in checks}


def mean_vs_native(rank: int, world_size: int, objective_of_rank: tuple, steps: int) -> dict:
    """FSDP2 and FSDP1, each native (FSDP's own average) and under ``weighting="mean"``: the
    sharded gradients of every step."""
    runs: dict[str, Tensor] = {}
    for version in (2, 1):
        for hooked in (False, True):
            model = make_model((31, 17), torch.float32)
            if hooked:
                scenario = FSDPScenario("mean", version, objective_of_rank, weighting="mean")
                model, _, _ = shard(model, scenario)
            elif version == 2:
                for i in (0, 2):
                    fully_shard(model[i])
                fully_shard(model)
            else:
                for i in (0, 2):
                    model[i] = FullyShardedDataParallel(model[i], device_id=CPU)
                model = FullyShardedDataParallel(model, device_id=CPU)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
            grads = []
            for step in range(steps):
                x, target = batch(rank, step, 0, torch.float32)
                nn.functional.mse_loss(model(x), target).backward()
                local = [p.grad.to_local() if version == 2 else p.grad for p in model.parameters()]
                grads.append(torch.cat([g.flatten() for g in local]))
                optimizer.step()
                optimizer.zero_grad()
            runs[f"fsdp{version}_{'mean' if hooked else 'native'}"] = torch.stack(grads)
    return runs


def error_of(action: Callable[[], Any]) -> str:
    try:
        action()
    except (TypeError, ValueError, RuntimeError) as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


def backward_error(model: nn.Module, rank: int) -> str:
    """The error one backward pass of ``model`` raises on this rank (freed before returning)."""
    x, target = batch(rank, 0, 0, torch.float32)
    loss = nn.functional.mse_loss(model(x), target)
    outcome = error_of(loss.backward)
    del model, loss
    gc.collect()
    return outcome


def install_errors(rank: int, world_size: int) -> dict[str, str]:
    """Every unsupported combination, tried at install time; the error each one raised."""
    from torch.distributed.fsdp._fully_shard._fsdp_common import (
        FSDPMeshInfo,
        ShardPlacementResult,
    )
    from torch.distributed.tensor import Shard

    def fsdp2(**options: Any) -> nn.Module:
        model = make_model((7,), torch.float32)
        fully_shard(model[0], **options)
        fully_shard(model)
        return model

    errors = {
        "not_fsdp": error_of(lambda: install_bucket_moo(make_model((7,), torch.float32), None)),
        "no_units": error_of(
            lambda: install_bucket_moo(make_model((7,), torch.float32), BucketMOOState())
        ),
        "global": error_of(
            lambda: install_bucket_moo(fsdp2(), BucketMOOState(granularity="global"))
        ),
    }
    mesh_2d = init_device_mesh("cpu", (1, world_size), mesh_dim_names=("replicate", "shard"))
    errors["native_hsdp"] = error_of(
        lambda: install_bucket_moo(fsdp2(mesh=mesh_2d), BucketMOOState())
    )
    # Biases on a mesh of their own (another process group): a second parameter group.
    other_mesh = DeviceMesh.from_group(dist.new_group(list(range(world_size))), "cpu")
    other_mesh_info = FSDPMeshInfo(other_mesh, shard_mesh_dim=0)

    def per_parameter_mesh(param: nn.Parameter) -> ShardPlacementResult | None:
        return ShardPlacementResult(Shard(0), other_mesh_info) if param.ndim == 1 else None

    errors["param_groups"] = error_of(
        lambda: install_bucket_moo(fsdp2(shard_placement_fn=per_parameter_mesh), BucketMOOState())
    )
    installed = fsdp2()
    install_bucket_moo(installed, BucketMOOState())
    errors["twice"] = error_of(lambda: install_bucket_moo(installed, BucketMOOState()))
    other_group = dist.new_group([0])  # every rank must call new_group; rank 0 is in it
    if rank == 0:
        errors["other_group"] = error_of(
            lambda: install_bucket_moo(fsdp2(), BucketMOOState(process_group=other_group))
        )
    # An FSDP2 without one of the APIs the install needs (as in torch < 2.11).
    saved = FSDPModule.set_force_sum_reduction_for_comms
    del FSDPModule.set_force_sum_reduction_for_comms
    try:
        errors["old_torch"] = error_of(lambda: install_bucket_moo(fsdp2(), BucketMOOState()))
    finally:
        FSDPModule.set_force_sum_reduction_for_comms = saved
    # FSDP1.
    plain = make_model((7,), torch.float32)
    errors["fsdp1_not_fsdp"] = error_of(lambda: install_bucket_moo(plain, BucketMOOState()))
    inner = FullyShardedDataParallel(make_model((7,), torch.float32), device_id=CPU)
    outer = FullyShardedDataParallel(nn.Sequential(inner), device_id=CPU)
    errors["fsdp1_global"] = error_of(
        lambda: install_bucket_moo(outer, BucketMOOState(granularity="global"))
    )
    install_bucket_moo(outer, BucketMOOState())
    errors["fsdp1_twice"] = error_of(lambda: install_bucket_moo(outer, BucketMOOState()))
    # Only after the root's lazy initialisation does an inner instance know it is not the root.
    errors["fsdp1_not_root"] = error_of(lambda: install_bucket_moo(inner, BucketMOOState()))
    hybrid = make_model((7,), torch.float32)
    hybrid[0] = FullyShardedDataParallel(
        hybrid[0],
        sharding_strategy=ShardingStrategy.HYBRID_SHARD,
        device_mesh=mesh_2d,
        device_id=CPU,
    )
    errors["fsdp1_hybrid"] = error_of(
        lambda: install_bucket_moo(
            FullyShardedDataParallel(hybrid, device_id=CPU), BucketMOOState()
        )
    )
    errors["scaling_changed"] = scaling_changed_after_install(rank, world_size)
    errors["hsdp_1d_mesh"] = error_of(
        lambda: install_bucket_moo(fsdp2(), BucketMOOState(), hsdp_mesh=other_mesh)
    )
    hsdp = init_device_mesh("cpu", (world_size, 1), mesh_dim_names=("replicate", "shard"))
    replicated = make_model((7,), torch.float32)
    fully_shard(replicated, mesh=hsdp["shard"])
    hierarchical = BucketMOOState(protocol="hierarchical", ranks_per_node=1)
    errors["hsdp_hierarchical"] = error_of(
        lambda: install_bucket_moo(replicated, hierarchical, hsdp_mesh=hsdp)
    )
    return errors


def scaling_changed_after_install(rank: int, world_size: int) -> str:
    """The divide factor changed after install: backward must raise on every rank (no hang)."""
    model = make_model((7,), torch.float32)
    fully_shard(model[0])
    fully_shard(model)
    install_bucket_moo(model, BucketMOOState())
    model[0].set_gradient_divide_factor(float(world_size))
    return backward_error(model, rank)


def hsdp_mixed_replica(rank: int, world_size: int) -> str:
    """HSDP 2 × 2, and rank 1 switches its objective away from its replica's: every rank raises
    at the first unit of the step (no hang)."""
    mesh = init_device_mesh("cpu", (2, world_size // 2), mesh_dim_names=("replicate", "shard"))
    model = make_model((7,), torch.float32)
    fully_shard(model[0], mesh=mesh["shard"])
    fully_shard(model, mesh=mesh["shard"])
    state = BucketMOOState(["en"] * (world_size // 2) + ["de"] * (world_size // 2))
    install_bucket_moo(model, state, hsdp_mesh=mesh)
    state.set_objective("ja" if rank == 1 else state.objective_of_rank[rank])  # on every rank
    return backward_error(model, rank)
