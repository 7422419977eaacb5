"""The gnome-user-docs corpus builder on a small Mallard tree made here (no download)."""

import json
from pathlib import Path

import pytest

from bucketmoo_hooks.data.corpora import (
    SPLITS,
    build_gnome_corpus,
    cache_dir,
    corpus_languages,
    load_corpus,
    mallard_paragraphs,
    page_split,
)

PAGE = """<?xml version="1.0" encoding="utf-8"?>
<page xmlns="http://projectmallard.org/1.0/" id="{name}">
  <info>
    <desc><p>Credits are not text.</p></desc>
  </info>
  <title>Title</title>
  {paragraphs}
</page>
"""


def write_page(root: Path, language: str, name: str, paragraphs: list[str]) -> None:
    directory = root / language / "gnome-help"
    directory.mkdir(parents=True, exist_ok=True)
    body = "\n".join(f'<p xml:lang="{language}">{p}</p>' for p in paragraphs)
    (directory / f"{name}.page").write_text(PAGE.format(name=name, paragraphs=body))


def test_paragraphs_keep_inline_text_and_skip_the_info_block() -> None:
    page = PAGE.format(
        name="x",
        paragraphs='<p>Press <key>Ctrl</key>+<gui style="menu">Files</gui> &amp;\n   go.</p>'
        "<p> </p><p>Второй <link xref='a'>абзац</link>.</p>",
    )
    assert mallard_paragraphs(page) == ["Press Ctrl+Files & go.", "Второй абзац."]


def test_corpus_drops_untranslated_paragraphs_and_splits_pages_alike(tmp_path: Path) -> None:
    names = [f"page{i}" for i in range(40)]
    for name in names:
        write_page(tmp_path, "C", name, [f"English {name} one.", f"English {name} two."])
        # The second paragraph is an untranslated leftover (equal to English); page0 repeats.
        write_page(tmp_path, "de", name, [f"Deutsch {name} eins.", f"English {name} two."])
    write_page(tmp_path, "de", "page0", ["Deutsch page0 eins.", "Deutsch page0 eins."])
    corpus = build_gnome_corpus(tmp_path, ["en", "de"])
    for language, word in (("en", "English"), ("de", "Deutsch")):
        assert set(corpus[language]) == set(SPLITS)
        everything = [p for split in SPLITS for p in corpus[language][split]]
        assert all(p.startswith(word) for p in everything)
        assert len(everything) == len(set(everything)) == (80 if language == "en" else 40)
    # Same pages in the same split in every language: a test page is held out everywhere.
    for split in SPLITS:
        en_pages = {p.split()[1] for p in corpus["en"][split]}
        de_pages = {p.split()[1] for p in corpus["de"][split]}
        assert en_pages == de_pages == {n for n in names if page_split(n + ".page") == split}
    assert corpus["en"]["test"] and corpus["en"]["valid"]

    out = tmp_path / "corpus"
    out.mkdir()
    for language, splits in corpus.items():
        (out / f"{language}.json").write_text(json.dumps(splits))
    (out / "source.json").write_text("{}")
    assert corpus_languages(out) == ["de", "en"]
    assert load_corpus(out, ["de"]) == {"de": corpus["de"]}
    with pytest.raises(FileNotFoundError, match=r"fetch_corpora\.py"):
        load_corpus(out, ["ko"])
    with pytest.raises(FileNotFoundError, match="no help pages"):
        build_gnome_corpus(tmp_path, ["ko"])


def test_page_split_is_stable_and_near_the_requested_shares() -> None:
    splits = [page_split(f"topic-{i}.page") for i in range(2000)]
    assert splits == [page_split(f"topic-{i}.page") for i in range(2000)]
    assert 0.07 < splits.count("test") / 2000 < 0.13 and 0.07 < splits.count("valid") / 2000 < 0.13


def test_cache_dir_honours_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BUCKETMOO_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("BUCKETMOO_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "bucketmoo_hooks"
