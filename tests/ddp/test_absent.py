"""Language-specific parameters: an objective that did not use a parameter is absent there.

On 3 gloo ranks (languages de, fr, fr) with a shared trunk and head and one adapter per
language: every bucket the hook reduces equals the reference, an adapter's update is exactly its
language's average gradient under every weighting and granularity, and shared parameters are
what they were before adapters were told apart (``absent="zero"``, DDP's convention, which the
option keeps).
"""

from typing import Any

import pytest
import torch
from _absent_workers import (
    LANGUAGES,
    OBJECTIVES,
    THREE_LANGUAGES,
    AdapterModel,
    AdapterRun,
    adapter_positions,
    adapter_runs,
    ddp_runs,
    fsdp_runs,
)
from _distributed import shared_spawn

from bucketmoo_hooks import reference, weighting_names
from bucketmoo_hooks.weightings import get_weighting

WORLD_SIZE = len(OBJECTIVES)
TINY = 1e-6  # MiB: every parameter in a bucket of its own

RUNS = [
    *(AdapterRun(f"shared bucket, {name}", weighting=name) for name in weighting_names()),
    AdapterRun("own buckets, mgda", bucket_cap_mb=TINY),
    AdapterRun("own buckets, gradvac", weighting="gradvac", bucket_cap_mb=TINY),
    AdapterRun("parameter granularity, mgda", granularity="parameter"),
    AdapterRun("parameter granularity, upgrad", weighting="upgrad", granularity="parameter"),
    AdapterRun("global granularity, mgda", granularity="global", bucket_cap_mb=TINY),
    AdapterRun("registered, mgda", registered=True, bucket_cap_mb=TINY),
    AdapterRun("DDP's convention, mgda", absent="zero"),
    AdapterRun("DDP's convention, own buckets", absent="zero", bucket_cap_mb=TINY),
    *(
        AdapterRun(f"three languages, {name}", weighting=name, objectives=THREE_LANGUAGES)
        for name in ("mgda", "gradvac", "cagrad")
    ),
    AdapterRun(
        "three languages, parameter granularity",
        granularity="parameter",
        objectives=THREE_LANGUAGES,
    ),
    # The sketch protocol: a rank's scale differs per parameter where objectives are absent.
    AdapterRun("sketch, shared bucket, mgda", sketch_size=16),
    AdapterRun(
        "sketch, own buckets, gradvac", weighting="gradvac", bucket_cap_mb=TINY, sketch_size=16
    ),
    AdapterRun(
        "sketch, parameter granularity, upgrad",
        weighting="upgrad",
        granularity="parameter",
        sketch_size=16,
    ),
    AdapterRun("sketch, global granularity, mgda", granularity="global", sketch_size=16),
    AdapterRun(
        "sketch, three languages, cagrad",
        weighting="cagrad",
        objectives=THREE_LANGUAGES,
        sketch_size=16,
    ),
]


DDP_RUNS = shared_spawn(WORLD_SIZE).add(ddp_runs, RUNS, timeout=240)

# The hierarchical protocol on 2 nodes × 2 ranks: languages confined to a node or spanning both.
HIERARCHICAL_RUNS = [
    AdapterRun(
        "hierarchical, node-aligned, mgda", objectives=("de", "de", "fr", "fr"), ranks_per_node=2
    ),
    AdapterRun(
        "hierarchical, spanning, parameter granularity, upgrad",
        weighting="upgrad",
        granularity="parameter",
        objectives=("de", "fr", "fr", "de"),
        ranks_per_node=2,
    ),
    AdapterRun(
        "hierarchical, own buckets, gradvac",
        weighting="gradvac",
        bucket_cap_mb=TINY,
        objectives=("de", "fr", "fr", "fr"),
        ranks_per_node=2,
    ),
    AdapterRun(
        "hierarchical, global granularity, mgda",
        granularity="global",
        bucket_cap_mb=TINY,
        objectives=("fr", "de", "de", "fr"),
        ranks_per_node=2,
    ),
]
# (FSDP version, weighting, frozen, objectives, ranks_per_node)
HIERARCHICAL_FSDP_CASES = [
    (2, "mgda", False, ("de", "de", "fr", "fr"), 2),
    (1, "upgrad", False, ("de", "fr", "de", "fr"), 2),
    (2, "mgda", True, ("fr", "de", "fr", "fr"), 2),
]
HIERARCHICAL = shared_spawn(4).add(
    adapter_runs, HIERARCHICAL_RUNS, HIERARCHICAL_FSDP_CASES, timeout=240
)
ALL_RUNS = RUNS + HIERARCHICAL_RUNS


def run_distributed_once() -> list[dict[str, Any]]:
    return DDP_RUNS.results()


def ddp_spawn() -> dict[str, Any]:
    return run_distributed_once()[0]


def ddp_results() -> dict[str, dict[str, Any]]:
    return {run.name: result for run, result in zip(RUNS, ddp_spawn()["runs"], strict=True)}


def run_result(run: AdapterRun) -> dict[str, Any]:
    """What rank 0 recorded for ``run``, from whichever launch ran it."""
    if run in HIERARCHICAL_RUNS:
        return HIERARCHICAL.results()[0]["ddp"][HIERARCHICAL_RUNS.index(run)]
    return ddp_results()[run.name]


@pytest.mark.slow
def test_registration_skips_the_check_only_where_ddp_uses_every_parameter() -> None:
    """``(find_unused_parameters, static_graph)`` → whether presence is checked."""
    checks = ddp_spawn()["checks"]
    assert checks == {(False, False): False, (True, False): True, (False, True): True}


@pytest.mark.slow
def test_ranks_registered_unlike_raise_on_every_rank() -> None:
    """One rank checks presence and the others do not: refused before any all-reduce."""
    for rank in range(WORLD_SIZE):
        message = run_distributed_once()[rank]["registered_unlike"]
        assert "ranks disagree on the BucketMOOState configuration" in message, message


def flat_ranges(
    trainable_only: bool = False,
) -> tuple[list[tuple[int, int]], dict[str, list[int]]]:
    """Flat ``(lo, hi)`` of every parameter in model order (without the trunk's weight when it
    is frozen: it then has no gradient), and each adapter's positions."""
    model = AdapterModel()
    if trainable_only:
        model.trunk.weight.requires_grad_(False)
    ranges, offset = [], 0
    for p in model.parameters():
        if p.requires_grad:
            ranges.append((offset, offset + p.numel()))
            offset += p.numel()
    return ranges, adapter_positions(model)


def columns(ranges: list[tuple[int, int]], positions: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(*ranges[i]) for i in positions])


def expected_bucket(run: AdapterRun, record: dict[str, Any], weighting: Any, absent: str):
    """The reference for one bucket the hook reduced, at the run's granularity."""
    inputs, sizes, params = record["inputs"], record["sizes"], record["params"]
    common = {
        "step": record["step"],
        "bucket": record["index"],
        "absent": absent,
        "sketch_size": run.sketch_size,
    }
    if run.granularity == "bucket":
        return reference.bucket_update(
            inputs,
            run.objectives,
            weighting,
            problem=tuple(params),
            parameter_sizes=sizes,
            **common,
        )
    pieces = torch.split(inputs, sizes, dim=1)
    return torch.cat(
        [
            reference.bucket_update(
                piece, run.objectives, weighting, problem=(p,), segment=s, **common
            )
            for s, (piece, p) in enumerate(zip(pieces, params, strict=True))
        ]
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "run", [r for r in ALL_RUNS if r.granularity != "global" and not r.registered]
)
def test_every_bucket_equals_the_reference(run: AdapterRun) -> None:
    records = run_result(run)["records"]
    weighting = get_weighting(run.weighting)  # one instance: stateful weightings carry on
    assert records
    for record in records:
        expected = expected_bucket(run, record, weighting, run.absent)
        torch.testing.assert_close(record["output"], expected, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("run", [r for r in ALL_RUNS if r.absent == "exclude"])
def test_an_adapter_gets_exactly_its_language_gradient(run: AdapterRun) -> None:
    ranges, adapters = flat_ranges()
    for step in run_result(run)["steps"]:
        for language in LANGUAGES:
            cols = columns(ranges, adapters[language])
            ranks = [r for r, o in enumerate(run.objectives) if o == language]
            average = step["local"][ranks][:, cols].mean(dim=0)
            assert average.abs().max() > 0
            torch.testing.assert_close(step["reduced"][cols], average, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize(
    "run",
    [
        r
        for r in ALL_RUNS
        if r.absent == "exclude" and r.granularity != "global" and not r.registered
    ],
)
def test_shared_parameters_are_unchanged(run: AdapterRun) -> None:
    """Where every objective is present, the weights are those of DDP's convention."""
    _, adapters = flat_ranges()
    # The language adapters, and the Latin one (Russian does not use it).
    latin = [i for i, (n, _) in enumerate(AdapterModel().named_parameters()) if "latin" in n]
    adapter_params = {i for positions in adapters.values() for i in positions} | set(latin)
    convention = get_weighting(run.weighting)  # fed the same problems: same state
    for record in run_result(run)["records"]:
        zero = expected_bucket(run, record, convention, "zero")
        offsets = torch.tensor([0, *record["sizes"]]).cumsum(0).tolist()
        for k, p in enumerate(record["params"]):
            if p not in adapter_params:
                lo, hi = offsets[k], offsets[k + 1]
                torch.testing.assert_close(
                    record["output"][lo:hi], zero[lo:hi], rtol=1e-5, atol=1e-7
                )


@pytest.mark.slow
def test_ddp_convention_is_kept_as_an_option() -> None:
    """``absent="zero"``: with MGDA an adapter in its own bucket gets nothing (min-norm of
    ``{0, ḡ}``), in a shared bucket a fraction of its language's gradient."""
    ranges, adapters = flat_ranges()
    results = ddp_results()
    for name, low, high in (
        ("DDP's convention, own buckets", 0.0, 0.0),
        ("DDP's convention, mgda", 0.0, 0.999),
    ):
        step = results[name]["steps"][0]
        for language in LANGUAGES:
            cols = columns(ranges, adapters[language])
            ranks = [r for r, o in enumerate(OBJECTIVES) if o == language]
            average = step["local"][ranks][:, cols].mean(dim=0)
            ratio = (step["reduced"][cols].norm() / average.norm()).item()
            assert low <= ratio <= high, (name, language, ratio)


# (FSDP version, weighting, trunk weight frozen)
FSDP_CASES = [
    *(
        (version, weighting, False)
        for version in (1, 2)
        for weighting in ("mgda", "upgrad", "mean")
    ),
    (1, "mgda", True),
    (2, "mgda", True),
]


FSDP_RUNS = shared_spawn(WORLD_SIZE).add(fsdp_runs, FSDP_CASES, timeout=240)


def fsdp_results() -> list[dict[str, Any]]:
    return FSDP_RUNS.results()[0]


@pytest.mark.slow
@pytest.mark.parametrize("case", FSDP_CASES, ids=str)
def test_fsdp_units_follow_the_same_rule(case: tuple[int, str, bool]) -> None:
    _, weighting, frozen = case
    check_fsdp_rule(fsdp_results()[FSDP_CASES.index(case)], OBJECTIVES, weighting, frozen)


@pytest.mark.slow
@pytest.mark.parametrize("case", HIERARCHICAL_FSDP_CASES, ids=str)
def test_fsdp_units_follow_the_same_rule_under_the_hierarchical_protocol(case: tuple) -> None:
    _, weighting, frozen, objectives, _ = case
    result = HIERARCHICAL.results()[0]["fsdp"][HIERARCHICAL_FSDP_CASES.index(case)]
    check_fsdp_rule(result, objectives, weighting, frozen)


def check_fsdp_rule(
    result: dict[str, Any], objectives: tuple[str, ...], weighting: str, frozen: bool
) -> None:
    """One FSDP run equals the reference, and each adapter got its language's average."""
    model = AdapterModel()
    model.trunk.weight.requires_grad_(not frozen)
    sizes = [p.numel() for p in model.parameters() if p.requires_grad]
    expected = reference.bucket_update(
        result["local"], objectives, weighting, parameter_sizes=sizes
    )
    torch.testing.assert_close(result["reduced"], expected, rtol=1e-5, atol=1e-7)
    ranges, adapters = flat_ranges(trainable_only=frozen)
    for language in LANGUAGES:
        cols = columns(ranges, adapters[language])
        ranks = [r for r, o in enumerate(objectives) if o == language]
        average = result["local"][ranks][:, cols].mean(dim=0)
        torch.testing.assert_close(result["reduced"][cols], average, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_three_languages_latin_adapter_is_weighted_over_its_two() -> None:
    """The Latin adapter (de and fr, not ru) gets MGDA on the bucket's Gramian restricted to
    de and fr: its update is the min-norm point of their average gradients there."""
    run = next(r for r in RUNS if r.name == "three languages, mgda")
    latin = [i for i, (n, _) in enumerate(AdapterModel().named_parameters()) if "latin" in n]
    for record in ddp_results()[run.name]["records"]:
        if not set(latin) & set(record["params"]):
            continue
        inputs, sizes = record["inputs"], record["sizes"]
        gramian = inputs[:2] @ inputs[:2].T  # ranks 0, 1 are de, fr: their rows are ḡ_de, ḡ_fr
        weights = get_weighting("mgda")(gramian)
        offsets = torch.tensor([0, *sizes]).cumsum(0).tolist()
        k = record["params"].index(latin[0])
        lo, hi = offsets[k], offsets[k + 1]
        torch.testing.assert_close(
            record["output"][lo:hi], weights @ inputs[:2, lo:hi], rtol=1e-5, atol=1e-7
        )
        return
    pytest.fail("no bucket held the Latin adapter")


def test_reference_rule_by_hand() -> None:
    """Two languages, a shared parameter and one adapter each: the adapters get their own
    gradient, the shared parameter MGDA's combination of the whole problem."""
    shared = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    adapter = torch.tensor([[2.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [0.0, 3.0]])
    grads = torch.cat([shared, adapter[0], adapter[1]], dim=1)
    update = reference.bucket_update(grads, ["de", "fr"], "mgda", parameter_sizes=[2, 2, 2])
    # The whole problem: ḡ_de = (1, 0, 2, 0, 0, 0), ḡ_fr = (0, 1, 0, 0, 0, 3): G = [[5, 0],
    # [0, 10]], min-norm weights (2/3, 1/3).
    torch.testing.assert_close(update[:2], torch.tensor([2 / 3, 1 / 3]))
    torch.testing.assert_close(update[2:4], torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(update[4:], torch.tensor([0.0, 3.0]))
    zero = reference.bucket_update(grads, ["de", "fr"], "mgda", absent="zero")
    torch.testing.assert_close(zero[2:4], torch.tensor([4 / 3, 0.0]))


def test_model_update_takes_the_parameters_of_each_piece() -> None:
    """``parameter_sizes`` split the pieces (zero-size parameters anywhere); a parameter that
    straddles two pieces is refused."""
    torch.manual_seed(0)
    grads = torch.randn(2, 7)
    grads[1, 2:4] = 0  # the second objective did not use the second parameter
    whole = reference.model_update(grads, [4, 3], parameter_sizes=[2, 2, 0, 3, 0])
    expected = torch.cat(
        [
            reference.bucket_update(
                grads[:, :4], None, "mgda", bucket=0, problem=(0,), parameter_sizes=[2, 2]
            ),
            reference.bucket_update(
                grads[:, 4:], None, "mgda", bucket=1, problem=(1,), parameter_sizes=[0, 3, 0]
            ),
        ]
    )
    torch.testing.assert_close(whole, expected)
    torch.testing.assert_close(whole[2:4], grads[0, 2:4])  # one objective: its gradient
    with pytest.raises(ValueError, match="into whole parameters"):
        reference.model_update(grads, [4, 3], parameter_sizes=[2, 3, 2])
