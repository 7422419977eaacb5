"""Tests for the vendored UDHR sample (``bucketmoo_hooks.data``); no network."""

from __future__ import annotations

import json
import math
import re

import pytest

from bucketmoo_hooks.data import UDHR_DIR, load_udhr, udhr_languages, udhr_split

MANIFEST = json.loads((UDHR_DIR / "manifest.json").read_text(encoding="utf-8"))
LANGUAGES = sorted(MANIFEST["languages"])
MAX_TOTAL_BYTES = 300 * 1024


def test_manifest_describes_source_and_languages() -> None:
    source = MANIFEST["source"]
    assert (source["package"], source["version"]) == ("udhr", "6.0.0")
    assert re.fullmatch(r"[0-9a-f]{64}", source["sha256"])
    assert MANIFEST["license"]["spdx"] == "MIT"
    assert len(LANGUAGES) >= 12
    for code, info in MANIFEST["languages"].items():
        assert info["file"] == f"{code}.txt"
        assert info["name"]
        assert info["bcp47"]
        assert info["script"]
        assert info["lines"] == MANIFEST["num_lines"]
        assert info["bytes"] == (UDHR_DIR / info["file"]).stat().st_size
    assert len(MANIFEST["line_articles"]) == MANIFEST["num_lines"]
    assert set(MANIFEST["line_articles"]) == set(range(31))


def test_several_scripts_are_covered() -> None:
    scripts = {info["script"] for info in MANIFEST["languages"].values()}
    assert {"Latn", "Cyrl", "Grek", "Arab", "Deva", "Jpan", "Hans", "Kore"} <= scripts


def test_udhr_languages_is_sorted_manifest_codes() -> None:
    assert udhr_languages() == LANGUAGES
    assert "eng" in LANGUAGES


@pytest.mark.parametrize("code", LANGUAGES)
def test_every_language_loads_with_clean_lines(code: str) -> None:
    lines = load_udhr([code])[code]
    assert len(lines) == MANIFEST["languages"][code]["lines"]
    for line in lines:
        assert line, "empty line"
        assert line == " ".join(line.split()), "whitespace not normalised"
        assert not re.search(r"</?[a-z]+[ >]|&(#\d+|#x[0-9a-f]+|[a-z]+);", line, re.IGNORECASE)


def test_all_languages_are_aligned() -> None:
    texts = load_udhr()
    assert list(texts) == LANGUAGES
    counts = {code: len(lines) for code, lines in texts.items()}
    assert len(set(counts.values())) == 1, counts
    # Aligned passages have comparable lengths relative to English: no line is
    # wildly longer or shorter than the language's typical ratio.
    english = texts["eng"]
    for code, lines in texts.items():
        ratios = sorted(len(a) / len(b) for a, b in zip(lines, english, strict=True))
        median = ratios[len(ratios) // 2]
        assert ratios[0] > 0.4 * median, code
        assert ratios[-1] < 2.5 * median, code


def test_first_article_is_where_expected() -> None:
    texts = load_udhr(["eng", "deu_1996"])
    first = MANIFEST["line_articles"].index(1)
    assert texts["eng"][first].startswith("All human beings are born free")
    assert texts["deu_1996"][first].startswith("Alle Menschen sind frei")


def test_total_size_is_small() -> None:
    total = sum(path.stat().st_size for path in UDHR_DIR.glob("*.txt"))
    assert total <= MAX_TOTAL_BYTES
    assert sorted(path.stem for path in UDHR_DIR.glob("*.txt")) == LANGUAGES


def test_license_file_is_present() -> None:
    text = (UDHR_DIR / "LICENSE").read_text(encoding="utf-8")
    assert "MIT License" in text
    assert "Titus Wormer" in text
    assert "Permission is hereby granted" in text


def test_load_order_and_duplicates() -> None:
    texts = load_udhr(["rus", "eng", "rus"])
    assert list(texts) == ["rus", "eng"]
    assert load_udhr("eng") == {"eng": texts["eng"]}


def test_unknown_code_raises_clear_value_error() -> None:
    with pytest.raises(ValueError, match="unknown UDHR language") as info:
        load_udhr(["eng", "klingon"])
    message = str(info.value)
    assert "'klingon'" in message
    assert "eng" in message
    assert "deu_1996" in message


@pytest.mark.parametrize("fraction", [0.2, 0.1, 0.5, 0.9])
def test_split_is_deterministic_disjoint_and_aligned(fraction: float) -> None:
    texts = load_udhr()
    n = MANIFEST["num_lines"]
    n_valid = math.ceil(round(fraction * n, 9))
    for lines in texts.values():
        train, valid = udhr_split(lines, fraction)
        assert (train, valid) == udhr_split(list(lines), fraction)
        assert len(valid) == n_valid
        assert len(train) == n - n_valid
        assert train + valid == lines
        assert valid == lines[n - n_valid :]
    # The same line indices end up in validation for every language.
    splits = {code: udhr_split(lines, fraction) for code, lines in texts.items()}
    assert len({(len(t), len(v)) for t, v in splits.values()}) == 1


def test_split_default_and_rounding() -> None:
    items = [str(i) for i in range(30)]
    assert udhr_split(items, 0.1) == (items[:27], items[27:])
    train, valid = udhr_split(items)
    assert valid == items[-6:]
    assert train == items[:-6]
    assert udhr_split(items[:7], 0.2) == (items[:5], items[5:7])
    assert udhr_split([], 0.2) == ([], [])
    # Does not modify or alias its input.
    train.append("x")
    assert len(items) == 30


@pytest.mark.parametrize("fraction", [0, 0.0, 1, 1.0, -0.1, 1.5, float("nan")])
def test_bad_fraction_raises(fraction: float) -> None:
    with pytest.raises(ValueError, match="valid_fraction"):
        udhr_split(["a", "b"], fraction)


@pytest.mark.parametrize("fraction", ["0.2", None, True])
def test_non_number_fraction_raises(fraction: object) -> None:
    with pytest.raises(TypeError, match="valid_fraction"):
        udhr_split(["a", "b"], fraction)  # type: ignore[arg-type]
