#!/usr/bin/env python
"""Where the languages' gradients conflict, parameter tensor by parameter tensor.

    python scripts/layer_conflicts.py runs/finetune/smollm2-long/ddp-s1 \\
        runs/finetune/smollm2-long/upgrad-s1 --out benchmarks/results/finetune/smollm2-long

For the model a fine-tuning run started from (``start``) and for every run's final checkpoint
(``ckpt.pt``, from ``finetune_multilingual.py --out DIR --ckpt-every N``), computes each seen
language's gradient on the first ``--windows`` windows of its *test* split (no training; the
run's model, context and data) and, per trainable parameter tensor, the cosine of every language
pair. The per-bucket diagnostics of a run see a DDP bucket (several blocks); this sees each
tensor, so it says whether conflict is layer-wise and localised (Bucket-Level MOO's claim) or
spread evenly. Writes ``layer_conflicts.json`` and ``layer_conflicts.png`` (tensors × pairs, one
panel per state) into ``--out`` and prints a per-block summary.
"""

from __future__ import annotations

import argparse
import json
import re
import runpy
import statistics
from pathlib import Path
from typing import Any

import matplotlib
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt

SCRIPT = Path(__file__).resolve().parent / "finetune_multilingual.py"


def run_args(run: Path, demo: dict[str, Any]) -> argparse.Namespace:
    """The run's own arguments (``summary.json``), with paths restored."""
    config = json.loads((run / "summary.json").read_text())["config"]
    argv = ["--engine", "single", "--weighting", "ddp"]
    args = demo["parse_args"](argv)  # defaults for anything the summary predates
    for key, value in config.items():
        if hasattr(args, key):
            is_path = key in ("data_dir", "model_dir", "out") and value
            setattr(args, key, Path(value) if is_path else value)
    return args


def tensor_conflicts(
    model: torch.nn.Module, codec: Any, args: argparse.Namespace, demo: dict[str, Any], windows: int
) -> dict[str, list[float]]:
    """Parameter name → the pair cosines of the languages' gradients on test windows."""
    texts = demo["load_texts"](args)
    # The shared parameters: a language adapter has one language's gradient, no pair to compare.
    params = {
        n: p
        for n, p in model.named_parameters()
        if p.requires_grad and not n.startswith("adapters.")
    }
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in params}
    for code in args.languages:
        test = demo["eval_set"](texts[code]["test"], codec, args.eval_bytes)
        x, y = next(demo["windows"](test.tokens, args.context, codec.bos))
        demo["select_language"](model, code)
        model.zero_grad(set_to_none=True)
        _, loss = model(x[:windows], y[:windows])
        loss.backward()
        for name, p in params.items():
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            rows[name].append(grad.detach().reshape(-1).double())
    return {n: pair_cosines(torch.stack(r)) for n, r in rows.items()}


def pair_cosines(grads: torch.Tensor) -> list[float]:
    """Cosine of every pair ``a < b`` of the rows (0 where a row is zero)."""
    norms = grads.norm(dim=1).clamp_min(1e-300)
    cosine = (grads @ grads.T) / norms[:, None] / norms[None, :]
    n = len(grads)
    return [float(cosine[a, b]) for a in range(n) for b in range(a + 1, n)]


def block_of(name: str) -> str:
    match = re.search(r"(?:layers|blocks)\.(\d+)\.", name)
    return f"block {match.group(1)}" if match else "other"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="+", help="run directories with ckpt.pt")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--windows", type=int, default=8, help="test windows per language")
    args = parser.parse_args(argv)
    for run in args.runs:
        missing = [f for f in ("summary.json", "ckpt.pt") if not (run / f).is_file()]
        if missing:
            parser.error(
                f"{run} has no {' or '.join(missing)}: pass finished runs of "
                "finetune_multilingual.py --out DIR --ckpt-every N"
            )
    demo = runpy.run_path(str(SCRIPT), run_name="layer_conflicts")
    states: dict[str, dict[str, list[float]]] = {}
    pairs: list[str] = []
    for index, run in enumerate(args.runs):
        run_args_ = run_args(run, demo)
        torch.manual_seed(run_args_.seed)  # the run's initialisation, as training seeds it
        model, codec = demo["build_model"](run_args_)
        if index == 0:  # the pretrained (or freshly initialised) model every run started from
            states["start"] = tensor_conflicts(model, codec, run_args_, demo, args.windows)
        checkpoint = torch.load(run / "ckpt.pt", map_location="cpu", weights_only=True)
        model.load_state_dict(checkpoint["model"], strict=False)
        step = f"{run.name} @ {checkpoint['step']}"
        states[step] = tensor_conflicts(model, codec, run_args_, demo, args.windows)
        languages = run_args_.languages
        pairs = [f"{a}~{b}" for i, a in enumerate(languages) for b in languages[i + 1 :]]

    names = list(next(iter(states.values())))
    summary: dict[str, Any] = {"pairs": pairs, "states": states, "blocks": {}}
    print(f"mean / min pair cosine per block ({args.windows} test windows per language):")
    for state, cosines in states.items():
        per_block: dict[str, list[float]] = {}
        for name in names:
            per_block.setdefault(block_of(name), []).extend(cosines[name])
        summary["blocks"][state] = {
            block: {"mean": statistics.fmean(v), "min": min(v)} for block, v in per_block.items()
        }
        cells = "  ".join(
            f"{block} {statistics.fmean(v):+.2f}/{min(v):+.2f}" for block, v in per_block.items()
        )
        print(f"  {state}: {cells}")

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "layer_conflicts.json").write_text(json.dumps(summary, indent=1) + "\n")
    figure, axes = plt.subplots(
        1,
        len(states),
        figsize=(2.2 + 1.1 * len(pairs) * len(states), 0.16 * len(names) + 1.5),
        squeeze=False,
    )
    image = None
    for ax, (state, cosines) in zip(axes[0], states.items(), strict=True):
        image = ax.imshow(
            [cosines[n] for n in names], vmin=-1, vmax=1, cmap="RdBu_r", aspect="auto"
        )
        ax.set_xticks(range(len(pairs)), pairs, rotation=90, fontsize=7)
        short = [n.removeprefix("lm.model.") for n in names]
        ax.set_yticks(range(len(names)), short if ax is axes[0][0] else [], fontsize=5)
        ax.set_title(state, fontsize=8)
    figure.suptitle("language-pair gradient cosine per parameter tensor (test windows)", fontsize=9)
    figure.colorbar(image, ax=axes, shrink=0.6)
    figure.savefig(args.out / "layer_conflicts.png", dpi=110, bbox_inches="tight")
    plt.close(figure)


if __name__ == "__main__":
    main()
