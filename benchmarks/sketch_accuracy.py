r"""How accurate is the sketch protocol (``protocol="sketch"``) on real per-language gradients?

    python benchmarks/sketch_accuracy.py               # tiny GPT + SmolLM2-135M, 3-6 min on CPU
    python benchmarks/sketch_accuracy.py --quick       # smoke test: tiny GPT only, 10-25 s
    python benchmarks/sketch_accuracy.py --models tiny --ks 256,4096 --draws 512

Per DDP bucket the hook weights the Gramian ``G = A Aᵀ`` of the per-language gradients
``A = [ḡ_de; ḡ_fr; ḡ_ru; ḡ_ko]``; the sketch protocol weights ``Ĝ = (ΦA)(ΦA)ᵀ`` instead, with
``Φ`` a CountSketch into ``p`` (the largest prime ``≤ k``) columns: fixed per-element signs
``σ`` and per-row signs ``ρ`` drawn afresh every step (``bucketmoo_hooks/_sketch.py``). This
script measures what that costs in accuracy on gradients of the two models of
``scripts/finetune_multilingual.py`` (its model, data and batch functions, imported):

1. Gradients. The byte-level tiny GPT (3 layers, d 64, the grid's settings) is first trained
   ``--tiny-train-steps`` steps with the mean of the languages (the grid's ``ddp`` control), so
   that its gradients are not those of the initialisation; SmolLM2-135M is pretrained and its
   top ``--smol-train-layers`` blocks are trained (embeddings frozen, as in the grid). Then
   ``--samples`` training steps each give one sample: the four languages' gradients (one
   batch each), cut into DDP's buckets (``ddp_bucket_partition``: 0.05 MB for tiny, DDP's
   25 MB for SmolLM2) in DDP's flat bucket layout.
2. Estimator. For every bucket and ``k`` the sketched Gramian is drawn ``--draws`` times (the
   ``step`` of the row signs' seed varies, exactly as from step to step in training; checked
   against ``reference.sketch_gramian``), and the relative error of each entry (diagonal:
   ``/G_aa``; off-diagonal, on the cosine scale: ``/√(G_aa G_bb)``) is compared with
   ``_sketch.py``'s variance: the column-energy formula ``Σ_j (A_j B_j + C_j² −
   2 Σ_{i∈j} a_i² b_i²)`` (an average over the sign table ``σ``), its even-spread bound
   ``(‖a‖²‖b‖² + ⟨a,b⟩²)/p``, and, where affordable, the exact variance given the fixed
   ``σ`` (``Σ_{r≠r'} M_rr'(M_rr' + M_r'r)``, ``M = X_a X_bᵀ`` over the fold's rows), which is
   what the draws of ``ρ`` alone can reproduce.
3. Weights and direction. For every weighting and ``k``, ``ŵ = weighting(Ĝ)`` against
   ``w = weighting(G)`` with the same context (a fresh instance each time: GradVac and
   Nash-MTL start from their initial state, with no history), and the update ``d̂ = Σ ŵ_ℓ ḡ_ℓ``
   against ``d``: cosine, ``‖d̂ − d‖/‖d‖``, and each language's first-order gain ``⟨d̂, ḡ_ℓ⟩``
   against ``⟨d, ḡ_ℓ⟩`` (all exact from ``G``: ``⟨d̂, d⟩ = ŵᵀGw``, ``⟨d̂, ḡ_ℓ⟩ = (Gŵ)_ℓ``;
   checked against ``reference.combine``'s vectors), including sign flips: a language the exact
   update improves that the sketched one would hurt.

Results: a Markdown report and a JSON file in ``--out`` (``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bucketmoo_hooks import reference, weighting_names
from bucketmoo_hooks._collectives import all_gather_bytes, all_reduce_bytes
from bucketmoo_hooks._linalg import gramian_of
from bucketmoo_hooks._sketch import SignTable, _random_signs, fold_width, problem_seed
from bucketmoo_hooks.single_device import ddp_bucket_partition
from bucketmoo_hooks.weightings import WeightingContext, get_weighting

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import finetune_multilingual as ft  # noqa: E402  (scripts/ is not a package)

LANGUAGES = "de,fr,ru,ko"
COMMON = ["--engine", "single", "--data", "gnome", "--languages", LANGUAGES, "--unseen", ""]
# The fine-tuning grid's settings (benchmarks/finetune_grid.sh), per model.
MODEL_ARGS = {
    "tiny": [
        *("--model", "tiny", "--n-layer", "3", "--d-model", "64", "--n-head", "4"),
        *("--context", "64", "--batch-size", "16", "--lr", "3e-3", "--bucket-cap-mb", "0.05"),
        *("--steps", "300"),  # the grid's schedule: the first steps of its 300
    ],
    "smollm2-135m": [
        *("--model", "smollm2-135m", "--context", "32", "--batch-size", "2", "--lr", "3e-4"),
        *("--bucket-cap-mb", "25", "--steps", "6", "--warmup", "1"),
    ],
}
KS = "256,1024,4096,16384"
RANKS = 4  # one rank per language, as in the grid
CLEAR_GAIN = 0.05  # cos(d, ḡ_ℓ) from which a language counts as clearly improved


# -- 1. gradients ---------------------------------------------------------------------------------


@dataclass
class Problem:
    """One bucket's per-language gradients at one training step."""

    model: str
    sample: int  # index of the gradient sample
    step: int  # training step the sample was taken at
    bucket: int  # index in DDP's reduction order
    parameters: tuple[int, ...]  # positions in the list of trainable parameters
    names: list[str]
    grads: Tensor  # [L, n] fp32, DDP's flat bucket layout

    @property
    def numel(self) -> int:
        return self.grads.shape[1]


@dataclass
class Collected:
    problems: list[Problem]
    info: dict[str, Any] = field(default_factory=dict)


def collect_gradients(
    model_name: str, train_steps: int, samples: int, every: int, seed: int, train_layers: int
) -> Collected:
    """Train ``model_name`` with the mean of the languages; from step ``train_steps`` on, every
    ``every`` steps, keep the languages' gradients of one batch each, bucket by bucket."""
    argv = [*COMMON, *MODEL_ARGS[model_name], "--seed", str(seed)]
    if model_name != "tiny":
        argv += ["--train-layers", str(train_layers)]
    args = ft.parse_args(argv)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model, codec = ft.build_model(args)
    model.train()
    texts = ft.load_texts(args)
    langs = args.languages
    data = {c: torch.tensor(codec.encode("\n".join(texts[c]["train"]))) for c in langs}
    params = [p for p in model.parameters() if p.requires_grad]
    names = {id(p): n for n, p in model.named_parameters()}
    buckets = ddp_bucket_partition(params, args.bucket_cap_mb)
    order = [params[i] for bucket in buckets for i in bucket]  # DDP's flat layout
    generators = {
        c: torch.Generator().manual_seed(args.seed * 1_000_003 + r) for r, c in enumerate(langs)
    }
    optimizer = torch.optim.AdamW(  # as the fine-tuning script: decay matrices only
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    sample_steps = [train_steps + s * every for s in range(samples)]
    problems: list[Problem] = []
    losses: list[dict[str, float]] = []
    for step in range(sample_steps[-1] + 1):
        rows, step_loss = [], {}
        for lang in langs:
            x, y = ft.get_batch(
                data[lang], args.batch_size, args.context, codec.bos, generators[lang]
            )
            _, loss = model(x, y)
            loss.backward()
            step_loss[lang] = loss.item()
            rows.append(
                torch.cat(
                    [
                        torch.zeros(p.numel()) if p.grad is None else p.grad.reshape(-1)
                        for p in order
                    ]
                )
            )
            for p in params:
                p.grad = None
        grads = torch.stack(rows)
        if step in sample_steps:
            losses.append(step_loss)
            offset = 0
            for b, bucket in enumerate(buckets):
                n = sum(params[i].numel() for i in bucket)
                problems.append(
                    Problem(
                        model_name,
                        sample_steps.index(step),
                        step,
                        b,
                        tuple(bucket),
                        [names[id(params[i])] for i in bucket],
                        grads[:, offset : offset + n].contiguous(),
                    )
                )
                offset += n
        if step == sample_steps[-1]:
            break
        # The grid's `ddp` control: the plain mean of the languages' gradients.
        for group in optimizer.param_groups:
            group["lr"] = ft.lr_at(step, args)
        mean, offset = grads.mean(0), 0
        for p in order:
            p.grad = mean[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sizes = [sum(params[i].numel() for i in bucket) for bucket in buckets]
    info = {
        "model": model_name,
        "languages": langs,
        "trainable_params": sum(p.numel() for p in params),
        "train_layers": None if model_name == "tiny" else train_layers,
        "bucket_cap_mb": args.bucket_cap_mb,
        "bucket_sizes": sizes,
        "bucket_names": [[names[id(params[i])] for i in bucket] for bucket in buckets],
        "batch": f"{args.batch_size} x {args.context} tokens per language",
        "sample_steps": sample_steps,
        "losses": losses,
        "seconds": time.perf_counter() - t0,
    }
    return Collected(problems, info)


# -- 2. the estimator ------------------------------------------------------------------------------


def fold(grads: Tensor, sketch_size: int, signs: SignTable) -> Tensor:
    """``σ ⊙ A`` cut into the fold's rows of ``p`` columns, zero-padded: ``[L, rows, p]``."""
    num_objectives, numel = grads.shape
    width = fold_width(sketch_size)
    rows = -(-numel // width)
    folded = grads.new_zeros(num_objectives, rows * width)
    folded[:, :numel] = grads * signs.take(numel, grads.device, grads.dtype)
    return folded.view(num_objectives, rows, width)


def draw_steps(sample: int, draws: int) -> range:
    """The ``step`` of every draw's row signs: distinct for every draw and sample."""
    return range(sample * draws, (sample + 1) * draws)


def sketched_gramians(problem: Problem, sketch_size: int, steps: range, signs: SignTable) -> Tensor:
    """``Ĝ`` of every step in ``steps``, ``[D, L, L]`` fp32: the hook's sketch, all draws in
    one matrix product (``Y_d = Σ_r ρ_dr (σ ⊙ A)_r``)."""
    grads = problem.grads
    if problem.numel <= sketch_size:  # kept as it is: exact
        return reference.sketch_gramian(grads, sketch_size).expand(len(steps), -1, -1)
    folded = fold(grads, sketch_size, signs)
    num_objectives, rows, width = folded.shape
    flat = folded.permute(1, 0, 2).reshape(rows, num_objectives * width)
    seeds = [problem_seed(step, problem.bucket, 0) for step in steps]
    row_signs = torch.stack([_random_signs(rows, s, grads.device, grads.dtype) for s in seeds])
    sketches = (row_signs @ flat).view(len(steps), num_objectives, width)
    return sketches @ sketches.transpose(1, 2)


def formula_variance(folded: Tensor) -> Tensor:
    """``_sketch.py``'s ``Var[⟨Φa, Φb⟩] = Σ_j (A_j B_j + C_j² − 2 Σ_{i∈j} a_i² b_i²)`` for
    every pair of rows of ``A`` (the average over the sign table ``σ``), ``[L, L]`` fp64."""
    x = folded.double()
    energy = (x * x).sum(1)  # [L, p]: A_j
    cross = torch.einsum("arp,brp->abp", x, x)  # C_j (σ² = 1)
    squares = (x * x).flatten(1)
    fourth = squares @ squares.T  # Σ_i a_i² b_i²
    return energy @ energy.T + (cross * cross).sum(-1) - 2 * fourth


def conditional_variance(folded: Tensor) -> Tensor:
    """The variance over the row signs ``ρ`` alone, given the fixed sign table ``σ``:
    ``⟨Φa, Φb⟩ = ρᵀMρ``, ``M = X_a X_bᵀ`` (``X``: the signed fold, rows × p), so
    ``Var = Σ_{r≠r'} M_rr'(M_rr' + M_r'r)``. ``[L, L]`` fp64; costs ``L² n min(rows, p)``."""
    x = folded.double()
    num_objectives, rows, width = x.shape
    if rows <= width:
        z = x.reshape(num_objectives * rows, width)
        m = (z @ z.T).view(num_objectives, rows, num_objectives, rows).permute(0, 2, 1, 3)
        off = 1 - torch.eye(rows, dtype=x.dtype)
        return ((m * m + m * m.transpose(-1, -2)) * off).sum((-1, -2))
    z = x.permute(1, 0, 2).reshape(rows, num_objectives * width)
    n = (z.T @ z).view(num_objectives, width, num_objectives, width).permute(0, 2, 1, 3)
    own = torch.stack([n[a, a] for a in range(num_objectives)])  # X_aᵀ X_a
    frobenius = torch.einsum("ajk,bjk->ab", own, own)  # ‖M‖_F² = ⟨X_aᵀX_a, X_bᵀX_b⟩
    trace = (n * n.transpose(-1, -2)).sum((-1, -2)).T  # tr(M²) = tr((X_bᵀX_a)²)
    diagonal = torch.einsum("arp,brp->abr", x, x)  # M_rr
    squares = (diagonal * diagonal).sum(-1)
    return frobenius - squares + trace - squares


@dataclass
class EstimatorRecord:
    """One entry ``(a, b)`` of one problem's Gramian at one ``k``, relative errors."""

    model: str
    k: int
    sample: int
    bucket: int
    numel: int
    rows: int
    a: int
    b: int
    mean: float  # empirical bias
    std: float  # empirical standard deviation over the draws
    formula: float  # √ of the column-energy formula
    bound: float  # √ of the even-spread bound
    conditional: float | None  # √ of the exact variance given σ (None: not computed)
    effective_rows: float  # min over a, b of (Σ_r E_r)²/Σ_r E_r², E_r: the fold row's energy

    @property
    def diagonal(self) -> bool:
        return self.a == self.b


def estimator_check(
    problem: Problem,
    sketch_size: int,
    draws: int,
    signs: SignTable,
    conditional_budget: float,
) -> tuple[list[EstimatorRecord], Tensor, float]:
    """The draws of ``Ĝ`` for ``problem`` at ``k = sketch_size``, their error statistics, and the
    largest deviation of the batched draw from ``reference.sketch_gramian`` (cosine scale)."""
    steps = draw_steps(problem.sample, draws)
    estimates = sketched_gramians(problem, sketch_size, steps, signs)
    exact = problem.grads.double() @ problem.grads.double().T
    norms = exact.diagonal().sqrt()
    scale = torch.outer(norms, norms)
    check = reference.sketch_gramian(
        problem.grads, sketch_size, step=steps[0], bucket=problem.bucket
    )
    deviation = ((check.double() - estimates[0].double()) / scale).abs().max().item()
    relative = (estimates.double() - exact) / scale
    mean, std = relative.mean(0), relative.std(0)
    num_objectives = exact.shape[0]
    width = fold_width(sketch_size)
    if problem.numel <= sketch_size:
        rows, zero = 1, torch.zeros_like(exact)
        formula = bound = zero
        conditional: Tensor | None = zero
        effective = torch.ones(num_objectives, dtype=torch.float64)
    else:
        folded = fold(problem.grads, sketch_size, signs)
        rows = folded.shape[1]
        energy = folded.double().square().sum(2)  # [L, rows]
        effective = energy.sum(1) ** 2 / energy.square().sum(1)
        formula = formula_variance(folded).clamp_min(0).sqrt() / scale
        bound = ((torch.outer(norms**2, norms**2) + exact**2) / width).sqrt() / scale
        cost = num_objectives**2 * problem.numel * min(rows, width)
        conditional = None
        if cost <= conditional_budget:
            conditional = conditional_variance(folded).clamp_min(0).sqrt() / scale
    records = [
        EstimatorRecord(
            problem.model,
            sketch_size,
            problem.sample,
            problem.bucket,
            problem.numel,
            rows,
            a,
            b,
            mean[a, b].item(),
            std[a, b].item(),
            formula[a, b].item(),
            bound[a, b].item(),
            None if conditional is None else conditional[a, b].item(),
            min(effective[a].item(), effective[b].item()),
        )
        for a in range(num_objectives)
        for b in range(a, num_objectives)
    ]
    return records, estimates, deviation


# -- 3. weights and direction ----------------------------------------------------------------------


@dataclass
class DirectionStats:
    """Per (model, k, weighting): the distributions over buckets, samples and draws."""

    cosine: list[float] = field(default_factory=list)  # cos(d̂, d)
    error: list[float] = field(default_factory=list)  # ‖d̂ − d‖/‖d‖
    weights: list[float] = field(default_factory=list)  # ‖ŵ − w‖/‖w‖
    gain_ratio: list[float] = field(default_factory=list)  # ⟨d̂,ḡ_ℓ⟩/⟨d,ḡ_ℓ⟩, cos(d,ḡ_ℓ) ≥ 0.05
    gain_error: list[float] = field(default_factory=list)  # |⟨d̂−d,ḡ_ℓ⟩|/(‖d‖‖ḡ_ℓ‖)
    improved: int = 0  # (language, bucket, draw) with ⟨d, ḡ_ℓ⟩ > 0
    flips: int = 0  # ... of which ⟨d̂, ḡ_ℓ⟩ < 0
    flip_exact_cosine: float = 0.0  # the largest cos(d, ḡ_ℓ) among the flips
    flip_sketched_cosine: float = 0.0  # the most negative cos(d̂, ḡ_ℓ) among the flips
    nonfinite: int = 0


def direction_check(problem: Problem, estimates: Tensor, stats: dict[str, DirectionStats]) -> None:
    """Every weighting on ``G`` and on each ``Ĝ`` of ``estimates``; metrics exact from ``G``."""
    exact32 = gramian_of(problem.grads)  # the hook's exact G (fp32)
    gramian = problem.grads.double() @ problem.grads.double().T
    norms = gramian.diagonal().sqrt()
    context = WeightingContext(
        problem.step, problem.bucket, tuple(range(gramian.shape[0])), None, problem.parameters
    )
    for name in weighting_names():
        w = get_weighting(name)(exact32, context).double()  # fresh instance: no history
        sketched = torch.stack(
            [get_weighting(name)(estimate, context) for estimate in estimates]
        ).double()
        entry = stats[name]
        finite = sketched.isfinite().all(1)
        entry.nonfinite += int((~finite).sum())
        sketched = sketched[finite]
        exact_norm2 = w @ gramian @ w
        if exact_norm2 <= 0:
            continue
        gains = gramian @ w  # ⟨d, ḡ_ℓ⟩
        sketched_gains = sketched @ gramian  # ⟨d̂, ḡ_ℓ⟩, [D, L]
        sketched_norm2 = (sketched_gains * sketched).sum(1)
        cross = sketched @ gains
        difference = sketched - w
        entry.cosine += (cross / (sketched_norm2 * exact_norm2).sqrt()).tolist()
        entry.error += ((difference @ gramian * difference).sum(1) / exact_norm2).sqrt().tolist()
        entry.weights += (difference.norm(dim=1) / w.norm()).tolist()
        entry.gain_error += (
            ((sketched_gains - gains).abs() / (exact_norm2.sqrt() * norms)).flatten().tolist()
        )
        exact_cos = (gains / (exact_norm2.sqrt() * norms)).expand_as(sketched_gains)
        improved = exact_cos > 0
        entry.improved += int(improved.sum())
        clearly = exact_cos >= CLEAR_GAIN
        entry.gain_ratio += (sketched_gains / gains)[clearly].tolist()
        flipped = improved & (sketched_gains < 0)
        if flipped.any():
            entry.flips += int(flipped.sum())
            sketched_cos = sketched_gains / (sketched_norm2.sqrt()[:, None] * norms)
            entry.flip_exact_cosine = max(entry.flip_exact_cosine, exact_cos[flipped].max().item())
            entry.flip_sketched_cosine = min(
                entry.flip_sketched_cosine, sketched_cos[flipped].min().item()
            )


def combine_check(problem: Problem, estimate: Tensor) -> float:
    """``reference.combine``'s vectors against the Gramian algebra, for MGDA on one draw:
    the difference of ``cos(d̂, d)`` computed both ways."""
    context = WeightingContext(
        problem.step,
        problem.bucket,
        tuple(range(problem.grads.shape[0])),
        None,
        problem.parameters,
    )
    exact = reference.combine(problem.grads, "mgda", context)
    sketched = reference.combine(problem.grads, "mgda", context, gramian=estimate)
    d, d_hat = exact.update.double(), sketched.update.double()
    vectors = (d @ d_hat / (d.norm() * d_hat.norm())).item()
    gramian = problem.grads.double() @ problem.grads.double().T
    w, w_hat = exact.weights.double(), sketched.weights.double()
    algebra = (w_hat @ gramian @ w / (w @ gramian @ w * (w_hat @ gramian @ w_hat)).sqrt()).item()
    return abs(vectors - algebra)


# -- 4. report -------------------------------------------------------------------------------------


def quantile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def sketch_bytes(numel: int, sketch_size: int, ranks: int = RANKS, objectives: int = 4) -> float:
    """Bytes a rank sends for one problem's sketch by a ring all-reduce of ``Y``: 2(R−1)/R·L·k·4,
    with ``min(n, k)`` for a problem kept as it is."""
    return 2 * (ranks - 1) / ranks * objectives * min(numel, sketch_size) * 4


def sent_bytes(numel: int, sketch_size: int, ranks: int = RANKS, objectives: int = 4) -> int:
    """What the protocol sends: the cheaper of that all-reduce and an all-gather of the ranks'
    sketches ``[R, k]``, (R−1)·k·4 (``_sketch._exchange_sketches``; no presence counts)."""
    width = min(numel, sketch_size) * 4
    return min(all_reduce_bytes(objectives * width, ranks), all_gather_bytes(ranks * width, ranks))


def allreduce_bytes(numel: int, ranks: int = RANKS) -> float:
    return 2 * (ranks - 1) / ranks * numel * 4


def estimator_table(records: list[EstimatorRecord], draws: int) -> tuple[str, list[dict]]:
    header = (
        "| model | k | p | sketched | rows | entry | emp. std | formula | bound | "
        "emp/cond | emp/formula | formula/bound | bias: RMS z, max abs z, share abs z>2 |\n"
        + "|---" * 13
        + "|\n"
    )
    lines, rows = [], []
    groups: dict[tuple[str, int], list[EstimatorRecord]] = {}
    for r in records:
        groups.setdefault((r.model, r.k), []).append(r)
    for (model, k), group in groups.items():
        problems = {(r.sample, r.bucket) for r in group}
        folded = [r for r in group if r.rows > 1]
        sketched = {(r.sample, r.bucket) for r in folded}
        exact_error = max((abs(r.mean) + r.std for r in group if r.rows == 1), default=0.0)
        for kind, diagonal in (("diag", True), ("cos", False)):
            chosen = [r for r in folded if r.diagonal == diagonal]
            row: dict[str, Any] = {
                "model": model,
                "k": k,
                "p": fold_width(k),
                "kind": kind,
                "problems": len(problems),
                "sketched": len(sketched),
                "exact_max_abs_error": exact_error,
            }
            if not chosen:
                lines.append(
                    f"| {model} | {k} | {fold_width(k)} | 0/{len(problems)} | — | {kind} | "
                    f"exact (n ≤ k): max error {exact_error:.1e} | | | | | | |"
                )
                rows.append(row)
                continue
            z = [r.mean / (r.std / math.sqrt(draws)) for r in chosen if r.std > 0]
            ratio_cond = [r.std / r.conditional for r in chosen if r.conditional]
            ratio_formula = [r.std / r.formula for r in chosen if r.formula > 0]
            ratio_bound = [r.formula / r.bound for r in chosen if r.bound > 0]
            row |= {
                "rows_median": quantile([r.rows for r in chosen], 0.5),
                "std_median": quantile([r.std for r in chosen], 0.5),
                "formula_median": quantile([r.formula for r in chosen], 0.5),
                "bound_median": quantile([r.bound for r in chosen], 0.5),
                "emp_over_conditional": [quantile(ratio_cond, q) for q in (0, 0.5, 1)],
                "emp_over_formula": [quantile(ratio_formula, q) for q in (0, 0.5, 1)],
                "formula_over_bound": [quantile(ratio_bound, q) for q in (0, 0.5, 1)],
                "z_rms": math.sqrt(sum(v * v for v in z) / len(z)),
                "z_max": max(abs(v) for v in z),
                "z_over_2": sum(abs(v) > 2 for v in z) / len(z),
                "entries": len(chosen),
            }
            rows.append(row)

            def spread(values: list[float]) -> str:
                if not values or math.isnan(values[0]):
                    return "—"
                return f"{values[1]:.2f} [{values[0]:.2f}, {values[2]:.2f}]"

            lines.append(
                f"| {model} | {k} | {fold_width(k)} | {len(sketched)}/{len(problems)} | "
                f"{row['rows_median']:.0f} | {kind} | {100 * row['std_median']:.2f}% | "
                f"{100 * row['formula_median']:.2f}% | {100 * row['bound_median']:.2f}% | "
                f"{spread(row['emp_over_conditional'])} | {spread(row['emp_over_formula'])} | "
                f"{spread(row['formula_over_bound'])} | {row['z_rms']:.2f}, {row['z_max']:.1f}, "
                f"{100 * row['z_over_2']:.0f}% |"
            )
    return header + "\n".join(lines), rows


def direction_table(stats: dict[tuple[str, int, str], DirectionStats]) -> tuple[str, list[dict]]:
    header = (
        "| model | weighting | k | cos(d̂,d) median / p5 / worst | ‖d̂−d‖/‖d‖ median / p95 / "
        "worst | ‖ŵ−w‖/‖w‖ p95 | gain ratio p5 / median / p95 | gain err p95 | flips |\n"
        + "|---" * 9
        + "|\n"
    )
    lines, rows = [], []
    for (model, k, name), s in stats.items():
        if not s.cosine:
            continue
        row = {
            "model": model,
            "weighting": name,
            "k": k,
            "evaluations": len(s.cosine),
            "cosine": [quantile(s.cosine, q) for q in (0.5, 0.05, 0)],
            "error": [quantile(s.error, q) for q in (0.5, 0.95, 1)],
            "weights_p95": quantile(s.weights, 0.95),
            "gain_ratio": [quantile(s.gain_ratio, q) for q in (0.05, 0.5, 0.95)],
            "gain_error_p95": quantile(s.gain_error, 0.95),
            "improved": s.improved,
            "flips": s.flips,
            "flip_exact_cosine": s.flip_exact_cosine,
            "flip_sketched_cosine": s.flip_sketched_cosine,
            "nonfinite": s.nonfinite,
        }
        rows.append(row)
        flips = f"{s.flips}/{s.improved}"
        if s.flips:
            flips += f" (exact cos ≤ {s.flip_exact_cosine:.3f}, →{s.flip_sketched_cosine:.3f})"
        if s.nonfinite:
            flips += f"; {s.nonfinite} non-finite"
        c, e, g = row["cosine"], row["error"], row["gain_ratio"]
        lines.append(
            f"| {model} | {name} | {k} | {c[0]:.5f} / {c[1]:.4f} / {c[2]:.4f} | "
            f"{100 * e[0]:.2f}% / {100 * e[1]:.2f}% / {100 * e[2]:.1f}% | "
            f"{100 * row['weights_p95']:.1f}% | {g[0]:.3f} / {g[1]:.3f} / {g[2]:.3f} | "
            f"{row['gain_error_p95']:.4f} | {flips} |"
        )
    return header + "\n".join(lines), rows


def concentration_table(records: list[EstimatorRecord], infos: list[dict], top: int) -> str:
    """The entries whose column-energy formula exceeds the even-spread bound the most: where
    the gradient's energy concentrates in few of the fold's columns."""
    names = {(i["model"], b): bucket for i in infos for b, bucket in enumerate(i["bucket_names"])}
    chosen = sorted(
        (r for r in records if r.rows > 1 and r.bound > 0),
        key=lambda r: r.formula / r.bound,
        reverse=True,
    )[:top]
    lines = [
        "| model | k | bucket (n, rows) | entry | formula/bound | emp. std | formula | bound | "
        "parameters |",
        "|---" * 9 + "|",
    ]
    for r in chosen:
        bucket = names[r.model, r.bucket]
        shown = ", ".join(bucket[:3]) + (f", … ({len(bucket)})" if len(bucket) > 3 else "")
        entry = f"diag {r.a}" if r.diagonal else f"cos {r.a},{r.b}"
        lines.append(
            f"| {r.model} | {r.k} | {r.bucket} ({r.numel:,}, {r.rows}) | {entry} | "
            f"{r.formula / r.bound:.2f} | {100 * r.std:.2f}% | {100 * r.formula:.2f}% | "
            f"{100 * r.bound:.2f}% | {shown} |"
        )
    return "\n".join(lines)


def departure_table(records: list[EstimatorRecord], top: int, min_rows: int = 64) -> str:
    """The entries of many-row folds whose empirical std departs the most from the formula."""
    chosen = sorted(
        (r for r in records if r.rows >= min_rows and r.formula > 0),
        key=lambda r: abs(math.log(r.std / r.formula)),
        reverse=True,
    )[:top]
    lines = [
        "| model | k | sample, bucket (n, rows) | entry | effective rows | emp. std | formula | "
        "emp/formula | emp/cond |",
        "|---" * 9 + "|",
    ]
    for r in chosen:
        entry = f"diag {r.a}" if r.diagonal else f"cos {r.a},{r.b}"
        cond = f"{r.std / r.conditional:.2f}" if r.conditional else "—"
        lines.append(
            f"| {r.model} | {r.k} | {r.sample}, {r.bucket} ({r.numel:,}, {r.rows}) | {entry} | "
            f"{r.effective_rows:.0f} | {100 * r.std:.2f}% | {100 * r.formula:.2f}% | "
            f"{r.std / r.formula:.2f} | {cond} |"
        )
    return "\n".join(lines)


def tradeoff_table(infos: list[dict], direction_rows: list[dict], ks: list[int]) -> str:
    """Per k: the bytes of one problem's sketch, and per model their share of the median
    bucket's own ring all-reduce, MGDA's median and p95 ‖d̂−d‖/‖d‖ and the largest p95 over the
    weightings."""
    header = "| k | Y per problem: all-reduce / sent |"
    for info in infos:
        m = info["model"]
        header += f" {m}: share of bucket all-reduce | {m}: MGDA ‖d̂−d‖/‖d‖ median, p95 |"
        header += f" {m}: worst p95 (weighting) |"
    lines = [header, "|---" * (2 + 3 * len(infos)) + "|"]
    for k in ks:
        cells = [f"{k}", f"{sketch_bytes(k, k) / 1e3:.1f} / {sent_bytes(k, k) / 1e3:.1f} kB"]
        for info in infos:
            sizes = sorted(info["bucket_sizes"])
            n = sizes[len(sizes) // 2]
            share = 100 * sent_bytes(n, k) / allreduce_bytes(n)
            cells.append(f"{share:.3g}% (n = {n:,})")
            mine = [r for r in direction_rows if r["model"] == info["model"] and r["k"] == k]
            mgda = [r for r in mine if r["weighting"] == "mgda"]
            if not mine:
                cells += ["exact (every bucket n ≤ k)", "—"]
                continue
            worst = max(mine, key=lambda r: r["error"][1])
            cells.append(
                f"{100 * mgda[0]['error'][0]:.1f}%, {100 * mgda[0]['error'][1]:.1f}%"
                if mgda
                else "—"
            )
            cells.append(f"{100 * worst['error'][1]:.1f}% ({worst['weighting']})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rows_table(records: list[EstimatorRecord]) -> str:
    """How well the σ-averaged formula predicts the variance, by the number of fold rows."""
    bins = [(2, 3), (4, 8), (9, 64), (65, 1024), (1025, 1 << 40)]
    lines = [
        "| model | fold rows | entries | emp/cond median [p5, p95] | emp/formula median "
        "[p5, p95] | formula/bound median [p5, p95] |",
        "|---" * 6 + "|",
    ]

    def spread(values: list[float]) -> str:
        if not values:
            return "—"
        return (
            " ".join([f"{quantile(values, 0.5):.2f}", f"[{quantile(values, 0.05):.2f},"])
            + f" {quantile(values, 0.95):.2f}]"
        )

    for model in dict.fromkeys(r.model for r in records):
        for low, high in bins:
            chosen = [r for r in records if r.model == model and low <= r.rows <= high]
            if not chosen:
                continue
            label = f"{low}–{high}" if high < 1 << 40 else f"≥ {low}"
            lines.append(
                f"| {model} | {label} | {len(chosen)} | "
                f"{spread([r.std / r.conditional for r in chosen if r.conditional])} | "
                f"{spread([r.std / r.formula for r in chosen if r.formula > 0])} | "
                f"{spread([r.formula / r.bound for r in chosen if r.bound > 0])} |"
            )
    return "\n".join(lines)


def machine() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"
    keep = (
        "Architecture",
        "CPU(s)",
        "Model name",
        "Thread(s) per core",
        "Core(s) per socket",
        "Socket(s)",
        "L3 cache",
    )
    found = [line.strip() for line in text.splitlines() if line.split(":")[0].strip() in keep]
    return "; ".join(" ".join(line.split()) for line in found)


def commit() -> str:
    try:
        done = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return done.stdout.strip()


def recommendation(direction_rows: list[dict], ks: list[int], infos: list[dict]) -> str:
    """The smallest ``k`` at which, on every model, MGDA's update is within 5 % of the exact
    one in 95 % of the cases and no weighting flips a language the exact update clearly helps
    (cos(d, ḡ_ℓ) ≥ CLEAR_GAIN), with what it costs."""

    def ok(k: int) -> bool:
        for info in infos:
            mine = [r for r in direction_rows if r["model"] == info["model"] and r["k"] == k]
            mgda = [r for r in mine if r["weighting"] == "mgda"]
            if mgda and mgda[0]["error"][1] > 0.05:
                return False
            if any(r["flips"] and r["flip_exact_cosine"] >= CLEAR_GAIN for r in mine):
                return False
        return True

    good = [k for k in ks if ok(k)]
    if not good:
        return (
            f"No k in {ks} keeps MGDA's p95 ‖d̂−d‖/‖d‖ under 5 % on every model: use "
            "protocol='shard' where exact weights matter."
        )
    k = good[0]
    shares = ", ".join(
        f"{info['model']} {100 * sent_bytes(n, k) / allreduce_bytes(n):.2g}%"
        for info in infos
        for n in [sorted(info["bucket_sizes"])[len(info["bucket_sizes"]) // 2]]
    )
    return (
        f"Rule: the smallest k in {ks} with MGDA's p95 ‖d̂−d‖/‖d‖ ≤ 5 % on every model and no "
        f"sign flip of a language the exact update clearly helps (cos(d, ḡ_ℓ) ≥ {CLEAR_GAIN}): "
        f"**k = {k}**: Y costs {sketch_bytes(k, k) / 1e3:.0f} kB per problem and rank by "
        f"all-reduce, and the protocol sends {sent_bytes(k, k) / 1e3:.0f} kB (all-gather, "
        f"cheaper at R = L = {RANKS}), beside the median bucket's own all-reduce: {shares}. "
        f"The error falls as 1/√k (the "
        f"relative std of an entry is ≈ √(2/p) on a norm, √((1+cos²)/p) on a cosine) while the "
        f"bytes grow as k: each halving of the error costs 4× the bytes. The sketch saves "
        f"nothing on small buckets: its (R−1)·k·4 bytes are at least the bucket's own "
        f"all-reduce, 2(R−1)/R·n·4, once n ≤ R·k/2 ({RANKS // 2}k at R = {RANKS})."
    )


# -- main ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--models", default="tiny,smollm2-135m", help="comma-separated: tiny, smollm2-135m")
    add("--ks", default=KS, help="sketch sizes k")
    add("--samples", type=int, default=3, help="gradient samples (training steps) per model")
    add("--draws", type=int, default=256, help="sketch draws per bucket and k (estimator)")
    add("--weight-draws", type=int, default=48, help="of those, draws solved by every weighting")
    add("--tiny-train-steps", type=int, default=60, help="tiny: training steps before sampling")
    add("--tiny-every", type=int, default=5, help="tiny: steps between samples")
    add("--smol-train-layers", type=int, default=8, help="SmolLM2: trained top blocks")
    add(
        "--conditional-budget",
        type=float,
        default=2e9,
        help="exact variance given σ where L²·n·min(rows, p) is below this",
    )
    add("--seed", type=int, default=1)
    add("--threads", type=int, default=1, help="torch threads (1: steadiest on a shared box)")
    add("--quick", action="store_true", help="smoke test: tiny only, fewer samples and draws")
    add("--out", type=Path, default=ROOT / "benchmarks" / "results")
    add("--name", default=None, help="file stem (default sketch_accuracy_cpu, _quick)")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.samples, args.draws, args.weight_draws = "tiny", 2, 64, 4
        args.tiny_train_steps = 20
    args.models = [m for m in args.models.split(",") if m]
    unknown = [m for m in args.models if m not in MODEL_ARGS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {list(MODEL_ARGS)}")
    args.ks = sorted(int(k) for k in args.ks.split(","))
    args.weight_draws = min(args.weight_draws, args.draws)
    if args.draws < 2 or args.samples < 1:
        parser.error("--draws must be >= 2 and --samples >= 1")
    args.name = args.name or ("sketch_accuracy_quick" if args.quick else "sketch_accuracy_cpu")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Everything but the printing: the collected sizes, the tables and their rows."""
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    signs = SignTable()
    infos, records = [], []
    direction: dict[tuple[str, int, str], DirectionStats] = {}
    deviations, combine_deviations, timings = [], [], {}
    for model in args.models:
        start = time.perf_counter()
        collected = collect_gradients(
            model,
            args.tiny_train_steps if model == "tiny" else 0,
            args.samples,
            args.tiny_every if model == "tiny" else 1,
            args.seed,
            args.smol_train_layers,
        )
        infos.append(collected.info)
        print(
            f"{model}: {collected.info['trainable_params']:,} trainable parameters in "
            f"{len(collected.info['bucket_sizes'])} buckets, samples at steps "
            f"{collected.info['sample_steps']} ({collected.info['seconds']:.0f}s)",
            flush=True,
        )
        for k in args.ks:
            for name in weighting_names():
                direction[model, k, name] = DirectionStats()
            checked = False
            for problem in collected.problems:
                found, estimates, deviation = estimator_check(
                    problem, k, args.draws, signs, args.conditional_budget
                )
                records += found
                deviations.append(deviation)
                if problem.numel <= k:
                    continue  # Ĝ is G bit for bit (checked above): the weights are exact
                direction_check(
                    problem,
                    estimates[: args.weight_draws],
                    {n: direction[model, k, n] for n in weighting_names()},
                )
                if not checked:
                    combine_deviations.append(combine_check(problem, estimates[0]))
                    checked = True
        collected.problems.clear()
        timings[model] = time.perf_counter() - start
        print(f"{model}: done in {timings[model]:.0f}s", flush=True)
    if max(deviations) > 1e-4 or max(combine_deviations, default=0) > 1e-4:
        raise RuntimeError(
            f"the batched sketch or the Gramian algebra departs from bucketmoo_hooks.reference: "
            f"{max(deviations):.1e}, {max(combine_deviations, default=0):.1e}"
        )
    estimator_md, estimator_rows = estimator_table(records, args.draws)
    direction_md, direction_rows = direction_table(direction)
    return {
        "infos": infos,
        "records": records,
        "estimator_md": estimator_md,
        "estimator": estimator_rows,
        "direction_md": direction_md,
        "direction": direction_rows,
        "tradeoff_md": tradeoff_table(infos, direction_rows, args.ks),
        "rows_md": rows_table(records),
        "departure_md": departure_table(records, 6),
        "concentration_md": concentration_table(records, infos, 8),
        "recommendation": recommendation(direction_rows, args.ks, infos),
        "reference_deviation": max(deviations),
        "combine_deviation": max(combine_deviations, default=0.0),
        "seconds": time.perf_counter() - t0,
        "timings": timings,
    }


def report(args: argparse.Namespace, result: dict[str, Any], command: str) -> str:
    models = "\n".join(
        f"- **{i['model']}**: {i['trainable_params']:,} trainable parameters"
        + (
            f" (top {i['train_layers']} blocks + final norm, embeddings frozen)"
            if i["train_layers"]
            else " (all, tied embeddings included)"
        )
        + f", {len(i['bucket_sizes'])} buckets of {min(i['bucket_sizes']):,}–"
        f"{max(i['bucket_sizes']):,} elements (cap {i['bucket_cap_mb']} MB), "
        f"{i['batch']}; gradient samples at training steps {i['sample_steps']}; losses "
        + "; ".join(" ".join(f"{c} {v:.2f}" for c, v in losses.items()) for losses in i["losses"])
        for i in result["infos"]
    )
    return f"""# Sketch protocol: accuracy of Ĝ on real per-language gradients

Date {datetime.date.today().isoformat()}, commit {commit()}, torch {torch.__version__},
torch threads {args.threads}. Machine: {machine()}.

Command: `{command}` ({result["seconds"]:.0f} s)

Languages {LANGUAGES} (gnome-user-docs), one rank per language (R = L = 4). Per model:

{models}

Draws: {args.draws} per bucket and k (the row signs' `step` varied), {args.weight_draws} of them
solved by every weighting; the batched draws equal `reference.sketch_gramian` to
{result["reference_deviation"]:.1e} (cosine scale) and the Gramian algebra of the direction
metrics equals `reference.combine`'s vectors to {result["combine_deviation"]:.1e}.

## 1. The estimator: relative error of Ĝ's entries

Entries of the sketched (n > k) buckets; `diag`: (Ĝ_aa − G_aa)/G_aa, `cos`: (Ĝ_ab −
G_ab)/√(G_aa G_bb), a < b. Standard deviations: `emp.` over the draws (median over entries),
`formula`: √ of `_sketch.py`'s column-energy variance (an average over the sign table σ),
`bound`: its even-spread bound √(2/p), √((1+cos²)/p). Ratios: median [min, max] over entries;
`cond`: the exact variance given the fixed σ (computed where L²·n·min(rows, p) ≤
{args.conditional_budget:.0e}; else —): the draws vary ρ only, so it is what `emp.` estimates, to
±{100 / math.sqrt(2 * (args.draws - 1)):.0f} % (one σ). Bias: z = mean/(std/√draws) per entry;
unbiased means RMS z ≈ 1 and about 5 % of |z| > 2.

{result["estimator_md"]}

By the number of the fold's rows (⌈n/p⌉; all entries, diagonal and off-diagonal). Given σ,
⟨Φa, Φb⟩ = ρᵀMρ is a quadratic form in the row signs: with few rows its variance is one random
draw (over the fixed table σ) around the formula, of relative spread ≈ 2/rows for evenly
loaded rows, and Ĝ takes only 2^(rows−1) distinct values; the formula describes the variance
only when the rows are many. The draws agree with the exact variance given σ (`emp/cond`)
whatever the rows.

{result["rows_md"]}

What counts is the effective number of rows, (Σ_r E_r)²/Σ_r E_r² over the rows' energies E_r:
where a few elements carry much of the energy, a single pair of rows whose heavy elements share
a column can make the fixed table's variance depart from the formula even with hundreds of
rows. The largest departures among folds of ≥ 64 rows (`emp/formula` there has a sampling
spread of ±{100 / math.sqrt(2 * (args.draws - 1)):.0f} % at one σ):

{result["departure_md"]}

The entries where the formula exceeds the even-spread bound the most (energy concentrated in
few columns; `rows`: the fold's rows, ⌈n/p⌉):

{result["concentration_md"]}

## 2. Weights and direction against the exact Gramian

Sketched buckets only (n ≤ k is exact: Ĝ = G bit for bit). Distributions over buckets, samples
and draws. Gain ratio: ⟨d̂, ḡ_ℓ⟩/⟨d, ḡ_ℓ⟩ over the (language, bucket, draw) the exact update clearly
improves, cos(d, ḡ_ℓ) ≥ {CLEAR_GAIN};
gain err: |⟨d̂ − d, ḡ_ℓ⟩|/(‖d‖‖ḡ_ℓ‖); flips: languages the exact update improves that the
sketched one hurts, of those it improves, with the largest exact cos(d, ḡ_ℓ) among them and the
most negative sketched cos(d̂, ḡ_ℓ). Every weighting is a fresh instance for each solve (GradVac's
targets and Nash-MTL's warm start have no history: their first step).

{result["direction_md"]}

## 3. Bytes against accuracy

Per problem and rank: Y by ring all-reduce, 2(R−1)/R·L·min(n, k)·4 bytes, or by all-gather of
the ranks' sketches, (R−1)·min(n, k)·4, whichever is cheaper (at R = L = 4 the all-gather, half
as much: `sent`); beside it the bucket's own ring all-reduce, 2(R−1)/R·n·4 bytes, which the
sketch protocol still runs (on the scaled gradients). Share: sent/bucket all-reduce for the
median bucket. With the direction error of section 2:

{result["tradeoff_md"]}

{result["recommendation"]}
"""


def round_float(value: object) -> object:
    return float(f"{value:.4g}") if isinstance(value, float) else value


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    command = (
        " ".join(["python", "benchmarks/sketch_accuracy.py", *sys.argv[1:]])
        if argv is None
        else " ".join(["python", "benchmarks/sketch_accuracy.py", *argv])
    )
    result = run(args)
    print(
        "\n"
        + result["estimator_md"]
        + "\n\n"
        + result["direction_md"]
        + "\n\n"
        + result["rows_md"]
        + "\n\n"
        + result["tradeoff_md"]
        + "\n\n"
        + result["recommendation"]
    )
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / args.name
    stem.with_suffix(".md").write_text(report(args, result, command))
    payload = {
        "date": datetime.date.today().isoformat(),
        "command": command,
        "commit": commit(),
        "machine": machine(),
        "torch": torch.__version__,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "models": result["infos"],
        "estimator": result["estimator"],
        "direction": result["direction"],
        "recommendation": result["recommendation"],
        "reference_deviation": result["reference_deviation"],
        "combine_deviation": result["combine_deviation"],
        "seconds": result["seconds"],
        "timings": result["timings"],
    }
    # Every entry of every sketched (model, k, bucket, sample) as one compact row (4 significant
    # digits); the exact ones are summed up by the estimator rows' exact_max_abs_error.
    sketched = [r for r in result["records"] if r.rows > 1]
    columns = list(vars(sketched[0])) if sketched else []
    entries = ",\n".join(json.dumps([round_float(v) for v in vars(r).values()]) for r in sketched)
    text = json.dumps(payload, indent=1)[:-2]
    text += f',\n "entry_columns": {json.dumps(columns)},\n "entries": [\n{entries}\n ]\n}}\n'
    stem.with_suffix(".json").write_text(text)
    print(f"\nwrote {stem}.md and {stem}.json ({result['seconds']:.0f}s)")
    return result


if __name__ == "__main__":
    main()
