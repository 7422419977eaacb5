"""Language separability: a linear probe and the between-language variance ratio."""

import pytest
import torch

from bucketmoo_hooks.probe import language_separability


def test_separated_languages_score_high_and_mixed_ones_at_chance() -> None:
    generator = torch.Generator().manual_seed(0)
    noise = [torch.randn(40, 8, generator=generator) for _ in range(3)]
    apart = {f"l{i}": n * 0.1 + 5 * torch.eye(8)[i] for i, n in enumerate(noise)}
    result = language_separability(apart)
    assert result["probe_accuracy"] == 1.0 and result["variance_ratio"] > 0.95
    mixed = language_separability({f"l{i}": n for i, n in enumerate(noise)})
    assert mixed["probe_accuracy"] < 0.6 and mixed["variance_ratio"] < 0.1


def test_separability_needs_two_languages_with_rows() -> None:
    with pytest.raises(ValueError, match="2 languages"):
        language_separability({"en": torch.zeros(4, 2)})
    with pytest.raises(ValueError, match="2 languages"):
        language_separability({"en": torch.zeros(4, 2), "de": torch.zeros(1, 2)})
