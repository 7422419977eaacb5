"""Download the pinned Debian ``gnome-user-docs`` package and build the paragraph corpus.

    python scripts/fetch_corpora.py                  # -> ~/.cache/bucketmoo_hooks/corpora/...
    python scripts/fetch_corpora.py --languages en,de,ru,ko

Runs ``apt-get download gnome-user-docs=43.0-2`` (Debian bookworm; needs ``apt-get update``
once, no install, no yelp/GTK), unpacks it with ``dpkg-deb -x`` in a temporary directory and
writes ``<cache>/corpora/gnome-user-docs-43.0-2/<language>.json`` (train/valid/test paragraphs,
see :mod:`bucketmoo_hooks.data.corpora`), the package's ``copyright`` file and ``source.json``
(package, version, licence, per-language sizes). Licence of the text: CC-BY-SA-3.0 (GNOME
Documentation Project); derived files keep that licence.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

from bucketmoo_hooks.data.corpora import SPLITS, build_gnome_corpus, cache_dir

PACKAGE, VERSION = "gnome-user-docs", "43.0-2"
LICENCE = "CC-BY-SA-3.0 (GNOME Documentation Project; see copyright)"
# Latin (en de fr es pl cs pt_BR), Cyrillic (ru uk sr), Hangul (ko), Greek (el, 61 % translated).
LANGUAGES = "en,de,fr,es,pl,cs,pt_BR,ru,uk,sr,ko,el"


def corpus_dir(cache: Path) -> Path:
    return cache / "corpora" / f"{PACKAGE}-{VERSION}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--languages", default=LANGUAGES, help="help directory names, en = C")
    parser.add_argument("--cache", type=Path, default=cache_dir(), help="cache root")
    args = parser.parse_args()
    languages = [code for code in args.languages.split(",") if code]
    out = corpus_dir(args.cache)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        subprocess.run(["apt-get", "download", f"{PACKAGE}={VERSION}"], cwd=work, check=True)
        (deb,) = work.glob(f"{PACKAGE}_*.deb")
        subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "root")], check=True)
        root = work / "root" / "usr" / "share"
        corpus = build_gnome_corpus(root / "help", languages)
        shutil.copy(root / "doc" / PACKAGE / "copyright", out / "copyright")
    sizes = {}
    for code, splits in corpus.items():
        with (out / f"{code}.json").open("w", encoding="utf-8") as handle:
            json.dump(splits, handle, ensure_ascii=False, indent=0)
        sizes[code] = {
            split: {
                "paragraphs": len(splits[split]),
                "bytes": len("\n".join(splits[split]).encode()),
            }
            for split in SPLITS
        }
        print(
            f"{code:6} "
            + "  ".join(f"{s} {sizes[code][s]['paragraphs']:5d} par" for s in SPLITS)
            + f"  train {sizes[code]['train']['bytes'] / 1e3:6.1f} kB"
        )
    source = {"package": PACKAGE, "version": VERSION, "licence": LICENCE, "sizes": sizes}
    (out / "source.json").write_text(json.dumps(source, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
