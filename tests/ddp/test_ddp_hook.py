"""The DDP hook on real gloo processes, checked against the single-process reference.

Scenarios of one world size run in one launch of processes (launching is the slow part); the
tests below then check the recorded buckets, gradients, parameters and byte counts.
"""

import atexit
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from _ddp_checks import expected_outputs, objective_ids, relative_error
from _ddp_workers import (
    Scenario,
    disagreeing_states,
    mean_vs_allreduce,
    node_groups_made,
    problem_keys,
    registration_errors,
    train_scenarios,
    train_with_checkpoint,
)
from _distributed import shared_spawn
from _hierarchical_checks import flat_links, hierarchical_bytes
from _sketch_checks import sketch_collective

from bucketmoo_hooks import objective_key, reference, weighting_names
from bucketmoo_hooks._collectives import all_reduce_bytes
from bucketmoo_hooks.weightings import MGDA, GradVac, NashMTL, Weighting

pytestmark = pytest.mark.slow  # every test reads a launch of processes

SKETCH_K = 16  # folds every bucket (13 columns) and most parameters
SKETCH: dict[str, Any] = {"protocol": "sketch", "sketch_size": SKETCH_K}


def nodes_of(ranks_per_node: int) -> dict[str, Any]:
    """The hierarchical protocol on simulated nodes of ``ranks_per_node`` consecutive ranks."""
    return {"protocol": "hierarchical", "ranks_per_node": ranks_per_node}


PER_STEP = (
    (0, 1, 2, 3),
    ("en", "de", "en", "ja"),
    (7, 7, 7, 7),  # one objective this step: the plain average
    (1, 2, 1, 2),
    ("ja", "ja", "ko", "en"),
)

SCENARIOS: dict[int, list[Scenario]] = {
    2: [
        Scenario("r2_mgda", objective_of_rank=(0, 1), steps=3),
        Scenario("r2_bf16", objective_of_rank=(0, 1), dtype=torch.bfloat16, steps=3),
        Scenario("r2_fp16", objective_of_rank=(0, 1), dtype=torch.float16, steps=3),
        Scenario("r2_sketch", objective_of_rank=(0, 1), steps=3, **SKETCH),
        Scenario("r2_sketch_bf16", objective_of_rank=(0, 1), dtype=torch.bfloat16, **SKETCH),
    ],
    3: [
        Scenario("r3_mgda", objective_of_rank=(0, 1, 2), steps=21, diagnostics_every=5),
        Scenario("r3_mean", objective_of_rank=("a", "b", "c"), weighting="mean", steps=3),
        Scenario("r3_host_group", objective_of_rank=(0, 1, 2), separate_host_group=True, steps=2),
        Scenario(
            "r3_parameter",
            objective_of_rank=("en", "de", "ja"),
            granularity="parameter",
            steps=3,
            diagnostics_every=2,
        ),
        Scenario(
            "r3_global",
            objective_of_rank=(0, 1, 2),
            granularity="global",
            steps=3,
            diagnostics_every=1,
        ),
        Scenario("r3_sketch", objective_of_rank=("a", "b", "c"), weighting="pcgrad", **SKETCH),
        Scenario(
            "r3_sketch_parameter",
            objective_of_rank=("en", "de", "ja"),
            granularity="parameter",
            steps=3,
            **SKETCH,
        ),
        Scenario("r3_sketch_global", objective_of_rank=(0, 1, 2), granularity="global", **SKETCH),
    ],
    4: [
        Scenario("r4_groups", objective_of_rank=(0, 0, 1, 1), steps=3),
        Scenario("r4_uneven", objective_of_rank=(0, 1, 1, 1), steps=21),
        Scenario(
            "r4_bucket_view", objective_of_rank=(0, 1, 1, 1), gradient_as_bucket_view=True, steps=3
        ),
        Scenario("r4_no_sync", objective_of_rank=("en", "de", "en", "ja"), micro_batches=3),
        Scenario("r4_per_step", per_step_objectives=PER_STEP, steps=len(PER_STEP)),
        Scenario(
            "r4_parameter_view",
            objective_of_rank=(0, 1, 1, 2),
            granularity="parameter",
            gradient_as_bucket_view=True,
        ),
        Scenario(
            "r4_global_bf16",
            objective_of_rank=(0, 0, 1, 1),
            granularity="global",
            dtype=torch.bfloat16,
        ),
        # Every weighting through the real hook (stateful GradVac and Nash-MTL over several steps).
        *(
            Scenario(f"r4_{name}", objective_of_rank=(0, 1, 2, 2), weighting=name, steps=3)
            for name in (
                "pcgrad",
                "gradvac",
                "cagrad",
                "imtl_g",
                "upgrad",
                "dualproj",
                "aligned_mtl",
                "nash_mtl",
            )
        ),
        # Realistic bucket sizes (thousands of elements) for the byte budget.
        Scenario("r4_bytes", objective_of_rank=(0, 1, 2, 2), hidden=(96, 64), bucket_cap_mb=0.01),
        Scenario("r4_sketch_uneven", objective_of_rank=(0, 1, 1, 1), steps=5, **SKETCH),
        Scenario("r4_sketch_per_step", per_step_objectives=PER_STEP, steps=5, **SKETCH),
        Scenario(
            "r4_sketch_gradvac",
            objective_of_rank=(0, 1, 2, 2),
            weighting="gradvac",
            steps=3,
            **SKETCH,
        ),
        Scenario(
            "r4_sketch_global_bf16",
            objective_of_rank=(0, 0, 1, 1),
            granularity="global",
            dtype=torch.bfloat16,
            **SKETCH,
        ),
        # k above every bucket: every Gramian exact, the plain reference.
        Scenario(
            "r4_sketch_exact",
            objective_of_rank=(0, 1, 2, 2),
            protocol="sketch",
            sketch_size=4096,
            steps=3,
        ),
        Scenario(
            "r4_sketch_bytes",
            objective_of_rank=(0, 1, 2, 2),
            hidden=(96, 64),
            bucket_cap_mb=0.01,
            protocol="sketch",
            sketch_size=256,
        ),
        # The hierarchical protocol on 2 nodes × 2 ranks: languages confined to one node, then
        # spanning both; the shard protocol's bytes split by link class.
        Scenario("r4_hier_node_aligned", objective_of_rank=(0, 0, 1, 1), steps=3, **nodes_of(2)),
        Scenario(
            "r4_hier_spanning",
            objective_of_rank=("en", "de", "en", "de"),
            weighting="upgrad",
            steps=3,
            **nodes_of(2),
        ),
        Scenario(
            "r4_hier_uneven_parameter",
            objective_of_rank=(0, 1, 1, 1),
            weighting="pcgrad",
            granularity="parameter",
            **nodes_of(2),
        ),
        Scenario(
            "r4_hier_global_bf16",
            objective_of_rank=(0, 1, 2, 2),
            granularity="global",
            dtype=torch.bfloat16,
            **nodes_of(2),
        ),
        Scenario("r4_hier_per_step", per_step_objectives=PER_STEP, steps=5, **nodes_of(2)),
        Scenario("r4_hier_one_node", objective_of_rank=(0, 1, 2, 2), **nodes_of(4)),
        Scenario("r4_hier_one_rank_per_node", objective_of_rank=(0, 1, 2, 2), **nodes_of(1)),
        Scenario("r4_shard_nodes", objective_of_rank=(0, 1, 2, 2), ranks_per_node=2),
    ],
    # 2 nodes × 3 ranks and 3 nodes × 2 ranks.
    6: [
        Scenario("r6_hier_2x3_aligned", objective_of_rank=(0, 0, 0, 1, 1, 1), **nodes_of(3)),
        Scenario(
            "r6_hier_2x3_gradvac",
            objective_of_rank=(0, 1, 0, 2, 2, 1),
            weighting="gradvac",
            steps=3,
            **nodes_of(3),
        ),
        Scenario(
            "r6_hier_3x2_parameter_bf16",
            objective_of_rank=(0, 0, 0, 1, 2, 2),
            granularity="parameter",
            dtype=torch.bfloat16,
            **nodes_of(2),
        ),
        Scenario(
            "r6_hier_3x2_upgrad",
            objective_of_rank=(0, 1, 2, 0, 1, 2),
            weighting="upgrad",
            **nodes_of(2),
        ),
    ],
    # 2 nodes × 4 ranks.
    8: [
        Scenario("r8_hier_aligned", objective_of_rank=(0,) * 4 + (1,) * 4, **nodes_of(4)),
        Scenario(
            "r8_hier_mixed_global",
            objective_of_rank=(0, 1, 2, 3, 0, 1, 2, 3),
            granularity="global",
            **nodes_of(4),
        ),
    ],
}
ALL = [(world_size, s) for world_size, scenarios in SCENARIOS.items() for s in scenarios]
IDS = [s.name for _, s in ALL]


SCENARIO_RUNS = {
    world_size: shared_spawn(world_size).add(train_scenarios, scenarios)
    for world_size, scenarios in SCENARIOS.items()
}


def results_for(world_size: int) -> list[list[dict[str, Any]]]:
    """Per rank, per scenario of ``SCENARIOS[world_size]``: what the workers recorded."""
    return SCENARIO_RUNS[world_size].results()


def results(world_size: int, scenario: Scenario) -> list[dict[str, Any]]:
    """Per rank: what ``scenario`` recorded."""
    index = SCENARIOS[world_size].index(scenario)
    return [per_rank[index] for per_rank in results_for(world_size)]


@pytest.mark.parametrize(("world_size", "scenario"), ALL, ids=IDS)
def test_hook_equals_reference(world_size: int, scenario: Scenario) -> None:
    per_rank = results(world_size, scenario)
    tolerance = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[scenario.dtype]
    buckets_per_step: dict[int, list[int]] = {}
    for rank_result in per_rank:
        for record, expected in zip(
            rank_result["records"], expected_outputs(scenario, rank_result, world_size), strict=True
        ):
            ids = objective_ids(scenario, record["step"], world_size)
            output = record["output"]
            assert output.dtype == scenario.dtype
            error = relative_error(output, expected, record["inputs"], ids)
            assert error <= tolerance, (record["step"], record["index"], error)
            # The bucket held this rank's own (accumulated) gradient, bit for bit.
            assert record["local_error"] == 0.0
            buckets_per_step.setdefault(record["step"], []).append(record["inputs"].shape[1])
        # DDP's .grad is exactly what the hook returned (both gradient_as_bucket_view modes).
        assert max(rank_result["grad_errors"]) == 0.0
    lengths = [n for step_lengths in buckets_per_step.values() for n in step_lengths]
    assert any(n % world_size for n in lengths), "want a bucket that needs padding"
    if scenario.steps > 1:
        # DDP rebuilt its buckets after iteration 1 and the hook kept matching.
        assert buckets_per_step[0] != buckets_per_step[1]
        assert len(buckets_per_step[1]) > 1


@pytest.mark.parametrize(("world_size", "scenario"), ALL, ids=IDS)
def test_replicas_stay_bitwise_identical(world_size: int, scenario: Scenario) -> None:
    per_rank = results(world_size, scenario)
    for rank_result in per_rank[1:]:
        assert torch.equal(rank_result["params"], per_rank[0]["params"])
        for mine, theirs in zip(rank_result["records"], per_rank[0]["records"], strict=True):
            assert torch.equal(mine["output"], theirs["output"])
    assert all(r["iter"] == scenario.steps for r in per_rank)


def test_at_least_twenty_steps_are_covered() -> None:
    assert max(s.steps for _, s in ALL if s.weighting == "mgda") >= 20


def test_per_step_objective_map_is_agreed() -> None:
    scenario = next(s for s in SCENARIOS[4] if s.per_step_objectives is not None)
    for rank_result in results(4, scenario):
        for step, keys in enumerate(rank_result["maps"]):
            assert keys == tuple(objective_key(i) for i in PER_STEP[step])


def test_separate_host_group_is_used_when_group_has_no_cpu_backend() -> None:
    scenario = next(s for s in SCENARIOS[3] if s.separate_host_group)
    assert all(r["used_separate_group"] for r in results(3, scenario))
    assert not any(r["used_separate_group"] for r in results(3, SCENARIOS[3][0]))


@pytest.mark.parametrize(("world_size", "scenario"), ALL, ids=IDS)
def test_bytes_match_the_protocol(world_size: int, scenario: Scenario) -> None:
    rank_result = results(world_size, scenario)[0]
    for step, step_ledger in enumerate(rank_result["ledger"]):
        num_objectives = len(set(objective_ids(scenario, step, world_size)))
        assert step_ledger["overhead"] == {"objective_exchange": (world_size - 1) * 3 * 8}
        records = [r for r in rank_result["records"] if r["step"] == step]
        for bucket, record in zip(step_ledger["buckets"], records, strict=True):
            if scenario.protocol == "hierarchical" and scenario.ranks_per_node not in (
                1,
                world_size,
            ):
                problems = len(record["sizes"]) if scenario.granularity == "parameter" else 1
                on_node = objective_ids(scenario, step, world_size)[: scenario.ranks_per_node]
                sent, links = hierarchical_bytes(
                    bucket["numel"],
                    bucket["element_size"],
                    world_size,
                    scenario.ranks_per_node,
                    len(set(on_node)),
                    problems * num_objectives**2 + len(record["sizes"]) * num_objectives,
                    all_reduce=True,
                )
                assert (bucket["sent"], bucket["links"]) == (sent, links)
                continue
            # The flat protocols: every collective over all ranks, split by peer pairs.
            assert bucket["links"] == flat_links(
                bucket["sent"], world_size, scenario.ranks_per_node
            )
            if scenario.sketch_size is not None:  # DDP's own all-reduce + the sketch's
                nbytes = bucket["numel"] * bucket["element_size"]
                sizes = record["sizes"]
                problems = sizes if scenario.granularity == "parameter" else [sum(sizes)]
                collective, sketch = sketch_collective(
                    problems, len(sizes), num_objectives, world_size, scenario.sketch_size
                )
                expected = {"all_reduce": all_reduce_bytes(nbytes, world_size)}
                expected[collective] = expected.get(collective, 0) + sketch
                assert bucket["sent"] == expected
                continue
            shard = -(-bucket["numel"] // world_size)
            slices = (world_size - 1) * shard * bucket["element_size"]
            problems = len(record["sizes"]) if scenario.granularity == "parameter" else 1
            # Plus L presence counts per parameter: registered raw, the hook cannot know that
            # DDP (without find_unused_parameters) has every rank use every parameter.
            numbers = problems * num_objectives**2 + len(record["sizes"]) * num_objectives
            gramian = all_reduce_bytes(numbers * 4, world_size)
            assert bucket["sent"] == {
                "all_to_all": slices,
                "all_reduce": gramian,
                "all_gather": slices,
            }


def test_bytes_within_budget_of_ring_allreduce() -> None:
    """≤ 1.02 × a ring all-reduce of the same buckets + the L×L fp32 all-reduce per bucket."""
    scenario = next(s for s in SCENARIOS[4] if s.name == "r4_bytes")
    num_objectives = len(set(scenario.objective_of_rank))
    for step_ledger in results(4, scenario)[0]["ledger"]:
        buckets = step_ledger["buckets"]
        assert min(b["numel"] for b in buckets) > 1000
        sent = sum(sum(b["sent"].values()) for b in buckets)
        sent += sum(step_ledger["overhead"].values())
        allreduce = sum(all_reduce_bytes(b["numel"] * b["element_size"], 4) for b in buckets)
        gramians = len(buckets) * all_reduce_bytes(num_objectives**2 * 4, 4)
        assert sent <= 1.02 * allreduce + gramians, (sent, allreduce, gramians)


MEAN_VS_ALLREDUCE = shared_spawn(4).add(mean_vs_allreduce, (0, 0, 1, 1), 5)


def test_mean_with_equal_groups_equals_allreduce_hook() -> None:
    per_rank = MEAN_VS_ALLREDUCE.results()
    for runs in per_rank:
        ours, theirs = runs["mean"], runs["allreduce"]
        assert ((ours - theirs).norm(dim=1) / theirs.norm(dim=1)).max() <= 1e-6


INCONSISTENT = [
    ("weighting", "ValueError: ranks disagree on the BucketMOOState configuration"),
    ("objective_of_rank", "ValueError: ranks disagree on the BucketMOOState configuration"),
    ("sketch_size", "ValueError: ranks disagree on the BucketMOOState configuration"),
    ("step", "RuntimeError: ranks are at different steps"),
]
DISAGREEING = {
    (case, overlap): shared_spawn(2).add(disagreeing_states, case, overlap, timeout=90)
    for case, _ in INCONSISTENT
    for overlap in (False, True)
}


@pytest.mark.parametrize(("case", "message"), INCONSISTENT)
@pytest.mark.parametrize("overlap", [False, True])
def test_inconsistent_ranks_all_raise(case: str, message: str, overlap: bool) -> None:
    expected = re.escape(message)
    if overlap:  # the exchange runs on the worker: backward raises, naming bucket and step
        expected = (
            "RuntimeError: Got the following error when running the callback: BucketHookError: "
            rf"bucket_moo_hook failed on bucket 0 of step \d: {expected}"
        )
    for error in DISAGREEING[case, overlap].results():
        assert re.match(expected, error), error


REGISTRATION_ERRORS = shared_spawn(2).add(registration_errors)


def test_bad_registration_raises_clear_errors() -> None:
    errors = REGISTRATION_ERRORS.results()[0]
    assert errors["wrong_length"].startswith(
        "ValueError: objective_of_rank has 3 entries but the model's process group "
        "(global ranks [0, 1]) has 2 ranks"
    )
    assert errors["other_group"].startswith(
        "ValueError: state.process_group (ranks [0]) is not the process group the model reduces "
        "over (ranks [0, 1])"
    )
    assert errors["mixed_precision"].startswith("ValueError: DDP(mixed_precision=...)")


def test_bad_nodes_are_refused_on_every_rank() -> None:
    """``ranks_per_node`` that does not divide ``R``, or differs between ranks, raises on every
    rank at registration, before any rank waits in the node groups' rendezvous."""
    for errors in REGISTRATION_ERRORS.results():
        assert errors["nodes_not_dividing"] == (
            "ValueError: ranks_per_node=3 does not divide the process group's 2 ranks; "
            "protocol='hierarchical' needs whole nodes"
        )
        assert errors["nodes_disagree"].startswith(
            "ValueError: ranks disagree on ranks_per_node (per rank of the process group: [1, 2])"
        )


NODE_GROUPS = {overlap: shared_spawn(4).add(node_groups_made, overlap) for overlap in (False, True)}


@pytest.mark.parametrize("overlap", [False, True])
def test_node_groups_are_made_at_registration_with_deterministic_names(overlap: bool) -> None:
    """Nodes of ranks {0, 1} and {2, 3}; across them {0, 2} and {1, 3}; the members of a group
    name it alike; the overlap worker's copy has groups of its own."""
    per_rank = NODE_GROUPS[overlap].results()
    prefix = "overlap-" if overlap else ""
    for rank, result in enumerate(per_rank):
        node, local = divmod(rank, 2)
        assert result["made"][prefix + "node2"][0] == [2 * node, 2 * node + 1]
        assert result["made"][prefix + "across2"][0] == [local, local + 2]
        for purpose, (ranks, name) in result["made"].items():
            assert all(per_rank[r]["made"][purpose] == (ranks, name) for r in ranks)
        assert torch.equal(result["grads"], per_rank[0]["grads"])
        assert result["links"]["cross_node"] > 0 and result["links"]["intra_node"] > 0


def test_global_granularity_holds_every_bucket_slice_until_the_last() -> None:
    """Global MOO keeps L·⌈n/R⌉ fp32 per bucket alive until the last bucket; bucket MOO none."""
    for world_size, scenario in ALL:
        rank_result = results(world_size, scenario)[0]
        # The sketch protocol scales DDP's own bucket buffers at the last bucket: nothing held.
        if scenario.granularity != "global" or scenario.protocol == "sketch":
            assert rank_result["held_bytes"] == 0
            continue
        last_step = rank_result["ledger"][-1]["buckets"]
        num_objectives = len(set(scenario.objective_of_rank))
        held = sum(num_objectives * -(-b["numel"] // world_size) * 4 for b in last_step)
        assert rank_result["held_bytes"] == held > 0


def expected_diagnostics(objective_grads: torch.Tensor) -> dict[str, Any]:
    """The diagnostics of one problem, computed from its objective gradients ``[L, n]``."""
    combination = reference.combine(objective_grads.double(), "mgda")
    norms = objective_grads.double().norm(dim=1)
    return {
        "cosine": combination.gramian / torch.outer(norms, norms),
        "norms": norms,
        "weights": combination.weights,
        "update_norm": combination.update.norm(),
    }


@pytest.mark.parametrize(
    ("world_size", "scenario"),
    [(w, s) for w, s in ALL if s.diagnostics_every],
    ids=[s.name for _, s in ALL if s.diagnostics_every],
)
def test_diagnostics_match_the_reference(world_size: int, scenario: Scenario) -> None:
    rank_result = results(world_size, scenario)[0]
    records = rank_result["diagnostics"]
    steps = sorted({r["step"] for r in rank_result["records"]})
    assert [r["step"] for r in records if "global_min_norm" in r] == steps
    labels = [str(i) for i in scenario.objective_of_rank]
    for step in steps:
        ids = objective_ids(scenario, step, world_size)
        in_step = [r for r in rank_result["records"] if r["step"] == step]
        everything = torch.cat([r["inputs"] for r in in_step], dim=1)
        problems = {
            "bucket": [(r["index"], None, r["inputs"]) for r in in_step],
            "parameter": [
                (r["index"], i, part)
                for r in in_step
                for i, part in enumerate(r["inputs"].split(r["sizes"], dim=1))
            ],
            "global": [(-1, None, everything)],
        }[scenario.granularity]
        recorded = [r for r in records if r["step"] == step and "bucket" in r]
        assert [(r["bucket"], r["parameter"]) for r in recorded] == [p[:2] for p in problems]
        for record, (_, _, inputs) in zip(recorded, problems, strict=True):
            assert record["objectives"] == labels
            objective_grads, _ = reference.objective_gradients(inputs.double(), ids)
            expected = expected_diagnostics(objective_grads)
            for name, value in expected.items():
                torch.testing.assert_close(
                    torch.tensor(record[name], dtype=torch.float64),
                    value,
                    rtol=1e-4,
                    atol=1e-6 * float(expected["norms"].max()),
                )
        global_grads, _ = reference.objective_gradients(everything.double(), ids)
        [global_record] = [r for r in records if r["step"] == step and "global_min_norm" in r]
        assert global_record["global_min_norm"] == pytest.approx(
            float(reference.combine(global_grads, "mgda").update.norm()), rel=1e-4, abs=1e-7
        )


RESUMED_WEIGHTINGS = [MGDA(), GradVac(beta=0.5), NashMTL(iterations=1)]
RESUME_OPTIONS = {"bucket_cap_mb": 0.001, "find_unused_parameters": True}
CHECKPOINTS = Path(tempfile.mkdtemp(prefix="bucketmoo-resume-"))
atexit.register(shutil.rmtree, CHECKPOINTS, ignore_errors=True)
#: The uninterrupted runs, saving after step 2; the resumed runs (with and without the hook state)
#: in other processes, launched after them.
RESUME_RUNS = {}
for _weighting in RESUMED_WEIGHTINGS:
    _checkpoint = CHECKPOINTS / _weighting.name
    _checkpoint.mkdir()
    _arguments = (RESUME_OPTIONS, range(3, 6), str(_checkpoint), None, _weighting)
    RESUME_RUNS[_weighting.name] = (
        shared_spawn(3).add(
            train_with_checkpoint, RESUME_OPTIONS, range(6), str(_checkpoint), 2, _weighting
        ),
        shared_spawn(3, second=True).add(train_with_checkpoint, *_arguments),
        # Stateful weightings: GradVac's targets and Nash-MTL's warm starts are in the hook state.
        shared_spawn(3, second=True).add(train_with_checkpoint, *_arguments, False)
        if isinstance(_weighting, GradVac | NashMTL)
        else None,
    )


@pytest.mark.parametrize("weighting", RESUMED_WEIGHTINGS, ids=lambda w: w.name)
def test_resume_from_checkpoint_is_bitwise_identical(weighting: Weighting) -> None:
    """Model + optimizer + hook state saved after step 2 and loaded by fresh processes: steps 3–5
    give the parameters of an uninterrupted run bit for bit. (find_unused_parameters=True makes
    DDP's first bucketing after the restart equal to its rebuilt one; see README.)

    GradVac's targets and Nash-MTL's warm starts (1 Newton iteration, so the start matters) are
    in the hook state: resuming without it gives other parameters.
    """
    full_run, resumed_run, forgetful_run = RESUME_RUNS[weighting.name]
    full = full_run.results()
    resumed = resumed_run.results()
    for uninterrupted, restarted in zip(full, resumed, strict=True):
        assert torch.equal(uninterrupted, restarted)
    if isinstance(weighting, GradVac | NashMTL):  # stateful
        forgetful = forgetful_run.results()
        assert not torch.equal(full[0], forgetful[0])


PROBLEM_KEYS = {
    (granularity, known_order): shared_spawn(2).add(problem_keys, granularity, known_order)
    for granularity in ("bucket", "parameter", "global")
    for known_order in (True, False)
}


@pytest.mark.parametrize("granularity", ["bucket", "parameter", "global"])
def test_weightings_get_stable_problem_keys(granularity: str) -> None:
    """Keys are parameter positions: equal on every rank and at every step, whatever DDP's
    bucket indices (it rebuilds its buckets after step 0)."""
    per_rank = PROBLEM_KEYS[granularity, True].results()
    assert per_rank[0]["contexts"] == per_rank[1]["contexts"]
    result = per_rank[0]
    assert result["registered_order"]
    for step in range(3):
        buckets = [params for s, params in result["buckets"] if s == step]
        expected = {
            "bucket": buckets,
            "parameter": [(index,) for params in buckets for index in params],
            "global": [()],
        }[granularity]
        seen = [problem for s, _, _, problem in result["contexts"] if s == step]
        assert seen == expected
    without_order = PROBLEM_KEYS[granularity, False].results()[0]
    assert {problem for *_, problem in without_order["contexts"]} == {None}


def test_every_weighting_runs_through_the_hook() -> None:
    assert {s.weighting for _, s in ALL} == set(weighting_names())
