"""Weightings from elsewhere: plain callables and torchjd's Gramian weightings."""

import pytest
import torch

from bucketmoo_hooks import reference
from bucketmoo_hooks.weightings import CallableWeighting, get_weighting


class Opaque:
    """A callable object with the default repr (which holds a memory address)."""

    def __call__(self, gramian: torch.Tensor) -> torch.Tensor:
        return torch.full((gramian.shape[0],), 1.0 / gramian.shape[0])


class Described(Opaque):
    def __init__(self, temperature: float) -> None:
        self.temperature = temperature

    def __repr__(self) -> str:
        return f"Described(temperature={self.temperature})"


def test_labels_are_the_same_in_every_process() -> None:
    def my_weighting(gramian: torch.Tensor) -> torch.Tensor:
        return gramian.diagonal()

    assert CallableWeighting(my_weighting).label.endswith("my_weighting")
    assert CallableWeighting(Opaque()).label == "Opaque"  # not "<Opaque object at 0x...>"
    assert CallableWeighting(Described(0.5)).label == "Described(temperature=0.5)"
    assert CallableWeighting(Described(0.5)).label != CallableWeighting(Described(2.0)).label


@pytest.mark.parametrize("name", ["UPGradWeighting", "MGDAWeighting", "DualProjWeighting"])
def test_torchjd_weightings_plug_in(name: str) -> None:
    aggregation = pytest.importorskip("torchjd.aggregation")
    torchjd_weighting = getattr(aggregation, name)()
    grads = torch.randn(4, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    gramian = (grads @ grads.T).float()
    weighting = get_weighting(torchjd_weighting)
    assert isinstance(weighting, CallableWeighting)
    assert weighting.label == repr(torchjd_weighting)
    weights = weighting(gramian)
    assert weights.dtype == torch.float32
    torch.testing.assert_close(weights, torchjd_weighting(gramian).float())
    update = reference.combine(grads, torchjd_weighting).update  # fp64 Gramian for fp64 grads
    torch.testing.assert_close(update, weighting(grads @ grads.T) @ grads)
