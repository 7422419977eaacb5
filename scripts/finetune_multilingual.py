"""Multilingual fine-tuning with bucket-level MOO: one language per DDP rank (or per emulated rank).

Every rank computes the gradient of its own language; the bucket-MOO comm hook then combines the
per-language gradients in every DDP bucket with a multi-objective weighting (MGDA by default)
instead of DDP's plain average. ``--weighting ddp`` is the control: plain DDP, no hook.

    torchrun --nproc-per-node 4 scripts/finetune_multilingual.py                  # tiny GPT, UDHR
    torchrun --nproc-per-node 4 scripts/finetune_multilingual.py --weighting ddp
    torchrun --nproc-per-node 2 scripts/finetune_multilingual.py --languages eng,rus,jpn,arb,hin
    torchrun --nproc-per-node 4 scripts/finetune_multilingual.py --device cuda --dtype bf16
    torchrun --nproc-per-node 4 scripts/finetune_multilingual.py --protocol sketch   # k = 4096
    python scripts/finetune_multilingual.py --engine single --model smollm2-135m --data gnome \\
        --languages de,fr,ru,ko --unseen uk,es,el --weighting pcgrad          # one device

Rank → language: ranks ``r, r + L, …`` form the group of language ``r`` when there are at least as
many ranks as languages; otherwise the ranks rotate through the languages, ``world`` distinct ones
per step (``state.set_objective``). ``--engine single`` runs the same experiment in one process:
each emulated rank's gradient is computed in turn and ``SingleDeviceMOO`` combines them over the
bucket partition DDP would use (``bucketmoo_hooks.single_device``).

Data: ``--data udhr`` (default) is the vendored UDHR sample (``bucketmoo_hooks.data``);
``--data gnome`` is the Debian gnome-user-docs corpus made by ``scripts/fetch_corpora.py``.
Models: ``--model tiny`` is a byte-level GPT trained from scratch; ``smollm2-135m`` and
``gemma3-270m`` are the pretrained LMs converted by ``scripts/fetch_models.py``. Evaluation is in
bits per byte (tokeniser-independent) on held-out text of the trained ("seen") languages and of
``--unseen`` ones nobody trains. ``--out DIR`` receives ``log.jsonl`` (train/eval records),
``summary.json``, ``diagnostics.jsonl`` (pair cosines etc. per bucket), ``buckets.json`` and
``ckpt.pt`` (``--ckpt-every``; ``--resume`` continues from it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from bucketmoo_hooks import (
    BucketMOOState,
    Diagnostics,
    Weighting,
    install_bucket_moo,
    weighting_names,
)
from bucketmoo_hooks._sketch import check_sketch_size
from bucketmoo_hooks.cost_model import bucket_bytes
from bucketmoo_hooks.data import load_udhr, udhr_languages, udhr_split
from bucketmoo_hooks.data.corpora import cache_dir, corpus_languages, load_corpus
from bucketmoo_hooks.probe import language_separability
from bucketmoo_hooks.single_device import SingleDeviceMOO, ddp_bucket_partition
from bucketmoo_hooks.weightings import MGDA

TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
LAUNCH = "torchrun --nproc-per-node 4 scripts/finetune_multilingual.py [options]"
GNOME = "gnome-user-docs-43.0-2"  # the corpus directory fetch_corpora.py writes
DEFAULT_LANGUAGES = {"udhr": ("eng,rus,jpn,arb", "ukr,deu_1996"), "gnome": ("de,fr,ru,ko", "uk,es")}

# -- models ---------------------------------------------------------------------------------------


@dataclass
class GPTConfig:
    context: int = 64
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 64
    vocab_size: int = 256  # one token per UTF-8 byte: every script, no tokenizer to train


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = (
            t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
            for t in self.qkv(x).split(C, dim=2)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, 4 * cfg.d_model),
            nn.GELU(),
            nn.Linear(4 * cfg.d_model, cfg.d_model),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.context, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # weight tying, as GPT-2
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def hidden_states(self, idx: Tensor) -> list[Tensor]:
        """The residual stream after the embeddings and after every block."""
        positions = torch.arange(idx.shape[1], device=idx.device)
        states = [self.tok_emb(idx) + self.pos_emb(positions)]
        for block in self.blocks:
            states.append(block(states[-1]))
        return states

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        logits = self.head(self.ln_f(self.hidden_states(idx)[-1]))
        return logits, None if targets is None else next_token_loss(logits, targets)


class PretrainedLM(nn.Module):
    """A transformers causal LM behind the tiny GPT's interface (loaded from a converted dir)."""

    def __init__(self, path: Path, train_embeddings: bool, train_layers: int) -> None:
        super().__init__()
        from transformers import AutoModelForCausalLM  # optional dependency: the finetune extra

        self.lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        if train_layers:  # only the top blocks and the final norm: backward stops below them
            self.lm.requires_grad_(False)
            for module in [*self.lm.model.layers[-train_layers:], self.lm.model.norm]:
                module.requires_grad_(True)
        # The (tied) embedding matrix is most of a small multilingual LM's parameters; freezing it
        # keeps the update on the transformer blocks, where the per-language conflicts live.
        self.lm.get_input_embeddings().weight.requires_grad_(train_embeddings)

    def hidden_states(self, idx: Tensor) -> list[Tensor]:
        return list(
            self.lm(input_ids=idx, output_hidden_states=True, use_cache=False).hidden_states
        )

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        logits = self.lm(input_ids=idx, use_cache=False).logits
        return logits, None if targets is None else next_token_loss(logits, targets)


class Adapter(nn.Module):
    """A residual bottleneck ``x + up(gelu(down(x)))``, one per language after each block as in
    MAD-X (Pfeiffer et al., 2020); ``up`` starts at zero, so a fresh adapter leaves the model as
    it is."""

    def __init__(self, d_model: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(d_model, rank)
        self.up = nn.Linear(rank, d_model)
        nn.init.normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.up(F.gelu(self.down(x)))


class LanguageAdapters(nn.Module):
    """One :class:`Adapter` per trained language after each of ``blocks`` (forward hooks).

    ``language`` selects the adapters the next forward applies; ``None`` runs the shared trunk
    alone (the unseen languages). A rank trains only its own language's adapters, so every
    other language's are unused there: language-specific parameters, absent for the others.
    """

    def __init__(
        self, blocks: list[nn.Module], languages: list[str], d_model: int, rank: int
    ) -> None:
        super().__init__()
        self.language: str | None = None
        self.per_language = nn.ModuleDict(
            {code: nn.ModuleList(Adapter(d_model, rank) for _ in blocks) for code in languages}
        )
        for index, block in enumerate(blocks):
            block.register_forward_hook(self._hook(index))

    def _hook(self, index: int) -> Callable[[nn.Module, tuple, object], object]:
        def apply(module: nn.Module, inputs: tuple, output: object) -> object:
            if self.language is None:
                return None
            adapter = self.per_language[self.language][index]
            if isinstance(output, tuple):  # decoder layers of older transformers
                return (adapter(output[0]), *output[1:])
            return adapter(output)

        return apply

    def select(self, code: str | None) -> None:
        """Use ``code``'s adapters from the next forward on (the trunk alone if it has none)."""
        self.language = code if code in self.per_language else None


def select_language(model: nn.Module, code: str | None) -> None:
    """Route the next forward through ``code``'s adapters (a no-op without ``--adapters``)."""
    adapters = getattr(model, "adapters", None)
    if adapters is not None:
        adapters.select(code)


# DDP's reducer warns once per process when ``find_unused_parameters=True`` finds every parameter
# used. This script asks for it on purpose (a fixed bucket partition: see ``train``), so there the
# warning is expected. It is a C++ warning written straight to file descriptor 2 by DDP's forward
# (``Reducer::prepare_for_backward``), not a Python warning: ``warnings.filterwarnings`` does not
# see it. The first synchronised forward therefore runs under ``without_stderr_lines``.
DDP_ALL_PARAMETERS_USED = re.compile(
    r"find_unused_parameters=True was specified in DDP constructor, but did not find any unused "
    r"parameters in the forward pass"
)


@contextlib.contextmanager
def without_stderr_lines(pattern: re.Pattern[str]) -> Iterator[None]:
    """Run the block with file descriptor 2 captured, then write back every captured line except
    those matching ``pattern`` (C++ warnings bypass ``sys.stderr`` and Python's filters)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode(errors="replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if not pattern.search(line)))
            sys.stderr.flush()


def next_token_loss(logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction=reduction)


@dataclass
class Codec:
    """Text → token ids, and the id that starts every evaluation stream."""

    encode: Callable[[str], list[int]]
    bos: int


def build_model(args: argparse.Namespace) -> tuple[nn.Module, Codec]:
    model, codec = build_trunk(args)
    if args.adapters:
        if isinstance(model, GPT):
            blocks, d_model = list(model.blocks), model.cfg.d_model
        else:  # the trained blocks (all of them with --train-layers 0)
            layers = model.lm.model.layers
            blocks = list(layers[-args.train_layers :] if args.train_layers else layers)
            d_model = model.lm.config.hidden_size
        model.adapters = LanguageAdapters(blocks, args.languages, d_model, args.adapters)
    return model, codec


def build_trunk(args: argparse.Namespace) -> tuple[nn.Module, Codec]:
    if args.model == "tiny":
        cfg = GPTConfig(args.context, args.n_layer, args.n_head, args.d_model)
        return GPT(cfg), Codec(lambda text: list(text.encode("utf-8")), bos=ord("\n"))
    from transformers import AutoTokenizer

    path = args.model_dir or cache_dir() / "models" / args.model
    if not (path / "config.json").is_file():
        raise SystemExit(f"no converted model at {path}; run `python scripts/fetch_models.py`")
    tokenizer = AutoTokenizer.from_pretrained(path)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    codec = Codec(lambda text: tokenizer(text, add_special_tokens=False)["input_ids"], bos=bos)
    return PretrainedLM(path, args.train_embeddings, args.train_layers), codec


# -- data -----------------------------------------------------------------------------------------


def load_texts(args: argparse.Namespace) -> dict[str, dict[str, list[str]]]:
    """Paragraphs per language and split (``train``, ``valid``, ``test``)."""
    codes = args.languages + args.unseen
    if args.data == "gnome":
        return load_corpus(args.data_dir, codes)
    texts = {}
    for code, paragraphs in load_udhr(codes).items():
        train, held_out = udhr_split(paragraphs, args.valid_fraction)
        # 51 paragraphs are too few for three parts: UDHR's test split is its validation split.
        texts[code] = {"train": train, "valid": held_out, "test": held_out}
    return texts


@dataclass
class EvalSet:
    tokens: Tensor  # the text's tokens: every one is predicted once
    n_bytes: int  # UTF-8 bytes of the text: bits per byte = nats / n_bytes / ln 2


def eval_set(paragraphs: list[str], codec: Codec, max_bytes: int) -> EvalSet:
    """The first paragraphs of a split, up to ``max_bytes`` of text (at least one paragraph)."""
    kept, size = [], 0
    for paragraph in paragraphs:
        size += len(paragraph.encode("utf-8")) + 1
        if kept and size > max_bytes:
            break
        kept.append(paragraph)
    text = "\n".join(kept)
    return EvalSet(torch.tensor(codec.encode(text)), len(text.encode("utf-8")))


def with_bos(targets: Tensor, bos: int) -> Tensor:
    """Inputs for next-token targets ``[B, T]``: BOS, then the targets shifted by one.

    Every window starts with BOS, in training and evaluation alike: pretrained LMs (Gemma above
    all) expect it, and every target, the first included, is then predicted.
    """
    return torch.cat([torch.full_like(targets[:, :1], bos), targets[:, :-1]], dim=1)


def get_batch(
    data: Tensor, batch_size: int, context: int, bos: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Random windows of ``context`` tokens: inputs (from BOS) and next-token targets."""
    starts = torch.randint(len(data) - context + 1, (batch_size, 1), generator=generator)
    targets = data[starts + torch.arange(context)]
    return with_bos(targets, bos), targets


def windows(tokens: Tensor, context: int, bos: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Non-overlapping windows (inputs, targets): every token is predicted exactly once."""
    full = len(tokens) // context * context
    if full:
        targets = tokens[:full].view(-1, context)
        yield with_bos(targets, bos), targets
    if full < len(tokens):  # the tail, as one shorter window
        targets = tokens[full:].view(1, -1)
        yield with_bos(targets, bos), targets


def language_index(rank: int, step: int, world: int, n_languages: int) -> int:
    """Which language ``rank`` trains at ``step`` (0-based).

    Static when there are at least as many ranks as languages (ranks ``r, r + L, ...`` form the
    group of language ``r``); otherwise the ranks rotate through the languages, ``world`` distinct
    ones per step, so every language is trained equally often.
    """
    if world >= n_languages:
        return rank % n_languages
    return (rank + step * world) % n_languages


# -- evaluation -----------------------------------------------------------------------------------


@torch.no_grad()
def nats(
    model: nn.Module, data: EvalSet, context: int, bos: int, batch: int, device: torch.device
) -> float:
    total = 0.0
    for x, y in windows(data.tokens, context, bos):
        for i in range(0, len(x), batch):
            logits, _ = model(x[i : i + batch].to(device))
            total += next_token_loss(logits, y[i : i + batch].to(device), "sum").item()
    return total


def evaluate(
    run: Run, sets: dict[str, EvalSet], autocast: contextlib.AbstractContextManager
) -> dict[str, float]:
    """Bits per byte of every language; with DDP the languages are split over the ranks."""
    run.model.eval()
    stats = torch.zeros(len(sets), dtype=torch.float64)
    with autocast:
        for i, (code, data) in enumerate(sets.items()):
            if i % run.world_processes == run.rank:
                select_language(run.model, code)  # seen: its adapters; unseen: the trunk
                stats[i] = nats(
                    run.model, data, run.args.context, run.bos, run.args.eval_batch, run.device
                )
                stats[i] /= sets[code].n_bytes * math.log(2)
    if run.distributed:
        dist.all_reduce(stats)
    run.model.train()
    return dict(zip(sets, stats.tolist(), strict=True))


@torch.no_grad()
def separability(run: Run, sets: dict[str, EvalSet]) -> list[dict[str, float]]:
    """Per layer: how separable the languages are in the mean-pooled hidden states of windows."""
    run.model.eval()
    features: list[dict[str, Tensor]] = []
    for code, data in sets.items():
        x, _ = next(windows(data.tokens, run.args.context, run.bos))
        select_language(run.model, None)  # the shared trunk's representation of every language
        states = run.model.hidden_states(x[: run.args.probe_windows].to(run.device))
        if not features:
            features = [{} for _ in states]
        for layer, state in enumerate(states):
            features[layer][code] = state.float().mean(dim=1).cpu()
    run.model.train()
    return [language_separability(layer) for layer in features]


# -- training -------------------------------------------------------------------------------------


@dataclass
class Run:
    """What the training loop needs to know about the processes and the model."""

    args: argparse.Namespace
    rank: int  # this process's rank (0 with --engine single)
    world: int  # ranks: processes, or emulated ranks with --engine single
    world_processes: int
    distributed: bool
    device: torch.device
    model: nn.Module  # the bare model (DDP's .module)
    bos: int  # the token every window starts with

    @property
    def local_ranks(self) -> range:
        """The ranks this process computes gradients for."""
        return range(self.world) if not self.distributed else range(self.rank, self.rank + 1)


def weighting_of(args: argparse.Namespace) -> str | Weighting:
    """The weighting by name, or MGDA normalising gradients as ``--mgda-normalization`` says."""
    if args.weighting == "mgda" and args.mgda_normalization != "none":
        return MGDA(normalization=args.mgda_normalization)
    return args.weighting


def checkpoint_config(args: argparse.Namespace, world: int) -> dict[str, object]:
    """What a resumed run must share with the run that saved the checkpoint."""
    keys = ("engine", "weighting", "mgda_normalization", "granularity", "languages", "model")
    keys += ("seed", "steps", "data", "protocol", "sketch_size", "adapters")
    return {key: vars(args)[key] for key in keys} | {"world": world}


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warmup, then cosine decay to ``lr / 10`` at the last step."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - 1 - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


class Progress:
    """A one-line progress bar on a terminal (rank 0); silent otherwise."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled, self.t0 = total, enabled and sys.stderr.isatty(), time.time()

    def start(self) -> None:
        """Rates count from here (after loading and the first evaluation)."""
        self.t0 = time.time()

    def clear(self) -> None:
        """Erase the bar before a log line (the next update draws it again)."""
        if self.enabled:
            sys.stderr.write("\r\033[K")

    def update(self, done: int, first: int, note: str) -> None:
        if not self.enabled:
            return
        rate = (done - first) / max(time.time() - self.t0, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else 0.0
        bar = "#" * (30 * done // self.total)
        sys.stderr.write(
            f"\r[{bar:<30}] {done}/{self.total} {rate:.2f} it/s eta {eta:4.0f}s {note}"
        )
        sys.stderr.flush()
        if done == self.total:
            sys.stderr.write("\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--engine", choices=["ddp", "single"], default="ddp", help="single: one process")
    add("--ranks", type=int, default=None, help="--engine single: emulated ranks (default: L)")
    add("--data", choices=["udhr", "gnome"], default="udhr")
    add("--data-dir", type=Path, default=None, help="gnome corpus dir (default: in the cache)")
    add("--languages", default=None, help="trained codes, comma-separated")
    add("--unseen", default=None, help="codes only evaluated (held out)")
    add("--model", choices=["tiny", "smollm2-135m", "gemma3-270m"], default="tiny")
    add("--model-dir", type=Path, default=None, help="converted model (default: in the cache)")
    add("--train-embeddings", action="store_true", help="pretrained models: train the embeddings")
    add("--train-layers", type=int, default=0, help="pretrained: train the top N blocks (0: all)")
    add(
        "--adapters",
        type=int,
        default=0,
        help="bottleneck width of one adapter per trained language after every trained block "
        "(0: none); unseen languages are evaluated on the shared trunk alone",
    )
    add("--weighting", choices=["ddp", *weighting_names()], default="mgda", help="ddp: no hook")
    add("--granularity", choices=["bucket", "parameter", "global"], default="bucket")
    add("--mgda-normalization", choices=["none", "l2"], default="none", help="MGDA on unit grads")
    add(
        "--protocol", choices=["shard", "sketch"], default="shard", help="sketch: sketched Gramians"
    )
    add("--sketch-size", type=int, default=None, help="--protocol sketch: k (default 4096)")
    add("--steps", type=int, default=200)
    add("--batch-size", type=int, default=32, help="windows per rank per micro-batch")
    add("--grad-accum", type=int, default=1, help="micro-batches per step (DDP no_sync)")
    add("--lr", type=float, default=3e-3)
    add("--warmup", type=int, default=None, help="warmup steps (default: steps // 10)")
    add("--weight-decay", type=float, default=0.01)
    add("--grad-clip", type=float, default=1.0, help="max gradient norm; 0 disables clipping")
    add("--dtype", choices=["auto", "fp32", "bf16"], default="auto", help="auto: bf16 on GPUs")
    add("--context", type=int, default=64, help="tokens per window")
    add("--n-layer", type=int, default=2)
    add("--n-head", type=int, default=4)
    add("--d-model", type=int, default=64)
    add("--bucket-cap-mb", type=float, default=0.05, help="small, so the model has many buckets")
    add("--valid-fraction", type=float, default=0.2, help="UDHR: held-out share of paragraphs")
    add("--eval-every", type=int, default=0, help="validation every N steps (0: start and end)")
    add("--eval-start", action=argparse.BooleanOptionalAction, default=True, help="eval at step 0")
    add("--eval-bytes", type=int, default=100_000, help="held-out text per language and split")
    add("--eval-batch", type=int, default=16, help="windows per evaluation forward")
    add("--probe", action="store_true", help="per-layer language separability at the end")
    add("--probe-windows", type=int, default=32, help="windows per language for --probe")
    add("--log-every", type=int, default=25)
    add("--diag-every", type=int, default=10, help="diagnostics: steps between host pulls")
    add("--seed", type=int, default=1337)
    add("--device", choices=["cpu", "cuda"], default="cpu")
    add("--threads", type=int, default=1, help="torch threads per process on CPU")
    add("--out", type=Path, default=None, help="run directory: logs, diagnostics, checkpoint")
    add("--ckpt-every", type=int, default=0, help="checkpoint every N steps (and at the end)")
    add("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    add("--stop-after", type=int, default=None, help="stop after this step (then --resume)")
    args = parser.parse_args(argv)

    seen, unseen = DEFAULT_LANGUAGES[args.data]
    args.languages = [c for c in (args.languages or seen).split(",") if c]
    # A trained language is reported as seen, never also as unseen.
    unseen_codes = unseen if args.unseen is None else args.unseen
    args.unseen = [c for c in unseen_codes.split(",") if c and c not in args.languages]
    if args.data == "gnome":
        args.data_dir = args.data_dir or cache_dir() / "corpora" / GNOME
        available = corpus_languages(args.data_dir)
        if not available:
            parser.error(f"no corpus at {args.data_dir}; run `python scripts/fetch_corpora.py`")
    else:
        available = udhr_languages()
    unknown = [c for c in args.languages + args.unseen if c not in available]
    if unknown:
        parser.error(f"unknown language code(s) {unknown}; available: {', '.join(available)}")
    if not args.languages or len(set(args.languages)) != len(args.languages):
        parser.error(f"--languages needs distinct codes, got {args.languages}")
    positive = ("steps", "batch_size", "grad_accum", "log_every", "context", "threads")
    if args.adapters < 0:
        parser.error(f"--adapters must be >= 0 (0: no adapters), got {args.adapters}")
    if min(getattr(args, name) for name in positive) < 1:
        parser.error(f"{', '.join('--' + n.replace('_', '-') for n in positive)} must be >= 1")
    if args.model == "tiny" and args.d_model % args.n_head:
        parser.error(f"--d-model {args.d_model} is not divisible by --n-head {args.n_head}")
    if args.warmup is None:
        args.warmup = max(1, args.steps // 10)
    if args.protocol == "sketch" and args.weighting == "ddp":
        parser.error("--protocol sketch needs a MOO weighting (--weighting ddp runs no hook)")
    try:  # the default k of --protocol sketch, so that the summary records it
        args.sketch_size = check_sketch_size(args.sketch_size, args.protocol)
    except (TypeError, ValueError) as error:
        parser.error(f"--sketch-size: {error}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    if (args.resume or args.ckpt_every or args.stop_after) and args.out is None:
        parser.error("--resume, --ckpt-every and --stop-after need --out")
    if args.engine == "single":
        args.ranks = args.ranks or len(args.languages)
        return args
    if args.ranks is not None:
        parser.error("--ranks is for --engine single; with DDP the ranks are torchrun's")
    missing = [name for name in TORCHRUN_ENV if name not in os.environ]
    if missing:
        parser.error(
            f"the torchrun environment is missing ({', '.join(missing)} unset); "
            f"this script runs one process per rank, launch it as:\n  {LAUNCH}\n"
            "or use --engine single for one process"
        )
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if local_rank >= torch.cuda.device_count():
            raise SystemExit(
                f"--device cuda: LOCAL_RANK {local_rank} needs cuda:{local_rank}, but only "
                f"{torch.cuda.device_count()} GPU(s) are visible; use one process per GPU"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(args.threads)  # the ranks share the machine's cores
    if args.engine == "single":
        train(args, 0, args.ranks, device)
        return
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"  # gloo: host exchange
    # device_id binds NCCL to this rank's GPU up front (and tells barrier() which one to use).
    dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    train(args, dist.get_rank(), dist.get_world_size(), device)
    # Wait until every rank is done before tearing down. The barrier also gives gloo's worker
    # threads (waiting here for the GIL) time to drop the tensors of the last collective: one
    # still holding them once the interpreter shuts down aborts the process (SIGABRT).
    dist.barrier()
    dist.destroy_process_group()


def train(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> None:
    master = rank == 0
    distributed = args.engine == "ddp"
    langs, n_langs = args.languages, len(args.languages)
    rotate = world < n_langs
    progress = Progress(args.steps, master)

    def log(message: str) -> None:
        if master:
            progress.clear()
            print(message, flush=True)

    # Same seed everywhere, so every rank builds the same initial model (DDP would broadcast
    # rank 0's anyway); the batches come from per-rank streams seeded by (seed, rank).
    torch.manual_seed(args.seed)
    model, codec = build_model(args)
    model.to(device)
    run = Run(args, rank, world, world if distributed else 1, distributed, device, model, codec.bos)
    generators = {
        r: torch.Generator().manual_seed(args.seed * 1_000_003 + r) for r in run.local_ranks
    }

    texts = load_texts(args)
    train_data = {c: torch.tensor(codec.encode("\n".join(texts[c]["train"]))) for c in langs}
    for code, data in train_data.items():
        if len(data) < args.context:
            raise ValueError(f"{code}: {len(data)} training tokens < context {args.context}")
    valid = {c: eval_set(t["valid"], codec, args.eval_bytes) for c, t in texts.items()}
    test = {c: eval_set(t["test"], codec, args.eval_bytes) for c, t in texts.items()}

    if args.dtype == "bf16" or (
        args.dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    ):
        autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    else:
        autocast = contextlib.nullcontext()

    params = [p for p in model.parameters() if p.requires_grad]
    # Diagnostics on rank 0 only (they read the Gramian every rank already has), into OUT.
    diagnostics = None
    if master and args.out is not None and (args.weighting != "ddp" or not distributed):
        diagnostics = Diagnostics(
            log_every=args.diag_every,
            path=args.out / "diagnostics.jsonl",
            keep=False,
            objectives=langs,
        )
    state: BucketMOOState | None = None
    engine: SingleDeviceMOO | None = None
    ddp: DDP | None = None
    if distributed:
        # find_unused_parameters=True: DDP keeps the bucket partition it starts with (no rebuild
        # after step 1), so a resumed run reduces exactly as an uninterrupted one and
        # --engine single can reproduce the partition (ddp_bucket_partition).
        ddp = DDP(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            bucket_cap_mb=args.bucket_cap_mb,
            find_unused_parameters=True,
        )
        if args.weighting != "ddp":
            # Static assignment: declare the whole map once; rotation: each rank sets it per step.
            static_map = (
                None
                if rotate
                else [langs[language_index(r, 0, world, n_langs)] for r in range(world)]
            )
            state = BucketMOOState(
                static_map,
                weighting_of(args),
                granularity=args.granularity,
                diagnostics=diagnostics,
                protocol=args.protocol,
                sketch_size=args.sketch_size,
            )
            install_bucket_moo(ddp, state)
    else:
        engine = SingleDeviceMOO(
            params,
            None if args.weighting == "ddp" else weighting_of(args),
            granularity=args.granularity,
            bucket_cap_mb=args.bucket_cap_mb,
            diagnostics=diagnostics,
            sketch_size=args.sketch_size,
        )
    forward = ddp if ddp is not None else model

    # Decay matrices only (nanoGPT): biases, norms and position embeddings stay undecayed.
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.95),
    )

    # -- resume ---------------------------------------------------------------------------------
    start, history = 0, {"losses": [], "evals": []}
    ckpt_path = args.out / "ckpt.pt" if args.out else None
    if args.resume and ckpt_path is not None and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        current = checkpoint_config(args, world)
        for key, value in current.items():
            # A key older checkpoints lack was off then (e.g. adapters 0).
            saved = ckpt["config"].get(key, value if not value else None)
            if saved != value:
                raise SystemExit(f"{ckpt_path} was saved with {key}={saved!r}, not {value!r}")
        model.load_state_dict(ckpt["model"], strict=False)  # trainable params; the rest is fixed
        optimizer.load_state_dict(ckpt["optimizer"])
        if state is not None:
            state.load_state_dict(ckpt["moo"])
        if engine is not None:
            engine.load_state_dict(ckpt["moo"])
        for r, generator in generators.items():
            generator.set_state(ckpt["generators"][r])
        start, history = ckpt["step"], ckpt["history"]
    elif master and args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        for name in ("log.jsonl", "diagnostics.jsonl", "summary.json"):
            (args.out / name).unlink(missing_ok=True)  # a fresh run starts fresh files

    def write_log(record: dict) -> None:
        if master and args.out is not None:
            with (args.out / "log.jsonl").open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")

    def save_checkpoint(step: int) -> None:
        states = {r: g.get_state() for r, g in generators.items()}
        if distributed:  # every rank's batch stream goes into the one file
            gathered: list[dict[int, Tensor] | None] = [None] * world
            dist.all_gather_object(gathered, states)
            states = {r: s for part in gathered for r, s in part.items()}
        if not master:
            return
        moo = state.state_dict() if state is not None else engine.state_dict() if engine else {}
        ckpt = {
            "step": step,
            "config": checkpoint_config(args, world),
            "model": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
            "optimizer": optimizer.state_dict(),
            "moo": moo,
            "generators": [states[r] for r in range(world)],
            "history": history,
        }
        torch.save(ckpt, ckpt_path.with_suffix(".tmp"))
        ckpt_path.with_suffix(".tmp").replace(ckpt_path)  # never a half-written checkpoint

    n_params = sum(p.numel() for p in params)
    adapter_note = ""
    if args.adapters:
        per_language = sum(p.numel() for p in model.adapters.per_language[langs[0]].parameters())
        adapter_note = f" ({n_langs} x {per_language / 1e6:.3f}M in language adapters)"
    buckets = ddp_bucket_partition(params, args.bucket_cap_mb)
    names = {id(p): n for n, p in model.named_parameters()}
    if master and args.out is not None:
        bucket_names = [[names[id(params[i])] for i in bucket] for bucket in buckets]
        (args.out / "buckets.json").write_text(json.dumps(bucket_names, indent=0) + "\n")
    log(
        f"{world} {'ranks' if distributed else 'emulated ranks'} on {device.type} "
        f"({dist.get_backend() if distributed else 'single-device engine'}), "
        f"weighting={weighting_of(args)}, granularity={args.granularity}, "
        f"protocol={args.protocol}{f' (k={args.sketch_size})' if args.sketch_size else ''}, "
        f"model={args.model}, "
        f"{n_params / 1e6:.3f}M trainable params{adapter_note} in {len(buckets)} buckets "
        f"(cap {args.bucket_cap_mb} MB), {args.steps} steps x {args.grad_accum} x "
        f"{args.batch_size} x {args.context} tokens per rank, data={args.data}"
    )
    if rotate:
        log(
            f"languages: {' '.join(langs)}, rotating: "
            f"rank r trains language (r + step*{world}) mod {n_langs}"
        )
    else:
        log(
            "rank -> language: "
            + "  ".join(f"{r}:{langs[language_index(r, 0, world, n_langs)]}" for r in range(world))
        )
    log("train tokens: " + "  ".join(f"{c} {len(train_data[c])}" for c in langs))
    log(f"unseen (eval only): {' '.join(args.unseen) or '-'}")
    if start:
        log(f"resumed from {ckpt_path} at step {start}")

    def eval_and_log(step: int, split: str, sets: dict[str, EvalSet]) -> dict[str, float]:
        bpb = evaluate(run, sets, autocast)
        history["evals"].append({"step": step, "split": split, "bpb": bpb})
        write_log({"kind": "eval", "step": step, "split": split, "bpb": bpb})
        log(f"eval {split} @ {step}: " + "  ".join(f"{c} {v:.3f}" for c, v in bpb.items()))
        return bpb

    if start == 0 and args.eval_start:
        eval_and_log(0, "test", test)
        if args.eval_every:
            eval_and_log(0, "valid", valid)

    # Losses stay on the device until a log step gathers them (no host sync every step).
    step_losses = torch.zeros(args.steps, len(run.local_ranks), device=device)
    logged = start
    end = min(args.steps, args.stop_after or args.steps)
    log("train loss, nats per token (each language's mean since the previous line):")
    t0 = time.perf_counter()
    progress.start()
    for step in range(start, end):
        lr = lr_at(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for slot, r in enumerate(run.local_ranks):
            lang = langs[language_index(r, step, world, n_langs)]
            if state is not None and rotate:
                state.set_objective(lang)  # before the forward, where the ranks exchange it
            for micro in range(args.grad_accum):
                x, y = get_batch(
                    train_data[lang], args.batch_size, args.context, codec.bos, generators[r]
                )
                last = micro == args.grad_accum - 1
                sync = contextlib.nullcontext() if ddp is None or last else ddp.no_sync()
                # The first forward DDP prepares a gradient sync for raises the expected warning.
                expected_warning = (
                    without_stderr_lines(DDP_ALL_PARAMETERS_USED)
                    if ddp is not None and last and step == start
                    else contextlib.nullcontext()
                )
                select_language(model, lang)
                with sync:
                    with autocast, expected_warning:
                        _, loss = forward(x.to(device), y.to(device))
                    # DDP (or the hook) combines the languages' gradients in the last backward.
                    (loss / args.grad_accum).backward()
                step_losses[step, slot] += loss.detach() / args.grad_accum
            if engine is not None:
                engine.add_gradient(lang)
        if engine is not None:
            engine.combine()  # what DDP + the hook did inside backward
        if args.grad_clip > 0:
            nn.utils.clip_grad_norm_(params, args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        done = step + 1
        progress.update(done, start, f"lr {lr:.1e}")
        if done % args.log_every == 0 or done in (1, end):
            # Gather every rank's losses since the last log line; the schedule says which language
            # each value belongs to, so ranks of the same language are averaged.
            window = step_losses[logged:done].T.contiguous()  # [local ranks, steps]
            if distributed:
                gathered = [torch.empty_like(window) for _ in range(world)]
                dist.all_gather(gathered, window)
                window = torch.cat(gathered)
            per_rank = window.tolist()
            for offset, s in enumerate(range(logged, done)):
                sums: dict[str, list[float]] = {}
                for r in range(world):
                    lang = langs[language_index(r, s, world, n_langs)]
                    sums.setdefault(lang, []).append(per_rank[r][offset])
                history["losses"].append({c: sum(v) / len(v) for c, v in sums.items()})
            mean_losses = {}
            for code in langs:
                values = [s[code] for s in history["losses"][logged:done] if code in s]
                if values:
                    mean_losses[code] = sum(values) / len(values)
            shown = "  ".join(
                f"{c} {mean_losses[c]:.3f}" if c in mean_losses else f"{c}   -  " for c in langs
            )
            elapsed = time.perf_counter() - t0
            write_log(
                {"kind": "train", "step": done, "lr": lr, "loss": mean_losses, "time": elapsed}
            )
            logged = done
            log(f"step {done:4d}/{args.steps} | {shown} | lr {lr:.1e} | {elapsed:6.1f}s")
        if args.eval_every and done % args.eval_every == 0 and done != args.steps:
            eval_and_log(done, "valid", valid)
        if args.ckpt_every and (done % args.ckpt_every == 0 or done == end):
            save_checkpoint(done)
    train_time = time.perf_counter() - t0
    if diagnostics is not None:
        diagnostics.pull()
    if end < args.steps:
        log(f"stopped after step {end} (--stop-after); continue with --resume")
        return

    if args.eval_every:
        eval_and_log(args.steps, "valid", valid)
    # The step-0 test evaluation (absent with --no-eval-start).
    starts = [e["bpb"] for e in history["evals"] if e["step"] == 0 and e["split"] == "test"]
    bpb_start: dict[str, float] = starts[0] if starts else {}
    bpb = eval_and_log(args.steps, "test", test)
    unseen = args.unseen

    def mean(codes: list[str], values: dict[str, float]) -> float | None:
        return sum(values[c] for c in codes) / len(codes) if codes and values else None

    def cell(value: float | None) -> str:
        return f"{value:7.3f}" if value is not None else "      -"

    log(f"\nbits per byte on held-out text (test split, <= {args.eval_bytes} bytes per language):")
    log(f"{'lang':<14}{'set':<8}{'start':>7}{'final':>7}")
    for code in langs + unseen:
        kind = "seen" if code in langs else "unseen"
        log(f"{code:<14}{kind:<8}{cell(bpb_start.get(code))}{cell(bpb[code])}")
    for kind, codes in (("seen", langs), ("unseen", unseen)):
        if codes:
            log(f"{'mean':<14}{kind:<8}{cell(mean(codes, bpb_start))}{cell(mean(codes, bpb))}")

    probe = separability(run, test) if args.probe and master else None
    if probe is not None:
        log(
            "language separability per layer (probe accuracy / variance ratio): "
            + "  ".join(
                f"{i}:{p['probe_accuracy']:.2f}/{p['variance_ratio']:.2f}"
                for i, p in enumerate(probe)
            )
        )

    comm: dict[str, object]
    if state is not None:
        sent, ring = state.ledger.last_step_bytes(), state.ledger.last_step_allreduce_bytes()
        n_buckets = len(state.ledger.last_step)
        comm = {"hook_bytes": sent, "allreduce_bytes": ring, "buckets": n_buckets}
        log(
            f"\ncomm, rank 0, last step: hook sent {sent / 1e3:.1f} kB over {n_buckets} buckets; "
            f"a ring all-reduce of the same buckets sends {ring / 1e3:.1f} kB "
            f"({sent / ring:.3f}x)"
        )
    elif distributed:
        ring = bucket_bytes("allreduce", n_params, world, num_objectives=1)["all_reduce"]
        comm = {"allreduce_bytes": ring}
        log(f"\ncomm, rank 0, last step: plain DDP ring all-reduce, ~{ring / 1e3:.1f} kB (no hook)")
    else:
        comm = {}
    per_step = train_time / max(end - start, 1)
    log(f"done in {train_time:.1f}s of training ({per_step * 1e3:.0f} ms/step)")

    if master and args.out is not None:
        summary = {
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
            | {"world_size": world},
            "steps": [
                {"step": s + 1, "lr": lr_at(s, args), "loss": loss}
                for s, loss in enumerate(history["losses"])
            ],
            "evals": history["evals"],
            "eval": {
                code: {
                    "set": "seen" if code in langs else "unseen",
                    "bpb_start": bpb_start.get(code),
                    "bpb": bpb[code],
                }
                for code in langs + unseen
            },
            "mean_bpb": {"seen": mean(langs, bpb), "unseen": mean(unseen, bpb)},
            "probe": probe,
            "comm": comm,
            "train_seconds": train_time,
            "resumed_at": start or None,
        }
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
