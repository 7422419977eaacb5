"""What the hook runs inside backward reads no device value on the host, checked on the CPU.

On a GPU every such read is a host–device synchronisation (``.item()``, ``bool(tensor)``,
indexing with a 0-d tensor, ``torch.equal``, ``nonzero``, boolean masks). The solvers take
shortcuts on the CPU, where reading is free, so the accelerator's path is forced
(:func:`bucketmoo_hooks._device_path.force_device_path`) and every op is inspected by a
``TorchDispatchMode`` that refuses the ones that read values on the host. test_gpu.py repeats
the check on a device with CUDA's sync debug mode.
"""

import pytest
import torch
from _kernel_checks import LocalComm, bucket, contexts_for, solve_shards
from torch.utils._python_dispatch import TorchDispatchMode

from bucketmoo_hooks import Diagnostics, weighting_names
from bucketmoo_hooks._device_path import cpu_path, force_device_path
from bucketmoo_hooks.weightings import WeightingContext, get_weighting

aten = torch.ops.aten

# Ops whose result is a host value read from the device, or whose output shape depends on values.
HOST_READS = {
    aten._local_scalar_dense,  # .item(), float(t), int(t), t[0-d index]
    aten.item,
    aten.is_nonzero,  # bool(t), `if t:`
    aten.equal,
    aten.nonzero,
    aten.masked_select,
    aten.unique_consecutive,
    aten._unique2,
}
# Indexing with a boolean mask reads the mask (it becomes nonzero() inside the kernel).
INDEXING = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}


class NoHostReads(TorchDispatchMode):
    """Raises on any op that would synchronise a GPU with the host."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func.overloadpacket
        if packet in HOST_READS:
            raise AssertionError(f"{func} reads a device value on the host")
        if packet in INDEXING and any(
            isinstance(index, torch.Tensor) and index.dtype == torch.bool
            for index in (args[1] if len(args) > 1 and isinstance(args[1], list | tuple) else ())
        ):
            raise AssertionError(f"{func} with a boolean mask reads it on the host")
        return func(*args, **(kwargs or {}))


def test_the_mode_catches_what_it_should() -> None:
    values, index = torch.arange(5.0), torch.tensor(2)
    for read in (
        lambda: values[index],
        lambda: values.sum().item(),
        lambda: bool(values.sum() > 0),
        lambda: torch.equal(values, values),
        lambda: values[values > 1],
        lambda: values.nonzero(),
    ):
        with pytest.raises(AssertionError, match="host"), NoHostReads():
            read()
    with NoHostReads():
        values.gather(0, index.reshape(1))
        values[torch.tensor([0, 2])]
        torch.where(values > 1, values, 0.0)


def test_forcing_the_device_path() -> None:
    cpu = torch.device("cpu")
    assert cpu_path(cpu)
    with force_device_path():
        assert not cpu_path(cpu)
        with force_device_path():
            assert not cpu_path(cpu)
        assert not cpu_path(cpu)
    assert cpu_path(cpu)


def gramians(num: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """Random PSD Gramians of ``num`` gradients and degenerate ones."""
    generator = torch.Generator().manual_seed(num)
    grads = torch.randn(num, 40, generator=generator, dtype=torch.float64)
    zero_row = grads.clone()
    zero_row[num // 2] = 0
    duplicated = grads.clone()
    duplicated[num - 1] = duplicated[0]
    collinear = torch.linspace(-2, 3, num, dtype=torch.float64)[:, None] * grads[:1]
    cases = [grads, zero_row, duplicated, collinear, torch.zeros_like(grads)]
    return [(g @ g.T).to(dtype) for g in cases]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("name", weighting_names())
def test_weightings_read_nothing_on_the_host(name: str, num: int, dtype: torch.dtype) -> None:
    """Every weighting over a few steps, with the hook's contexts (so stateful ones warm-start
    from their tables, which grow when an objective joins), on the accelerator's path; it
    computes what the CPU path computes (the CPU's early stops are exact)."""
    forced, plain = get_weighting(name), get_weighting(name)
    for step, gramian in enumerate(gramians(num, dtype) * 2):
        objectives = tuple(range(10 + step % 3, 10 + step % 3 + num))  # per-step sampling
        context = WeightingContext(
            step, bucket=1, objectives=objectives, segment=step % 2, problem=(3, 4)
        )
        with force_device_path(), NoHostReads():
            weights = forced(gramian, context)
        assert weights.shape == (num,) and weights.dtype == dtype
        assert torch.isfinite(weights).all()
        torch.testing.assert_close(weights, plain(gramian, context), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", weighting_names())
def test_batched_solves_read_nothing_on_the_host(name: str) -> None:
    """A bucket's segments solved as one batch (``granularity="parameter"``), stateful ones
    through their one gather and scatter of state, twice (the second warm-started)."""
    batch = torch.stack(gramians(4, torch.float32))
    contexts = [WeightingContext(7, 1, (5, 6, 7, 8), s, (s,)) for s in range(len(batch))]
    forced, plain = get_weighting(name), get_weighting(name)
    for _ in range(2):
        with force_device_path(), NoHostReads():
            weights = forced.solve(batch, contexts)
        assert weights.shape == (len(batch), 4) and torch.isfinite(weights).all()
        torch.testing.assert_close(weights, plain.solve(batch, contexts), rtol=1e-9, atol=1e-9)


def test_diagnostics_record_path_reads_nothing_on_the_host() -> None:
    """``record`` per bucket and ``end_step`` per step, as the hook calls them; only every
    ``log_every``-th step pulls to the host."""
    diagnostics = Diagnostics(log_every=3)
    for step in range(3):
        with force_device_path(), NoHostReads():
            for bucket_index, segments in enumerate([1, 4]):
                gramian = torch.stack(gramians(3, torch.float32)[:segments])
                weights = torch.full((segments, 3), 1 / 3)
                objectives = (0, 1, 2)
                diagnostics.record(step, bucket_index, objectives, gramian, weights, segments > 1)
            if step < 2:
                diagnostics.end_step(step)
    diagnostics.end_step(2)  # pulls
    assert len(diagnostics.records) == 3 * (1 + 4 + 1)


@pytest.mark.parametrize("name", ["mgda", "nash_mtl", "upgrad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ids", [[0, 1, 2, 3], [0, 1, 0, 2, 1]])
def test_protocol_torch_path_reads_nothing_on_the_host(
    ids: list[int], dtype: torch.dtype, name: str
) -> None:
    """Steps 2–6 on the torch path (identity and uneven averaging, segments)."""
    shards, averaging, objective_map = bucket(ids, 3000, dtype)
    segments = [(0, 1000), (1000, 1000), (1200, 3000)]
    contexts = contexts_for(objective_map, segments)
    weighting = get_weighting(name)
    with force_device_path(), NoHostReads():
        result = solve_shards(
            LocalComm(), shards, averaging, weighting, contexts, segments, "torch"
        )
    expected = solve_shards(LocalComm(), shards, averaging, weighting, contexts, segments, "torch")
    torch.testing.assert_close(result.gramians, expected.gramians, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(result.update, expected.update, rtol=1e-5, atol=1e-5)
