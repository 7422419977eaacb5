"""Real multilingual corpora built from Debian packages into a cache outside git.

``scripts/fetch_corpora.py`` downloads the pinned ``gnome-user-docs`` package and calls
:func:`build_gnome_corpus`; training code reads the result with :func:`load_corpus`. Nothing here
touches the network.

The GNOME user help is written in Mallard XML: one ``.page`` file per topic, the English source
in ``help/C/`` and one translated copy per language. Paragraphs (``<p>``) are extracted as plain
text; a translated paragraph equal to any English paragraph is an untranslated leftover and is
dropped, as are repeats within a language. Pages, not paragraphs, go to the splits, by a hash of
the page name, so every language has the same pages in the same split (held-out pages are
held out in every language: no translation of a test paragraph is ever trained on).
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = [
    "SPLITS",
    "build_gnome_corpus",
    "cache_dir",
    "corpus_languages",
    "load_corpus",
    "mallard_paragraphs",
    "page_split",
]

SPLITS = ("train", "valid", "test")
_INFO = re.compile(r"<info>.*?</info>", re.S)
_PARAGRAPH = re.compile(r"<p(?:\s[^>]*)?>(.*?)</p>", re.S)
_TAG = re.compile(r"<[^>]+>")
_SPACE = re.compile(r"\s+")


def cache_dir() -> Path:
    """Root of the downloaded data and converted models: ``$BUCKETMOO_CACHE``, else
    ``$XDG_CACHE_HOME/bucketmoo_hooks``, else ``~/.cache/bucketmoo_hooks``."""
    if os.environ.get("BUCKETMOO_CACHE"):
        return Path(os.environ["BUCKETMOO_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bucketmoo_hooks"


def mallard_paragraphs(page: str) -> list[str]:
    """Plain-text paragraphs of one Mallard page, in document order.

    The ``<info>`` block (credits, link titles) is skipped; inline markup (``<gui>``, ``<link>``,
    ``<key>``) keeps its text; entities are decoded and whitespace is collapsed. Empty
    paragraphs are dropped.
    """
    body = _INFO.sub("", page)
    paragraphs = []
    for inner in _PARAGRAPH.findall(body):
        text = _SPACE.sub(" ", html.unescape(_TAG.sub("", inner))).strip()
        if text:
            paragraphs.append(text)
    return paragraphs


def page_split(page_name: str, valid_percent: int = 10, test_percent: int = 10) -> str:
    """The split of a page: a stable hash of its name, the same for every language."""
    bucket = int.from_bytes(hashlib.sha256(page_name.encode()).digest()[:4], "big") % 100
    if bucket < test_percent:
        return "test"
    return "valid" if bucket < test_percent + valid_percent else "train"


def build_gnome_corpus(
    help_root: Path, languages: Iterable[str], document: str = "gnome-help"
) -> dict[str, dict[str, list[str]]]:
    """Paragraphs per language and split from an unpacked ``usr/share/help`` directory.

    Args:
        help_root: The ``usr/share/help`` directory of the unpacked package.
        languages: Directory names (``de``, ``pt_BR``, ``ru``…); ``en`` means the English source
            ``C`` and is never filtered.
        document: The help document, a directory under each language.

    Returns:
        ``{language: {"train": [...], "valid": [...], "test": [...]}}``.
    """
    english_pages = _read_pages(help_root / "C" / document)
    english = {p for paragraphs in english_pages.values() for p in paragraphs}
    corpus = {}
    for language in languages:
        pages = english_pages if language == "en" else _read_pages(help_root / language / document)
        seen: set[str] = set() if language == "en" else set(english)
        splits: dict[str, list[str]] = {split: [] for split in SPLITS}
        for name in sorted(pages):
            split = splits[page_split(name)]
            for paragraph in pages[name]:
                if paragraph not in seen:
                    seen.add(paragraph)
                    split.append(paragraph)
        corpus[language] = splits
    return corpus


def _read_pages(directory: Path) -> dict[str, list[str]]:
    if not directory.is_dir():
        raise FileNotFoundError(f"no help pages at {directory}")
    return {
        path.name: mallard_paragraphs(path.read_text(encoding="utf-8"))
        for path in sorted(directory.glob("*.page"))
    }


def corpus_languages(root: Path) -> list[str]:
    """Languages of a corpus directory written by ``scripts/fetch_corpora.py``, sorted."""
    return sorted(p.stem for p in root.glob("*.json") if p.name != "source.json")


def load_corpus(root: Path, languages: Sequence[str]) -> dict[str, dict[str, list[str]]]:
    """Read ``root/<language>.json`` (``{"train": [...], "valid": [...], "test": [...]}``).

    Raises:
        FileNotFoundError: ``root`` has no such corpus or language; the message says how to make
            it.
    """
    missing = [code for code in languages if not (root / f"{code}.json").is_file()]
    if missing:
        raise FileNotFoundError(
            f"corpus {root} lacks {missing} (has: {', '.join(corpus_languages(root)) or '-'}); "
            "run `python scripts/fetch_corpora.py` first"
        )
    corpus = {}
    for code in languages:
        with (root / f"{code}.json").open(encoding="utf-8") as handle:
            splits = json.load(handle)
        corpus[code] = {split: list(splits[split]) for split in SPLITS}
    return corpus
