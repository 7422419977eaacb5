"""``benchmarks/sketch_accuracy.py``: its variance formulas against brute force, its draws of
the sketch against ``reference.sketch_gramian`` and the formula, and its ``--quick`` run end to
end (tiny GPT)."""

import importlib.util
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bucketmoo_hooks._sketch import SignTable, fold_width, sign_offset

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "sketch_accuracy.py"
_spec = importlib.util.spec_from_file_location("sketch_accuracy", BENCHMARK)
assert _spec is not None and _spec.loader is not None
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench  # its dataclasses look their module up
_spec.loader.exec_module(bench)


def gradients(num_objectives: int, numel: int, seed: int = 0, period: int = 0) -> torch.Tensor:
    """Languages sharing a component; with ``period``, 10x larger on the elements ``i`` with
    ``i mod period < 8`` (energy concentrated in 8 columns of a fold of width ``period``)."""
    generator = torch.Generator().manual_seed(seed)
    shared = torch.randn(1, numel, generator=generator)
    grads = shared + 0.7 * torch.randn(num_objectives, numel, generator=generator)
    if period:
        grads[:, torch.arange(numel) % period < 8] *= 10
    return grads


def problem(grads: torch.Tensor) -> "bench.Problem":
    return bench.Problem("synthetic", 0, 0, 3, (0,), ["w"], grads)


def brute_force_variance(folded: torch.Tensor) -> torch.Tensor:
    """Var over every row-sign vector ρ ∈ {±1}^rows of ⟨Φa, Φb⟩ = Σ_j (Σ_r ρ_r X_rj)_a (…)_b."""
    x = folded.double()
    rows = x.shape[1]
    values = []
    for signs in itertools.product((-1.0, 1.0), repeat=rows):
        y = torch.einsum("r,arp->ap", torch.tensor(signs, dtype=x.dtype), x)
        values.append(y @ y.T)
    return torch.stack(values).var(0, unbiased=False)


@pytest.mark.parametrize("shape", [(3, 4, 9), (2, 11, 5)])  # rows ≤ p, and rows > p
def test_conditional_variance_is_the_variance_over_the_row_signs(shape: tuple) -> None:
    folded = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(bench.conditional_variance(folded), brute_force_variance(folded))


def test_formula_is_the_average_of_the_conditional_variance_over_sign_tables() -> None:
    generator = torch.Generator().manual_seed(2)
    grads = torch.randn(2, 5, 7, generator=generator, dtype=torch.float64)  # [L, rows, p]
    grads[:, :, 0] *= 5  # one heavy column: far from the even-spread bound
    tables = [
        torch.randint(0, 2, grads.shape[1:], generator=generator).to(grads) * 2 - 1
        for _ in range(4000)
    ]
    average = torch.stack([bench.conditional_variance(grads * t) for t in tables]).mean(0)
    formula = bench.formula_variance(grads)
    torch.testing.assert_close(average, formula, rtol=0.06, atol=0.0)


def test_problems_within_k_are_exact() -> None:
    grads = gradients(3, 3000)
    records, estimates, deviation = bench.estimator_check(problem(grads), 4096, 8, SignTable(), 0)
    assert deviation == 0
    assert torch.equal(estimates[0], estimates[-1])
    assert max(abs(r.mean) + r.std for r in records) < 1e-6  # fp32 Gramian against fp64


def test_every_draw_is_the_hooks_sketch_of_its_step() -> None:
    """Each draw has its own window of the sign table (and its own row signs): the draws are
    ``reference.sketch_gramian`` of their steps, not of a fixed prefix."""
    grads = gradients(3, 2000)
    steps = range(5, 9)
    estimates = bench.sketched_gramians(problem(grads), 256, steps, SignTable())
    for estimate, step in zip(estimates, steps, strict=True):
        expected = bench.reference.sketch_gramian(grads, 256, step=step, bucket=3)
        torch.testing.assert_close(estimate, expected, rtol=1e-5, atol=1e-4)
    seeds = [bench.problem_seed(step, 3, 0) for step in steps]
    assert len({sign_offset(seed) for seed in seeds}) == len(seeds)


def test_sketched_errors_are_unbiased_with_the_stated_variance() -> None:
    grads = gradients(3, 6000, period=251)  # p = 251 for k = 256
    draws = 600
    records, _, deviation = bench.estimator_check(problem(grads), 256, draws, SignTable(), 1e9)
    assert deviation < 1e-5  # the draws are reference.sketch_gramian's
    assert len(records) == 6 and all(r.rows == 24 and r.fixed for r in records)
    for r in records:
        # σ and ρ are drawn afresh every step: the formula is the draws' variance. One entry's
        # sample std is within ~4 % (one s.e., heavy columns: more than √(1/2·600)) of it.
        assert 0.03 < r.std_error < 0.06, r
        assert 0.85 < r.std / r.formula < 1.15, r
        assert abs(r.formula_z) < 3, r
        assert abs(r.mean) < 4.5 * r.std / draws**0.5, r
        # 24 rows: the previous map's (fixed σ) variance is within ~2/24 of the σ-average.
        assert 0.6 < r.fixed / r.formula < 1.6, r
    # The 8 heavy columns put the variance far above the even-spread bound: √(p Σ_j A_j²)/‖a‖²
    # ≈ √(251·8·100²)/(8·100 + 243) ≈ 4.3 on the diagonal.
    assert min(r.formula / r.bound for r in records if r.diagonal) > 3


def test_the_draws_average_over_an_unlucky_prefix() -> None:
    """A fold of two rows whose energy sits in four columns, chosen where the table's prefix
    gives the two rows' elements the same sign product: with that σ fixed (the previous map)
    the four cross terms always add up, a std twice the formula's; drawn per step, it is the
    formula's."""
    width = fold_width(256)
    prefix = SignTable().take(2 * width, torch.device("cpu"), torch.float32)
    same = (prefix[:width] * prefix[width:] > 0).nonzero().flatten()[:4]
    grads = 0.01 * torch.randn(2, 2 * width, generator=torch.Generator().manual_seed(4))
    grads[:, same] += 1.0
    grads[:, same + width] += torch.tensor([[1.0], [0.5]])  # cross terms all of one sign
    draws = 1000
    records, _, deviation = bench.estimator_check(problem(grads), 256, draws, SignTable(), 1e9)
    assert deviation < 1e-5
    for r in records:
        assert r.rows == 2 and r.effective_rows < 2.1, r
        assert r.fixed / r.formula > 1.7, r  # the previous map: twice the formula
        assert 0.9 < r.std / r.formula < 1.1, r
        assert abs(r.formula_z) < 3, r


def test_direction_check_is_exact_on_the_exact_gramian() -> None:
    grads = gradients(4, 2000)
    exact = (grads @ grads.T)[None].expand(3, -1, -1)
    names = bench.weighting_names()
    stats = {name: bench.DirectionStats() for name in names}
    bench.direction_check(problem(grads), exact, stats)
    for name in names:
        assert min(stats[name].cosine) > 1 - 1e-6, name
        assert max(stats[name].error) < 1e-3, name
        assert stats[name].flips == 0, name


@pytest.mark.slow  # 10–25 s: trains the tiny GPT, then the whole pipeline
def test_quick_run(tmp_path: Path) -> None:
    corpus = bench.ft.cache_dir() / "corpora" / bench.ft.GNOME
    if not bench.ft.corpus_languages(corpus):
        pytest.skip(f"no gnome corpus at {corpus}: python scripts/fetch_corpora.py")
    command = [sys.executable, str(BENCHMARK), "--quick", f"--out={tmp_path}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if done.returncode:
        pytest.fail(f"{' '.join(command)} failed:\n{done.stderr[-5000:]}")
    result = json.loads((tmp_path / "sketch_accuracy_quick.json").read_text())
    assert "| tiny | mgda |" in (tmp_path / "sketch_accuracy_quick.md").read_text()
    assert result["reference_deviation"] < 1e-5
    estimator = result["estimator"]
    # Buckets of at most k elements are exact: only the fp32 Gramian's rounding against fp64.
    assert all(row["exact_max_abs_error"] < 1e-5 for row in estimator)
    for row in estimator:
        if row["sketched"]:  # 64 draws: one entry's std within ±9 % (one s.e.) of the formula
            low, median, high = row["emp_over_formula"]
            assert low > 0.6 and high < 1.6 and 0.85 < median < 1.15, row
            assert row["formula_z_rms"] < 2, row
    mgda = {r["k"]: r["error"][0] for r in result["direction"] if r["weighting"] == "mgda"}
    assert mgda[256] > mgda[1024] > mgda[4096]  # more columns, less error
