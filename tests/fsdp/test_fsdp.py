"""FSDP2, HSDP and FSDP1 under bucket-MOO on real gloo processes, against the reference.

Scenarios of one world size run in one launch of processes. Each unit the hook reduces is
checked against :mod:`bucketmoo_hooks.reference` on every rank's gradient as FSDP laid it out,
and the parameters after training against a single-process replay of the same training (the
reference trajectory: per-rank gradients, per-unit combination, the same SGD).
"""

import itertools
from typing import Any

import pytest
import torch
from _ddp_workers import batch, make_model
from _distributed import shared_spawn
from _fsdp_workers import (
    LR,
    MOMENTUM,
    UNIT_PARAMETERS,
    FSDPScenario,
    hsdp_mixed_replica,
    install_errors,
    mean_vs_native,
    train_scenarios,
)
from _hierarchical_checks import flat_links, hierarchical_bytes
from _sketch_checks import sketch_collective
from torch import nn
from torch.distributed.fsdp import ShardingStrategy

from bucketmoo_hooks import reference
from bucketmoo_hooks._collectives import all_reduce_bytes
from bucketmoo_hooks.weightings import Weighting, WeightingContext, get_weighting

pytestmark = pytest.mark.slow  # every test reads a launch of processes

BF16 = torch.bfloat16
SKETCH_K = 16
SKETCH: dict[str, Any] = {"protocol": "sketch", "sketch_size": SKETCH_K}


def nodes_of(ranks_per_node: int) -> dict[str, Any]:
    """The hierarchical protocol on simulated nodes of ``ranks_per_node`` consecutive ranks."""
    return {"protocol": "hierarchical", "ranks_per_node": ranks_per_node}


SCENARIOS: dict[int, list[FSDPScenario]] = {
    4: [
        FSDPScenario("fsdp2_mgda", 2, (0, 1, 2, 2), steps=3, diagnostics_every=2),
        FSDPScenario("fsdp2_mean", 2, ("a", "b", "a", "b"), weighting="mean"),
        FSDPScenario("fsdp2_upgrad_offload", 2, (0, 1, 2, 2), weighting="upgrad", cpu_offload=True),
        FSDPScenario("fsdp2_gradvac", 2, (0, 1, 1, 2), weighting="gradvac", steps=3),
        FSDPScenario("fsdp2_parameter", 2, ("en", "de", "en", "ja"), granularity="parameter"),
        FSDPScenario("fsdp2_bf16_accumulate", 2, (0, 1, 2, 2), reduce_dtype=BF16, micro_batches=3),
        FSDPScenario("fsdp2_bytes", 2, (0, 1, 2, 2), hidden=(96, 64), steps=1),
        FSDPScenario("hsdp_mgda", 2, ("en", "en", "de", "de"), hsdp=(2, 2), micro_batches=2),
        FSDPScenario(
            "hsdp_parameter",
            2,
            ("en", "en", "de", "de"),
            weighting="pcgrad",
            granularity="parameter",
            hsdp=(2, 2),
        ),
        # The sketch protocol: k = 16 folds every unit (13 columns) and most parameters.
        FSDPScenario("fsdp2_sketch", 2, (0, 1, 2, 2), steps=3, **SKETCH, diagnostics_every=1),
        FSDPScenario(
            "fsdp2_sketch_parameter",
            2,
            ("en", "de", "en", "ja"),
            weighting="gradvac",
            granularity="parameter",
            steps=3,
            **SKETCH,
        ),
        FSDPScenario("fsdp2_sketch_bf16", 2, (0, 1, 1, 2), reduce_dtype=BF16, **SKETCH),
        FSDPScenario("fsdp2_sketch_exact", 2, (0, 1, 2, 2), protocol="sketch", sketch_size=4096),
        FSDPScenario("hsdp_sketch", 2, ("en", "en", "de", "de"), hsdp=(2, 2), **SKETCH),
        FSDPScenario(
            "hsdp_sketch_parameter",
            2,
            ("en", "en", "de", "de"),
            granularity="parameter",
            hsdp=(2, 2),
            **SKETCH,
        ),
        # The hierarchical protocol on 2 nodes × 2 ranks; the shard protocol's bytes by link.
        FSDPScenario("fsdp2_hier_aligned", 2, (0, 0, 1, 1), steps=3, **nodes_of(2)),
        FSDPScenario(
            "fsdp2_hier_spanning_parameter",
            2,
            ("en", "de", "en", "ja"),
            "upgrad",
            granularity="parameter",
            **nodes_of(2),
        ),
        FSDPScenario("fsdp2_hier_bf16", 2, (0, 1, 1, 2), reduce_dtype=BF16, **nodes_of(2)),
        FSDPScenario("fsdp1_hier_gradvac", 1, (0, 1, 1, 0), "gradvac", steps=3, **nodes_of(2)),
        FSDPScenario(
            "fsdp1_hier_no_shard",
            1,
            (0, 0, 1, 2),
            strategy=ShardingStrategy.NO_SHARD,
            **nodes_of(2),
        ),
        FSDPScenario("fsdp2_shard_nodes", 2, (0, 1, 2, 2), ranks_per_node=2),
    ],
    # 2 nodes × 3 ranks and 3 nodes × 2 ranks.
    6: [
        FSDPScenario("fsdp2_hier_2x3", 2, (0, 0, 0, 1, 1, 1), "pcgrad", **nodes_of(3)),
        FSDPScenario(
            "fsdp1_hier_3x2_parameter",
            1,
            (0, 1, 0, 2, 2, 1),
            granularity="parameter",
            **nodes_of(2),
        ),
        FSDPScenario(
            "fsdp2_hier_3x2_bf16", 2, (0, 1, 2, 0, 1, 2), reduce_dtype=BF16, **nodes_of(2)
        ),
    ],
    # 2 nodes × 4 ranks.
    8: [
        FSDPScenario("fsdp2_hier_2x4", 2, (0, 1, 2, 3, 0, 1, 2, 3), "upgrad", **nodes_of(4)),
        FSDPScenario("fsdp1_hier_2x4", 1, (0,) * 4 + (1,) * 4, **nodes_of(4)),
    ],
    3: [
        FSDPScenario("fsdp2_r3_pcgrad", 2, (0, 1, 2), weighting="pcgrad"),
        FSDPScenario("fsdp1_mgda", 1, (0, 1, 2)),
        FSDPScenario(
            "fsdp1_upgrad_grad_op", 1, (0, 1, 2), "upgrad", strategy=ShardingStrategy.SHARD_GRAD_OP
        ),
        FSDPScenario("fsdp1_mean_parameter", 1, (0, 1, 0), "mean", granularity="parameter"),
        FSDPScenario("fsdp1_no_shard", 1, (0, 1, 2), strategy=ShardingStrategy.NO_SHARD),
        FSDPScenario("fsdp1_bf16_accumulate", 1, (0, 1, 2), reduce_dtype=BF16, micro_batches=2),
        FSDPScenario("fsdp1_sketch", 1, (0, 1, 2), steps=3, **SKETCH),
        FSDPScenario(
            "fsdp1_sketch_parameter", 1, (0, 1, 0), "upgrad", granularity="parameter", **SKETCH
        ),
        FSDPScenario(
            "fsdp1_sketch_no_shard", 1, (0, 1, 1), strategy=ShardingStrategy.NO_SHARD, **SKETCH
        ),
    ],
}
ALL = [(world_size, s) for world_size, scenarios in SCENARIOS.items() for s in scenarios]
IDS = [s.name for _, s in ALL]


#: Checks run in the same launch as the scenarios (launching is the slow part).
CHECKS = {4: (hsdp_mixed_replica,), 3: (), 6: (), 8: ()}


SCENARIO_RUNS = {
    world_size: shared_spawn(world_size).add(
        train_scenarios, SCENARIOS[world_size], CHECKS[world_size], timeout=300
    )
    for world_size in SCENARIOS
}


def results_for(world_size: int) -> list[tuple[list[dict[str, Any]], dict[str, Any]]]:
    return SCENARIO_RUNS[world_size].results()


def results(world_size: int, scenario: FSDPScenario) -> list[dict[str, Any]]:
    index = SCENARIOS[world_size].index(scenario)
    return [trained[index] for trained, _ in results_for(world_size)]


def fsdp_layout(
    grads: list[torch.Tensor], scenario: FSDPScenario, world_size: int
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """One rank's unit gradient as FSDP lays it out, and the segment sizes of its parameters:
    FSDP1 concatenates them; FSDP2 pads every parameter's dim 0 to a multiple of the shard
    ranks and puts chunk ``r`` of every parameter in row ``r``."""
    if scenario.version == 1:
        return torch.cat([g.flatten() for g in grads]), tuple(g.numel() for g in grads)
    rows = world_size if scenario.hsdp is None else scenario.hsdp[1]
    chunks = []
    for g in grads:
        padded = g.new_zeros(-(-g.shape[0] // rows) * rows, *g.shape[1:])
        padded[: g.shape[0]] = g
        chunks.append(padded.view(rows, -1))
    return torch.cat(chunks, dim=1).flatten(), tuple(c.shape[1] for c in chunks)


def layout_segments(scenario: FSDPScenario, sizes: tuple[int, ...], numel: int, world_size: int):
    """Index of every element of each parameter in the flat unit gradient as FSDP laid it out.

    FSDP1: the flat parameter, parameters one after the other. FSDP2: ``[R, c]`` rows, each row
    holding every parameter's padded shard at the same offsets.
    """
    if scenario.version == 1:
        bounds = torch.tensor([0, *sizes]).cumsum(0).tolist()
        return [torch.arange(lo, hi) for lo, hi in itertools.pairwise(bounds)]
    rows = world_size if scenario.hsdp is None else scenario.hsdp[1]
    row = numel // rows
    bounds = torch.tensor([0, *sizes]).cumsum(0).tolist()
    return [
        (torch.arange(rows)[:, None] * row + torch.arange(lo, hi)[None, :]).flatten()
        for lo, hi in itertools.pairwise(bounds)
    ]


def combined(
    grads: torch.Tensor,
    scenario: FSDPScenario,
    weighting: Weighting,
    context: WeightingContext,
) -> torch.Tensor:
    """The reference combination of one problem (``grads``: ``[R, n]`` in FSDP's layout)."""
    objective_grads, objective_map = reference.objective_gradients(
        grads, scenario.objective_of_rank
    )
    context = WeightingContext(
        context.step, context.bucket, objective_map.objectives, context.segment, context.problem
    )
    gramian = None
    if scenario.sketch_size is not None:
        # The sketch of each rank's vector of the problem: HSDP sketches every shard (a row of
        # the [shard ranks, c] layout) on its own and sums the shards' Gramians.
        shards = 1 if scenario.hsdp is None else scenario.hsdp[1]
        pieces = objective_grads.view(len(objective_grads), shards, -1).unbind(1)
        gramian = sum(
            reference.sketch_gramian(
                piece,
                scenario.sketch_size,
                step=context.step,
                bucket=context.bucket,
                problem=context.segment or 0,
            )
            for piece in pieces
        )
    combination = reference.combine(objective_grads, weighting, context, gramian=gramian)
    return combination.update.to(grads.dtype)


def unit_update(
    grads: torch.Tensor,
    scenario: FSDPScenario,
    weighting: Weighting,
    step: int,
    unit: tuple,
    segments: list[torch.Tensor] | None,
) -> torch.Tensor:
    """The reference update of one unit (``grads``: ``[R, n]``) at the scenario's granularity."""
    index, problem, parameter_problems, _ = unit
    if scenario.granularity == "bucket":
        context = WeightingContext(step, index, (), problem=problem)
        return combined(grads, scenario, weighting, context)
    update = torch.zeros_like(grads[0])
    for s, idx in enumerate(segments):
        context = WeightingContext(step, index, (), segment=s, problem=parameter_problems[s])
        update[idx] = combined(grads[:, idx], scenario, weighting, context)
    return update


def relative_error(output: torch.Tensor, expected: torch.Tensor, grads: torch.Tensor, ids) -> float:
    """``‖d − d_ref‖ / max_ℓ ‖ḡ_ℓ‖`` (see test_ddp_hook.relative_error)."""
    objective_grads, _ = reference.objective_gradients(grads.double(), ids)
    scale = objective_grads.norm(dim=1).max()
    return ((output.double() - expected.double()).norm() / scale).item()


@pytest.mark.parametrize(("world_size", "scenario"), ALL, ids=IDS)
def test_every_unit_equals_the_reference(world_size: int, scenario: FSDPScenario) -> None:
    tolerance = 8e-3 if scenario.reduce_dtype == BF16 else 1e-6
    for rank_result in results(world_size, scenario):
        units = {u[0]: u for u in rank_result["units"]}
        weighting = get_weighting(scenario.weighting)  # one instance, in the hook's order
        assert {r["unit"] for r in rank_result["records"]} == set(units) == {0, 1, 2}
        for record in rank_result["records"]:
            inputs, output = record["inputs"], record["output"]
            unit = units[record["unit"]]
            segments = None
            if scenario.granularity == "parameter":
                segments = layout_segments(scenario, unit[3], inputs.shape[1], world_size)
            expected = unit_update(inputs, scenario, weighting, record["step"], unit, segments)
            if scenario.reduce_dtype is not None:
                assert output.dtype == inputs.dtype == scenario.reduce_dtype
            error = relative_error(output, expected, inputs, scenario.objective_of_rank)
            assert error <= tolerance, (record["step"], record["unit"], error)


def reference_trajectory(scenario: FSDPScenario, world_size: int, units: list) -> torch.Tensor:
    """Single-process replay: every rank's gradient, combined per unit, the same SGD."""
    model = make_model(scenario.hidden, torch.float32)
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)
    weighting = get_weighting(scenario.weighting)
    for step in range(scenario.steps):
        per_rank = []
        for rank in range(world_size):
            model.zero_grad()
            for micro in range(scenario.micro_batches):
                x, target = batch(rank, step, micro, torch.float32)
                nn.functional.mse_loss(model(x), target).backward()
            per_rank.append([p.grad.clone() for p in params])
        for unit in units:
            positions = UNIT_PARAMETERS[unit[0]]
            # [R, n] in FSDP's layout (the sketch depends on the order of the elements).
            layouts = [
                fsdp_layout([g[i] for i in positions], scenario, world_size) for g in per_rank
            ]
            grads = torch.stack([flat for flat, _ in layouts])
            sizes = layouts[0][1]
            segments = layout_segments(scenario, sizes, grads.shape[1], world_size)
            update = unit_update(grads, scenario, weighting, step, unit, segments)
            for i, idx in zip(positions, segments, strict=True):
                params[i].grad = update[idx][: params[i].numel()].view_as(params[i]).clone()
        optimizer.step()
    return torch.cat([p.detach().flatten() for p in params])


@pytest.mark.parametrize(
    ("world_size", "scenario"),
    [(w, s) for w, s in ALL if s.reduce_dtype is None],
    ids=[s.name for _, s in ALL if s.reduce_dtype is None],
)
def test_parameters_follow_the_reference_trajectory(world_size: int, scenario: FSDPScenario):
    """End to end: what FSDP wrote into the sharded ``.grad`` is the combination, unit by unit."""
    per_rank = results(world_size, scenario)
    units = per_rank[0]["units"]
    if scenario.version == 2:  # FSDP2 keys problems by positions in model.parameters()
        assert {u[0]: u[1] for u in units} == UNIT_PARAMETERS
    expected = reference_trajectory(scenario, world_size, units)
    initial = torch.cat(
        [p.detach().flatten() for p in make_model(scenario.hidden, torch.float32).parameters()]
    )
    for rank_result in per_rank:
        moved = (expected - initial).abs().max()
        assert (rank_result["params"] - expected).abs().max() <= 1e-5 * moved
        # Replicas (HSDP, NO_SHARD) and shards agree bit for bit: every rank gathered the same.
        assert torch.equal(rank_result["params"], per_rank[0]["params"])
        assert rank_result["iter"] == scenario.steps  # accumulation micro-batches open no step


def plain_reduce_scatter_bytes(bucket: dict[str, Any], world_size: int) -> int:
    return (world_size - 1) * bucket["numel"] * bucket["size"] // world_size


@pytest.mark.parametrize(("world_size", "scenario"), ALL, ids=IDS)
def test_bytes_match_the_protocol(world_size: int, scenario: FSDPScenario) -> None:
    rank_result = results(world_size, scenario)[0]
    num_objectives = len(set(scenario.objective_of_rank))
    units = {u[0]: u for u in rank_result["units"]}
    for step_ledger in rank_result["ledger"]:
        assert step_ledger["overhead"] == {"objective_exchange": (world_size - 1) * 3 * 8}
        assert sorted(b["index"] for b in step_ledger["buckets"]) == [0, 1, 2]
        for bucket in step_ledger["buckets"]:
            parameters = len(units[bucket["index"]][2])
            problems = 1 if scenario.granularity == "bucket" else parameters
            # L² per problem, and L presence counts per parameter (a unit's parameters may be
            # used by some objectives only).
            gramian = (problems * num_objectives**2 + parameters * num_objectives) * 4
            element = bucket["size"]
            if scenario.protocol == "hierarchical":
                on_node = scenario.objective_of_rank[: scenario.ranks_per_node]
                expected = hierarchical_bytes(
                    bucket["numel"],
                    element,
                    world_size,
                    scenario.ranks_per_node,
                    len(set(on_node)),
                    gramian // 4,
                    all_reduce=scenario.strategy == ShardingStrategy.NO_SHARD,
                )
                assert (bucket["sent"], bucket["links"]) == expected
                continue
            # The flat protocols: every collective split by peer pairs (nodes unknown: all
            # within one).
            assert bucket["links"] == flat_links(
                bucket["sent"], world_size, scenario.ranks_per_node
            )
            if scenario.sketch_size is not None:
                assert bucket["sent"] == sketch_bytes(scenario, bucket, units, world_size)
                continue
            if scenario.hsdp is not None:
                replicas, shard_ranks = scenario.hsdp
                shard = bucket["numel"] // shard_ranks
                piece = -(-shard // replicas)
                assert bucket["sent"] == {
                    "reduce_scatter": (shard_ranks - 1) * shard * element,
                    "all_to_all": (replicas - 1) * piece * element,
                    "all_reduce": all_reduce_bytes(gramian * 1, replicas)
                    + all_reduce_bytes(gramian * 1, shard_ranks),
                    "all_gather": (replicas - 1) * piece * element,
                }
                continue
            slices = -(-bucket["numel"] // world_size) * (world_size - 1) * element
            expected = {
                "all_to_all": slices,
                "all_reduce": all_reduce_bytes(gramian * 1, world_size),
            }
            if scenario.strategy == ShardingStrategy.NO_SHARD:
                expected["all_gather"] = slices
            else:  # FSDP's own padding: the all-to-all moves exactly a reduce-scatter's bytes
                assert bucket["numel"] % world_size == 0
                assert slices == plain_reduce_scatter_bytes(bucket, world_size)
            assert bucket["sent"] == expected


def sketch_bytes(
    scenario: FSDPScenario, bucket: dict[str, Any], units: dict[int, tuple], world_size: int
) -> dict[str, int]:
    """The sketch protocol's bytes for one unit: FSDP's own reduce-scatter (or, NO_SHARD, its
    all-reduce; HSDP: the reduce-scatter within the replica and the all-reduce across replicas)
    plus the sketch collective (HSDP: over the replicas, then the shard Gramians and presence
    counts over the shard group)."""
    num_objectives, k = len(set(scenario.objective_of_rank)), scenario.sketch_size
    assert k is not None
    element, numel = bucket["size"], bucket["numel"]
    sizes = units[bucket["index"]][3]
    per_parameter = scenario.granularity == "parameter"
    sent: dict[str, int] = {}

    def add(collective: str, nbytes: int) -> None:
        sent[collective] = sent.get(collective, 0) + nbytes

    if scenario.hsdp is not None:
        replicas, shard_ranks = scenario.hsdp
        shard = numel // shard_ranks
        add("reduce_scatter", (shard_ranks - 1) * shard * element)
        add("all_reduce", all_reduce_bytes(shard * element, replicas))
        problems = list(sizes) if per_parameter else [shard]
        add(*sketch_collective(problems, len(sizes), num_objectives, replicas, k))
        statistics = (len(problems) * num_objectives**2 + len(sizes) * num_objectives) * 4
        add("all_reduce", all_reduce_bytes(statistics, shard_ranks))
        return sent
    if scenario.strategy == ShardingStrategy.NO_SHARD:
        add("all_reduce", all_reduce_bytes(numel * element, world_size))
    else:
        add("reduce_scatter", plain_reduce_scatter_bytes(bucket, world_size))
    rows = world_size if scenario.version == 2 else 1  # FSDP2: a parameter in every row
    problems = [rows * size for size in sizes] if per_parameter else [numel]
    add(*sketch_collective(problems, len(sizes), num_objectives, world_size, k))
    return sent


def test_bytes_within_budget_of_plain_reduce_scatter() -> None:
    """≤ 1.02 × FSDP's reduce-scatter of the same units + the L×L fp32 all-reduce per unit."""
    scenario = next(s for s in SCENARIOS[4] if s.name == "fsdp2_bytes")
    num_objectives = len(set(scenario.objective_of_rank))
    for rank_result in results(4, scenario):
        for step_ledger in rank_result["ledger"]:
            buckets = step_ledger["buckets"]
            assert sum(b["numel"] for b in buckets) > 6000
            sent = sum(sum(b["sent"].values()) for b in buckets)
            sent += sum(step_ledger["overhead"].values())
            plain = sum(plain_reduce_scatter_bytes(b, 4) for b in buckets)
            gramians = len(buckets) * all_reduce_bytes(num_objectives**2 * 4, 4)
            assert sent <= 1.02 * plain + gramians, (sent, plain, gramians)


def test_diagnostics_are_recorded_per_unit() -> None:
    scenario = next(s for s in SCENARIOS[4] if s.diagnostics_every)
    rank_result = results(4, scenario)[0]
    records = rank_result["diagnostics"]
    for step in range(scenario.steps):
        hooked = [r["unit"] for r in rank_result["records"] if r["step"] == step]
        in_step = [r for r in records if r["step"] == step]
        assert [r["bucket"] for r in in_step if "bucket" in r] == hooked
        assert len([r for r in in_step if "global_min_norm" in r]) == 1
        inputs = {r["unit"]: r["inputs"] for r in rank_result["records"] if r["step"] == step}
        for record in in_step:
            if "bucket" in record:  # the unit's MGDA weights, as the reference computes them
                objective_grads, _ = reference.objective_gradients(
                    inputs[record["bucket"]].double(), scenario.objective_of_rank
                )
                expected = reference.combine(objective_grads, "mgda").weights
                torch.testing.assert_close(
                    torch.tensor(record["weights"], dtype=torch.float64),
                    expected,
                    atol=1e-5,
                    rtol=0,
                )


def test_sketched_diagnostics_say_so_and_hold_the_estimate() -> None:
    scenario = next(s for s in SCENARIOS[4] if s.name == "fsdp2_sketch")
    rank_result = results(4, scenario)[0]
    records = [r for r in rank_result["diagnostics"] if "bucket" in r]
    assert len(records) == scenario.steps * 3
    inputs = {(r["step"], r["unit"]): r["inputs"] for r in rank_result["records"]}
    for record in records:
        assert record["sketched"] is True and record["sketch_size"] == SKETCH_K
        objective_grads, _ = reference.objective_gradients(
            inputs[record["step"], record["bucket"]].double(), scenario.objective_of_rank
        )
        estimate = reference.sketch_gramian(
            objective_grads, SKETCH_K, step=record["step"], bucket=record["bucket"]
        )
        norms = torch.tensor(record["norms"], dtype=torch.float64)
        torch.testing.assert_close(norms, estimate.diagonal().sqrt(), rtol=1e-5, atol=0)
    exact = next(s for s in SCENARIOS[4] if s.name == "fsdp2_mgda")
    assert all(r["sketched"] is False for r in results(4, exact)[0]["diagnostics"] if "bucket" in r)


MEAN_VS_NATIVE = shared_spawn(2).add(mean_vs_native, ("a", "b"), 3)
INSTALL_ERRORS = shared_spawn(2).add(install_errors)


def test_mean_equals_fsdp_own_average() -> None:
    """FSDP2 and FSDP1: ``weighting="mean"`` with equal groups gives FSDP's own reduce-scatter
    average (its sharded gradients) up to floating-point reassociation."""
    for runs in MEAN_VS_NATIVE.results():
        for version in (1, 2):
            ours, theirs = runs[f"fsdp{version}_mean"], runs[f"fsdp{version}_native"]
            assert ((ours - theirs).norm(dim=1) / theirs.norm(dim=1)).max() <= 1e-6


def test_unsupported_combinations_fail_at_install_time() -> None:
    per_rank = INSTALL_ERRORS.results()
    errors = per_rank[0]
    assert errors["not_fsdp"].startswith("TypeError: state must be a BucketMOOState")
    assert errors["no_units"].startswith("TypeError: model (Sequential) is not wrapped for")
    assert errors["global"].startswith("ValueError: granularity='global' is DDP-only")
    assert errors["native_hsdp"].startswith("ValueError: FSDP unit 1 ('0') is sharded on a 2-D")
    assert "hsdp_mesh=mesh" in errors["native_hsdp"]
    assert errors["param_groups"].startswith("ValueError: FSDP unit 1 ('0') has 2 parameter groups")
    assert errors["twice"].startswith("ValueError: FSDP unit 0 ('root') already has bucket-MOO")
    assert errors["other_group"].startswith("ValueError: state.process_group (ranks [0])")
    assert errors["old_torch"].startswith("RuntimeError: FSDP unit 0 ('root'): the installed FSDP2")
    assert "set_force_sum_reduction_for_comms" in errors["old_torch"]
    assert errors["fsdp1_not_fsdp"].startswith("TypeError: model (Sequential) is not wrapped")
    assert errors["fsdp1_not_root"].startswith("TypeError: model must be the root")
    assert errors["fsdp1_global"].startswith("ValueError: granularity='global' is DDP-only")
    assert errors["fsdp1_twice"].startswith("ValueError: FSDP unit 0 ('root') already has a comm")
    assert errors["fsdp1_hybrid"].startswith("ValueError: FSDP unit 1 ('0') uses HYBRID_SHARD")
    assert "other_group" not in per_rank[1]
    assert errors["hsdp_1d_mesh"].startswith("ValueError: hsdp_mesh must be the 2-D")
    assert errors["hsdp_hierarchical"] == (
        "ValueError: protocol='hierarchical' does not run under HSDP: the protocol runs over the "
        "replicate group, across nodes already; use protocol='shard' or 'sketch'"
    )
    # The divide factor changed after install: backward raises on every rank (no hang).
    for rank_errors in per_rank:
        error = rank_errors["scaling_changed"]
        assert error.startswith("ValueError: FSDP unit 1 ('0'): FSDP asked for a reduce-scatter")
        assert "gradient divide factor 2.0" in error


def test_hsdp_replica_with_two_objectives_raises_on_every_rank() -> None:
    """Rank 1 trains another objective than its replica: every rank raises at the first unit."""
    for _, checks in results_for(4):
        error = checks["hsdp_mixed_replica"]
        assert error.startswith("ValueError: HSDP with bucket-MOO needs one objective per replica")
        assert "ranks [0, 1]" in error
