"""Functions run on every rank by the DDP tests (module level, so spawned processes import them).

Every training worker records, for each bucket the hook reduces, the local bucket gradient of
every rank (all-gathered beside the hook, for the oracle), the hook's output, and checks on the
spot that DDP wrote that output into the parameters' ``.grad`` and that the bucket input is the
rank's own (accumulated) gradient as computed by a plain, non-distributed copy of the model.
"""

import copy
import gc
import itertools
import os
import time
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import distributed_c10d as c10d
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

import bucketmoo_hooks._runtime
from bucketmoo_hooks import (
    BucketMOOState,
    Diagnostics,
    bucket_moo_hook,
    install_bucket_moo,
)
from bucketmoo_hooks._compat import all_gather_single
from bucketmoo_hooks.weightings import Weighting, WeightingContext

IN_FEATURES, OUT_FEATURES = 10, 5


@dataclass(frozen=True)
class Scenario:
    """One training run under the hook. Sizes are odd so buckets rarely divide by ``R``."""

    name: str
    objective_of_rank: tuple[Hashable, ...] | None = None
    #: If set, ``state.set_objective(per_step_objectives[step][rank])`` before every step.
    per_step_objectives: tuple[tuple[Hashable, ...], ...] | None = None
    weighting: str = "mgda"
    steps: int = 4
    dtype: torch.dtype = torch.float32
    bucket_cap_mb: float = 0.001
    gradient_as_bucket_view: bool = False
    micro_batches: int = 1
    hidden: tuple[int, ...] = (31, 17)
    #: Install the hook through a separate gloo group for the objective exchange, as on NCCL.
    separate_host_group: bool = False
    granularity: str = "bucket"
    #: Record diagnostics, pulled to the host every this many steps (0: off).
    diagnostics_every: int = 0
    protocol: str = "shard"
    sketch_size: int | None = None
    #: Simulated nodes of this many consecutive ranks (the hierarchical protocol, the ledger).
    ranks_per_node: int | None = None


def make_model(hidden: tuple[int, ...], dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    sizes = (IN_FEATURES, *hidden, OUT_FEATURES)
    layers: list[nn.Module] = []
    for fan_in, fan_out in itertools.pairwise(sizes):
        layers += [nn.Linear(fan_in, fan_out), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).to(dtype)


def batch(rank: int, step: int, micro: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Rank-specific data: every rank (objective) pulls towards a different target."""
    generator = torch.Generator().manual_seed(10_000 * step + 100 * micro + rank)
    x = torch.randn(8, IN_FEATURES, generator=generator)
    target = torch.randn(8, OUT_FEATURES, generator=generator) + 2.0 * (rank - 1.5)
    return x.to(dtype), target.to(dtype)


def every_rank_bucket(
    bucket: dist.GradBucket, world_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Before the hook reduces ``bucket`` in place: this rank's copy of it and every rank's,
    ``[R, n]`` (the reference's inputs)."""
    local = bucket.buffer().clone()
    gathered = local.new_empty(world_size * local.numel())
    all_gather_single(gathered, local)
    return local, gathered.view(world_size, -1)


def train(rank: int, world_size: int, scenario: Scenario) -> dict[str, Any]:
    if scenario.separate_host_group:
        bucketmoo_hooks._runtime.has_cpu_backend = lambda group: False
    model = make_model(scenario.hidden, scenario.dtype)
    shadow = copy.deepcopy(model)  # plain local copy: the rank's own gradient, for the check
    ddp = DistributedDataParallel(
        model,
        bucket_cap_mb=scenario.bucket_cap_mb,
        gradient_as_bucket_view=scenario.gradient_as_bucket_view,
    )
    state = BucketMOOState(
        scenario.objective_of_rank,
        weighting=scenario.weighting,
        granularity=scenario.granularity,
        diagnostics=Diagnostics(scenario.diagnostics_every) if scenario.diagnostics_every else None,
        protocol=scenario.protocol,
        sketch_size=scenario.sketch_size,
        ranks_per_node=scenario.ranks_per_node,
    )
    position = {id(p): i for i, p in enumerate(model.parameters())}
    state._runtime.parameter_index = position  # as install_bucket_moo does: stable problem keys
    shadow_params = list(shadow.parameters())
    records: list[dict[str, Any]] = []
    step = 0

    def capture(
        state: BucketMOOState, bucket: dist.GradBucket
    ) -> torch.futures.Future[torch.Tensor]:
        local, inputs = every_rank_bucket(bucket, world_size)
        future = bucket_moo_hook(state, bucket)
        indices = [position[id(p)] for p in bucket.parameters()]
        expected_local = torch.cat([shadow_params[i].grad.flatten() for i in indices])
        records.append(
            {
                "step": step,
                "index": bucket.index(),
                "inputs": inputs,
                # Read after backward: with granularity="global" a bucket completes only once
                # the last bucket has been seen.
                "future": future,
                "params": indices,
                "sizes": [p.numel() for p in bucket.parameters()],
                "local_error": (local - expected_local).abs().max().item(),
            }
        )
        return future

    ddp.register_comm_hook(state, capture)
    # SGD rather than AdamW: AdamW's eps underflows to 0 in fp16 parameters.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    grad_errors, ledger, maps = [], [], []
    for step in range(scenario.steps):
        if scenario.per_step_objectives is not None:
            state.set_objective(scenario.per_step_objectives[step][rank])
        shadow.load_state_dict(model.state_dict())
        shadow.zero_grad()
        for micro in range(scenario.micro_batches):
            x, target = batch(rank, step, micro, scenario.dtype)
            nn.functional.mse_loss(shadow(x), target).backward()
        for micro in range(scenario.micro_batches):
            x, target = batch(rank, step, micro, scenario.dtype)
            if micro < scenario.micro_batches - 1:
                with ddp.no_sync():
                    nn.functional.mse_loss(ddp(x), target).backward()
            else:
                nn.functional.mse_loss(ddp(x), target).backward()
        params = list(model.parameters())
        for record in (r for r in records if r["step"] == step):
            record["output"] = record.pop("future").value().clone()
            grads = torch.cat([params[i].grad.flatten() for i in record["params"]])
            grad_errors.append((grads - record["output"]).abs().max().item())
        ledger.append(
            {
                "buckets": [
                    {
                        "numel": t.numel,
                        "element_size": t.element_size,
                        "sent": dict(t.sent),
                        "links": dict(t.links),
                    }
                    for t in state.ledger.last_step
                ],
                "overhead": dict(state.ledger.step_overhead),
            }
        )
        maps.append(state.objective_map.keys)
        optimizer.step()
        optimizer.zero_grad()
    return {
        "records": records,
        "grad_errors": grad_errors,
        "params": torch.cat([p.detach().flatten() for p in model.parameters()]),
        "ledger": ledger,
        "maps": maps,
        "iter": state.iter,
        "used_separate_group": state._runtime._host_group is not None,
        "held_bytes": state.held_bytes,
        "diagnostics": pulled_diagnostics(state),
    }


def pulled_diagnostics(state: BucketMOOState) -> list[dict[str, Any]]:
    """Everything the diagnostics recorded: the automatic pulls and what is still pending."""
    if state.diagnostics is None:
        return []
    state.diagnostics.pull()
    return state.diagnostics.records


def train_scenarios(rank: int, world_size: int, scenarios: list[Scenario]) -> list[dict[str, Any]]:
    has_cpu_backend = bucketmoo_hooks._runtime.has_cpu_backend
    try:
        return [train(rank, world_size, scenario) for scenario in scenarios]
    finally:  # undo separate_host_group's patch: other tasks share the process
        bucketmoo_hooks._runtime.has_cpu_backend = has_cpu_backend


def mean_vs_allreduce(
    rank: int, world_size: int, objective_of_rank: tuple[int, ...], steps: int
) -> dict[str, Any]:
    """Train two identical models on identical data, one under ``allreduce_hook``, one under
    ``bucket_moo_hook`` with ``weighting="mean"``; return both gradients of every step."""
    runs = {}
    for name in ("allreduce", "mean"):
        model = make_model((31, 17), torch.float32)
        ddp = DistributedDataParallel(model, bucket_cap_mb=0.001)
        if name == "allreduce":
            ddp.register_comm_hook(dist.group.WORLD, allreduce_hook)
        else:
            install_bucket_moo(ddp, BucketMOOState(objective_of_rank, weighting="mean"))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        grads = []
        for step in range(steps):
            x, target = batch(rank, step, 0, torch.float32)
            nn.functional.mse_loss(ddp(x), target).backward()
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
            optimizer.step()
            optimizer.zero_grad()
        runs[name] = torch.stack(grads)
    return runs


def disagreeing_states(rank: int, world_size: int, case: str, overlap: bool) -> str:
    """Ranks configured inconsistently: every rank must raise (never hang); return the error."""
    if case == "weighting":
        state = BucketMOOState(weighting="mgda" if rank == 0 else "mean", overlap=overlap)
    elif case == "sketch_size":
        size = 1024 if rank == 0 else 4096
        state = BucketMOOState(protocol="sketch", sketch_size=size, overlap=overlap)
    elif case == "objective_of_rank":
        state = BucketMOOState(objective_of_rank=[0, 1] if rank == 0 else [1, 0], overlap=overlap)
    else:
        state = BucketMOOState(overlap=overlap)
        state.iter = rank  # as if one rank restored a different checkpoint
    return hooked_backward(rank, state)


def hooked_backward(rank: int, state: BucketMOOState) -> str:
    """One backward of a small DDP model under the raw hook with ``state``: ``"no error"`` or
    the error it raised."""
    ddp = DistributedDataParallel(make_model((7,), torch.float32))
    ddp.register_comm_hook(state, bucket_moo_hook)
    x, target = batch(rank, 0, 0, torch.float32)
    try:
        nn.functional.mse_loss(ddp(x), target).backward()
        outcome = "no error"
    except (ValueError, RuntimeError) as error:
        outcome = f"{type(error).__name__}: {error}"
    # A DDP reducer whose backward was interrupted can abort the process (std::terminate) if it
    # is destroyed at interpreter exit after the process group; free it while the group lives.
    del ddp
    gc.collect()
    return outcome


def registration_errors(rank: int, world_size: int) -> dict[str, str]:
    """Try every bad registration that needs two ranks; return the error each one raised. (A
    model that is not DDP and a second hook: core/test_bad_inputs.py, on one rank.)"""
    from torch.nn.parallel.distributed import _MixedPrecision

    def error_of(action: Any) -> str:
        try:
            action()
        except (TypeError, ValueError) as error:
            return f"{type(error).__name__}: {error}"
        return "no error"

    model = make_model((7,), torch.float32)
    errors = {}
    other_group = dist.new_group([0])  # every rank must call new_group; rank 0 is in it
    ddp = DistributedDataParallel(model)
    if rank == 0:
        errors["other_group"] = error_of(
            lambda: install_bucket_moo(ddp, BucketMOOState(process_group=other_group))
        )
    errors["wrong_length"] = error_of(
        lambda: install_bucket_moo(ddp, BucketMOOState(objective_of_rank=[0, 1, 2]))
    )
    precision = _MixedPrecision(param_dtype=torch.float16, reduce_dtype=torch.float16)
    mixed = DistributedDataParallel(make_model((7,), torch.float32), mixed_precision=precision)
    errors["mixed_precision"] = error_of(lambda: install_bucket_moo(mixed, BucketMOOState()))
    # The hierarchical protocol's nodes: refused on every rank, before any node group is made.
    errors["nodes_not_dividing"] = error_of(
        lambda: install_bucket_moo(ddp, BucketMOOState(protocol="hierarchical", ranks_per_node=3))
    )
    errors["nodes_disagree"] = error_of(
        lambda: install_bucket_moo(
            ddp, BucketMOOState(protocol="hierarchical", ranks_per_node=1 + rank)
        )
    )
    return errors


def node_groups_made(rank: int, world_size: int, overlap: bool) -> dict[str, Any]:
    """Install the hierarchical protocol on 2-rank nodes; the node groups registration made
    (their global ranks and names), and one step's bucket after the hook."""
    model = make_model((7,), torch.float32)
    ddp = DistributedDataParallel(model)
    state = BucketMOOState([0, 0, 1, 1], protocol="hierarchical", ranks_per_node=2, overlap=overlap)
    install_bucket_moo(ddp, state)
    made = {
        key[0]: (dist.get_process_group_ranks(group), c10d._world.pg_names[group])
        for key, group in bucketmoo_hooks._groups._groups.items()
        if key[0].endswith(("node2", "across2"))
    }
    x, target = batch(rank, 0, 0, torch.float32)
    nn.functional.mse_loss(ddp(x), target).backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    return {"made": made, "grads": grads, "links": dict(state.ledger.link_totals)}


def train_with_checkpoint(
    rank: int,
    world_size: int,
    ddp_options: dict[str, Any],
    steps: range,
    checkpoint: str,
    save_after: int | None,
    weighting: Weighting,
    load_hook_state: bool = True,
) -> torch.Tensor:
    """Train ``steps`` under the hook (resuming from ``checkpoint`` if ``steps`` does not start at
    0), saving model, optimizer and hook state after step ``save_after``; return the parameters.
    """
    model = make_model((31, 17), torch.float32)
    ddp = DistributedDataParallel(model, **ddp_options)
    objectives = ["en", "de", "ja", "en"][:world_size]
    state = BucketMOOState(objectives, weighting=weighting, granularity="bucket")
    install_bucket_moo(ddp, state)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    if steps.start > 0:
        saved = torch.load(f"{checkpoint}/rank{rank}.pt", weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        if load_hook_state:
            state.load_state_dict(saved["hook"])
        else:  # what a resume that forgot the hook state would do (only the step counter)
            state.iter = saved["hook"]["iter"]
    for step in steps:
        x, target = batch(rank, step, 0, torch.float32)
        nn.functional.mse_loss(ddp(x), target).backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == save_after:
            saved = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "hook": state.state_dict(),
            }
            torch.save(saved, f"{checkpoint}/rank{rank}.pt")
    return torch.cat([p.detach().flatten() for p in model.parameters()])


class RecordingMean(Weighting):
    """Equal weights, remembering every context it was called with."""

    def __init__(self) -> None:
        self.contexts: list[WeightingContext] = []

    def forward(self, gramian: torch.Tensor, context: WeightingContext | None) -> torch.Tensor:
        assert context is not None
        self.contexts.append(context)
        return torch.full_like(gramian[0], 1.0 / gramian.shape[0])


def problem_keys(rank: int, world_size: int, granularity: str, known_order: bool) -> dict:
    """The problem keys the weighting saw, and each bucket's parameter positions, per step."""
    model = make_model((31, 17), torch.float32)
    ddp = DistributedDataParallel(model, bucket_cap_mb=0.001)
    weighting = RecordingMean()
    state = BucketMOOState(weighting=weighting, granularity=granularity)
    position = {id(p): i for i, p in enumerate(model.parameters())}
    if known_order:  # what install_bucket_moo tells the state (checked on its own)
        state._runtime.parameter_index = position
    buckets: list[tuple[int, tuple[int, ...]]] = []
    step = 0

    def capture(
        state: BucketMOOState, bucket: dist.GradBucket
    ) -> torch.futures.Future[torch.Tensor]:
        buckets.append((step, tuple(position[id(p)] for p in bucket.parameters())))
        return bucket_moo_hook(state, bucket)

    ddp.register_comm_hook(state, capture)
    for step in range(3):
        x, target = batch(rank, step, 0, torch.float32)
        nn.functional.mse_loss(ddp(x), target).backward()
    registered = BucketMOOState()
    install_bucket_moo(DistributedDataParallel(model), registered)
    return {
        "buckets": buckets,
        "contexts": [(c.step, c.bucket, c.segment, c.problem) for c in weighting.contexts],
        "registered_order": registered._runtime.parameter_index == position,
    }


def train_until_fault(
    rank: int, world_size: int, fault: str, faulty_rank: int, fault_step: int
) -> dict[str, Any]:
    """Train under the hook; rank ``faulty_rank`` dies (``"die"``) or stalls (``"stall"``) at the
    start of step ``fault_step``. The others report the error their backward raised and how long
    they waited for it."""
    model = make_model((31, 17), torch.float32)
    ddp = DistributedDataParallel(model, bucket_cap_mb=0.001)
    install_bucket_moo(ddp, BucketMOOState(["en", "de", "ja", "en"][:world_size]))
    for step in range(fault_step + 1):
        x, target = batch(rank, step, 0, torch.float32)
        if step == fault_step and rank == faulty_rank:
            if fault == "die":
                os._exit(1)
            time.sleep(3600)
        loss = nn.functional.mse_loss(ddp(x), target)
        started = time.monotonic()
        try:
            loss.backward()
        except Exception as error:
            return {
                "step": step,
                "error": f"{type(error).__name__}: {error}",
                "waited": time.monotonic() - started,
            }
    return {"step": fault_step, "error": None, "waited": 0.0}


def replica_agreement(
    rank: int, world_size: int, weightings: list[str], steps: int, snapshot_at: int
) -> dict[str, Any]:
    """Train ``steps`` steps per weighting (SGD with momentum; language groups of different
    sizes); count the steps after which every rank's parameters were bitwise equal. Returns the
    count and the parameters after step ``snapshot_at`` per weighting."""
    objectives = ["en", "de", "ja", "en"][:world_size]
    outcome: dict[str, Any] = {}
    for name in weightings:
        model = make_model((13,), torch.float32)
        ddp = DistributedDataParallel(model, bucket_cap_mb=0.0005, find_unused_parameters=True)
        install_bucket_moo(ddp, BucketMOOState(objectives, weighting=name))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        agreeing, snapshot = 0, None
        for step in range(steps):
            x, target = batch(rank, step, 0, torch.float32)
            nn.functional.mse_loss(ddp(x), target).backward()
            optimizer.step()
            optimizer.zero_grad()
            flat = torch.cat([p.detach().flatten() for p in model.parameters()])
            everyone = torch.empty(world_size * flat.numel())
            all_gather_single(everyone, flat)
            agreeing += all(torch.equal(row, flat) for row in everyone.view(world_size, -1))
            if step == snapshot_at:
                snapshot = flat.clone()
        outcome[name] = {"agreeing_steps": agreeing, "snapshot": snapshot}
    return outcome


class FixedGradients(nn.Module):
    """Parameters whose gradient is whatever vector the rank feeds in: loss = Σ_k ⟨p_k, v_k⟩."""

    def __init__(self, sizes: tuple[int, ...], dtype: torch.dtype) -> None:
        super().__init__()
        self.weights = nn.ParameterList(nn.Parameter(torch.zeros(n, dtype=dtype)) for n in sizes)

    def forward(self, vectors: list[torch.Tensor]) -> torch.Tensor:
        return sum((p * v).sum() for p, v in zip(self.weights, vectors, strict=True))


def degenerate_steps(
    rank: int,
    world_size: int,
    runs: list[tuple[torch.Tensor, str]],
    sizes: tuple[int, ...],
    objective_of_rank: tuple[Hashable, ...],
) -> list[list[dict[str, Any]]]:
    """Per ``(gradients, weighting)`` of ``runs``: one step in which rank ``r``'s gradient is
    ``gradients[r]`` (split into parameters of ``sizes``, each in its own bucket); returns every
    bucket's input, output and parameters."""
    return [
        degenerate_step(rank, world_size, gradients, sizes, objective_of_rank, weighting)
        for gradients, weighting in runs
    ]


def degenerate_step(
    rank: int,
    world_size: int,
    gradients: torch.Tensor,
    sizes: tuple[int, ...],
    objective_of_rank: tuple[Hashable, ...],
    weighting: str,
) -> list[dict[str, Any]]:
    model = FixedGradients(sizes, gradients.dtype)
    ddp = DistributedDataParallel(model, bucket_cap_mb=1e-6, find_unused_parameters=True)
    state = BucketMOOState(objective_of_rank, weighting=weighting)
    position = {id(p): i for i, p in enumerate(model.parameters())}
    state._runtime.parameter_index = position  # as install_bucket_moo does
    records = []

    def capture(
        state: BucketMOOState, bucket: dist.GradBucket
    ) -> torch.futures.Future[torch.Tensor]:
        _, inputs = every_rank_bucket(bucket, world_size)
        future = bucket_moo_hook(state, bucket)
        records.append(
            {
                "index": bucket.index(),
                "params": [position[id(p)] for p in bucket.parameters()],
                "inputs": inputs,
                "future": future,
            }
        )
        return future

    ddp.register_comm_hook(state, capture)
    ddp(list(gradients[rank].split(list(sizes)))).backward()
    for record in records:
        record["output"] = record.pop("future").value().clone()
    return records


def grad_scaler_run(
    rank: int, world_size: int, weightings: list[str], bad_step: int, bad_rank: int
) -> dict[str, Any]:
    """Train 4 steps with a real ``GradScaler`` per weighting; at ``bad_step`` rank ``bad_rank``'s
    gradient has an inf (an fp16 overflow). Records the scale and parameters after every step."""
    outcome: dict[str, Any] = {}
    for name in weightings:
        model = make_model((13,), torch.float32)
        ddp = DistributedDataParallel(model, bucket_cap_mb=0.0005, find_unused_parameters=True)
        install_bucket_moo(ddp, BucketMOOState(["en", "de", "ja", "en"][:world_size], name))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        scales, params = [], []
        for step in range(4):
            x, target = batch(rank, step, 0, torch.float32)
            loss = nn.functional.mse_loss(ddp(x), target)
            if step == bad_step and rank == bad_rank:
                loss = loss * torch.tensor(float("inf"))
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
            scales.append(scaler.get_scale())
            params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        outcome[name] = {"scales": scales, "params": params}
    return outcome


def nonfinite_raise_run(
    rank: int, world_size: int, granularity: str, overlap: bool
) -> dict[str, Any]:
    """``nonfinite="raise"``: rank 2's loss is inf at step 1; every rank reports what its
    ``backward()`` raised there (steps 0 and 2 must not raise)."""
    model = make_model((13,), torch.float32)
    ddp = DistributedDataParallel(model, bucket_cap_mb=0.0005, find_unused_parameters=True)
    objectives = ["en", "de", "ja", "en"][:world_size]
    state = BucketMOOState(objectives, granularity=granularity, overlap=overlap, nonfinite="raise")
    install_bucket_moo(ddp, state)
    errors: dict[int, str] = {}
    for step in range(2):
        x, target = batch(rank, step, 0, torch.float32)
        loss = nn.functional.mse_loss(ddp(x), target)
        if step == 1 and rank == 2:
            loss = loss * torch.tensor(float("inf"))
        try:
            loss.backward()
        except RuntimeError as error:
            errors[step] = str(error)
    del ddp, loss  # a DDP model whose hook raised must go before the process group
    gc.collect()
    return {"errors": errors}
