"""The sketch protocol's random map Φ (``bucketmoo_hooks._sketch``): exact below ``k``, unbiased
with the stated variance above it, reproducible, and robust to the structure of gradients."""

import math

import pytest
import torch

from bucketmoo_hooks import reference
from bucketmoo_hooks._sketch import SignTable, fold_width, problem_seed, sketch


def test_fold_width_is_the_largest_prime_not_above_k() -> None:
    assert [fold_width(k) for k in (16, 17, 256, 1024, 4096, 16384)] == [
        13,
        17,
        251,
        1021,
        4093,
        16381,
    ]


def test_problems_of_at_most_k_elements_are_not_sketched() -> None:
    vector = torch.randn(100, dtype=torch.bfloat16)
    result = sketch(vector, 100, problem_seed(0, 0, 0), SignTable())
    assert result.dtype == torch.float32
    assert torch.equal(result, vector.float())
    objective_grads = torch.randn(3, 100)
    exact = reference.combine(objective_grads, "mgda").gramian
    assert torch.equal(reference.sketch_gramian(objective_grads, 100), exact)
    grads = torch.randn(4, 100)
    assert torch.equal(
        reference.bucket_update(grads, (0, 1, 2, 2), sketch_size=128),
        reference.bucket_update(grads, (0, 1, 2, 2)),
    )


def test_the_map_is_reproducible_and_fresh_per_step_and_problem() -> None:
    vector = torch.randn(5000)
    signs = SignTable()
    first = sketch(vector, 256, problem_seed(3, 1, 0), signs)
    assert torch.equal(first, sketch(vector, 256, problem_seed(3, 1, 0), SignTable()))
    for step, bucket, problem in ((4, 1, 0), (3, 2, 0), (3, 1, 1)):
        assert not torch.equal(
            first, sketch(vector, 256, problem_seed(step, bucket, problem), signs)
        )
    # bf16 gradients are sketched in fp32, as their fp32 values.
    half = vector.bfloat16()
    assert torch.equal(
        sketch(half, 256, problem_seed(0, 0, 0), signs),
        sketch(half.float(), 256, problem_seed(0, 0, 0), signs),
    )


def test_sign_table_prefixes_do_not_depend_on_its_length() -> None:
    short = SignTable().take(1000, torch.device("cpu"), torch.float32).clone()
    table = SignTable()
    long = table.take((1 << 20) + 7, torch.device("cpu"), torch.float32)
    assert torch.equal(long[:1000], short)
    assert set(long.unique().tolist()) == {-1.0, 1.0}
    assert abs(long.mean().item()) < 0.01


def column_formula(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    """The docstring's variance, in expectation over σ:
    ``Σ_j (A_j B_j + C_j² − 2 Σ_{i∈j} a_i² b_i²)`` over the columns ``j = i mod p``."""
    width = fold_width(k)
    column = torch.arange(a.numel()) % width
    energy_a = torch.zeros(width, dtype=a.dtype).index_add_(0, column, a * a)
    energy_b = torch.zeros(width, dtype=a.dtype).index_add_(0, column, b * b)
    inner = torch.zeros(width, dtype=a.dtype).index_add_(0, column, a * b)
    return float((energy_a * energy_b + inner**2).sum() - 2 * (a * a * b * b).sum())


def draws(a: torch.Tensor, b: torch.Tensor, k: int, count: int) -> torch.Tensor:
    """``⟨Φa, Φb⟩ − ⟨a, b⟩`` for ``count`` fresh maps (steps)."""
    signs = SignTable()
    errors = []
    for step in range(count):
        seed = problem_seed(step, 0, 0)
        errors.append(float(sketch(a, k, seed, signs) @ sketch(b, k, seed, signs) - a @ b))
    return torch.tensor(errors, dtype=torch.float64)


@pytest.mark.parametrize(
    "structure", ["random", "constant", "outlier_column", "contiguous_spike", "low_rank"]
)
def test_unbiased_with_the_stated_variance_on_structured_gradients(structure: str) -> None:
    """Over the per-step draws of the map, the estimate of ``⟨a, b⟩`` is unbiased with the
    docstring's column-energy variance, which for every structure that gradients have stays
    within the even-spread bound ``(‖a‖²‖b‖² + ⟨a, b⟩²)/p``."""
    generator = torch.Generator().manual_seed(7)
    k, rows, columns = 256, 40, 512  # a [40, 512] weight gradient: row length a power of two
    noise = torch.randn(rows * columns, generator=generator, dtype=torch.float64)
    if structure == "random":
        a = noise
    elif structure == "constant":  # a mean component (biases, a shared shift)
        a = torch.ones(rows * columns, dtype=torch.float64) + 0.1 * noise
    elif structure == "outlier_column":  # one hidden dimension carries most of the energy
        a = 0.1 * noise.view(rows, columns)
        a[:, 37] += 10 * torch.randn(rows, generator=generator, dtype=torch.float64)
        a = a.flatten()
    elif structure == "contiguous_spike":  # a LayerNorm or embedding row that dominates
        a = 0.01 * noise
        a[1000:1200] += torch.randn(200, generator=generator, dtype=torch.float64)
    else:  # rank 1: u vᵀ
        u = torch.randn(rows, 1, generator=generator, dtype=torch.float64)
        v = torch.randn(1, columns, generator=generator, dtype=torch.float64)
        a = (u @ v).flatten()
    b = 0.6 * a + torch.randn(a.shape, generator=generator, dtype=torch.float64) * a.std()
    errors = draws(a, b, k, 1500)
    variance = column_formula(a, b, k)
    standard_error = math.sqrt(variance / len(errors))
    assert abs(float(errors.mean())) < 4 * standard_error
    assert 0.8 < float(errors.var()) / variance < 1.25, float(errors.var()) / variance
    bound = (float(a @ a) * float(b @ b) + float(a @ b) ** 2) / fold_width(k)
    assert variance < 1.05 * bound, (structure, variance / bound)


def test_the_element_signs_change_from_step_to_step() -> None:
    """With fixed element signs a fold of two rows would take two values (``ρ₀ρ₁ = ±1``) at every
    step: the same unlucky sign products again and again. Drawn per step, they do not repeat."""
    vector = torch.randn(2 * fold_width(256), generator=torch.Generator().manual_seed(3))
    signs = SignTable()
    norms = {
        round(float(sketch(vector, 256, problem_seed(step, 0, 0), signs).square().sum()), 4)
        for step in range(40)
    }
    assert len(norms) > 30


def test_relative_error_shrinks_as_one_over_root_k() -> None:
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(60_000, generator=generator, dtype=torch.float64)
    spreads = {}
    for k in (256, 1024, 4096):
        errors = draws(a, a, k, 300) / float(a @ a)
        spreads[k] = float(errors.std())
        assert spreads[k] < 1.3 * math.sqrt(2 / fold_width(k))
    assert spreads[4096] < spreads[256] / 2.5
