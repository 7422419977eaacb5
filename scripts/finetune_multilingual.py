"""Train a tiny byte-level GPT from scratch on several languages, one language per DDP rank.

Every rank computes the gradient of its own language; the bucket-MOO comm hook then combines the
per-language gradients in every DDP bucket with a multi-objective weighting (MGDA by default)
instead of DDP's plain average. ``--weighting ddp`` is the control: plain DDP, no hook.

    torchrun --nproc-per-node 4 scripts/finetune_multilingual.py
    torchrun --nproc-per-node 4 scripts/finetune_multilingual.py --weighting ddp
    torchrun --nproc-per-node 2 scripts/finetune_multilingual.py --languages eng,rus,jpn,arb,hin
    torchrun --nproc-per-node 4 scripts/finetune_multilingual.py --device cuda

Data: the vendored UDHR sample (51 aligned paragraphs per language, ``bucketmoo_hooks.data``),
tokenised as raw UTF-8 bytes. Rank 0 prints the per-language training loss, then bits per byte on
held-out paragraphs of the trained ("seen") languages and of ``--unseen`` ones nobody trains.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from bucketmoo_hooks import BucketMOOState, register_bucket_moo_hook, ring_allreduce_bytes
from bucketmoo_hooks.data import load_udhr, udhr_languages, udhr_split

TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
LAUNCH = "torchrun --nproc-per-node 4 scripts/finetune_multilingual.py [options]"

# -- model ----------------------------------------------------------------------------------------


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

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(positions)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="mean")
        return logits, loss


# -- data -----------------------------------------------------------------------------------------


def encode(paragraphs: list[str]) -> Tensor:
    """UTF-8 bytes of the paragraphs, one per line, as a long tensor of token ids."""
    return torch.tensor(list("\n".join(paragraphs).encode("utf-8")), dtype=torch.long)


def get_batch(
    data: Tensor, batch_size: int, context: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Random windows of ``context + 1`` bytes: inputs and next-byte targets."""
    starts = torch.randint(len(data) - context, (batch_size, 1), generator=generator)
    windows = data[starts + torch.arange(context + 1)]
    return windows[:, :-1], windows[:, 1:]


def language_index(rank: int, step: int, world: int, n_languages: int) -> int:
    """Which language ``rank`` trains at ``step`` (0-based).

    Static when there are at least as many ranks as languages (ranks ``r, r + L, ...`` form the
    group of language ``r``); otherwise the ranks rotate through the languages, ``world`` distinct
    ones per step, so every language is trained equally often.
    """
    if world >= n_languages:
        return rank % n_languages
    return (rank + step * world) % n_languages


@torch.no_grad()
def nats_and_bytes(model: GPT, data: Tensor, device: torch.device) -> tuple[float, int]:
    """Summed next-byte cross-entropy (nats) over ``data`` and the number of bytes predicted.

    Non-overlapping windows of ``context`` bytes, so every byte after the first is predicted
    exactly once (with whatever context its window gives it).
    """
    context = model.cfg.context
    n = len(data) - 1
    full = n // context * context
    chunks = [(data[:full].view(-1, context), data[1 : full + 1].view(-1, context))]
    if full < n:  # the tail, as one shorter window
        chunks.append((data[full:n].view(1, -1), data[full + 1 :].view(1, -1)))
    nats = 0.0
    for x, y in chunks:
        if x.numel() == 0:
            continue
        logits, _ = model(x.to(device))
        nats += F.cross_entropy(
            logits.flatten(0, 1), y.to(device).flatten(), reduction="sum"
        ).item()
    return nats, n


def evaluate(
    model: GPT, valid: dict[str, Tensor], rank: int, world: int, device: torch.device
) -> dict[str, float]:
    """Bits per byte of every language; languages are split over the ranks, then summed."""
    model.eval()
    stats = torch.zeros(len(valid), 2, dtype=torch.float64, device=device)
    for i, data in enumerate(valid.values()):
        if i % world == rank:
            nats, count = nats_and_bytes(model, data, device)
            stats[i, 0], stats[i, 1] = nats, count
    dist.all_reduce(stats)
    model.train()
    return {
        code: float(nats / count / math.log(2))
        for code, (nats, count) in zip(valid, stats.tolist(), strict=True)
    }


# -- training -------------------------------------------------------------------------------------


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warmup, then cosine decay to ``lr / 10`` at the last step."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - 1 - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--languages", default="eng,rus,jpn,arb", help="trained UDHR codes, comma-separated")
    add("--unseen", default="ukr,deu_1996", help="UDHR codes only evaluated (held out)")
    add("--weighting", choices=["mgda", "mean", "ddp"], default="mgda", help="ddp: no hook")
    add("--steps", type=int, default=400)
    add("--batch-size", type=int, default=32, help="windows per rank per step")
    add("--lr", type=float, default=3e-3)
    add("--warmup", type=int, default=None, help="warmup steps (default: steps // 10)")
    add("--weight-decay", type=float, default=0.01)
    add("--grad-clip", type=float, default=1.0, help="max gradient norm; 0 disables clipping")
    add("--context", type=int, default=64)
    add("--n-layer", type=int, default=2)
    add("--n-head", type=int, default=4)
    add("--d-model", type=int, default=64)
    add("--bucket-cap-mb", type=float, default=0.05, help="small, so the model has many buckets")
    add("--valid-fraction", type=float, default=0.2, help="held-out share of the paragraphs")
    add("--log-every", type=int, default=25)
    add("--seed", type=int, default=1337)
    add("--device", choices=["cpu", "cuda"], default="cpu")
    add("--threads", type=int, default=1, help="torch threads per rank on CPU")
    add("--json", metavar="PATH", default=None, help="write losses and final eval here (rank 0)")
    args = parser.parse_args(argv)

    available = udhr_languages()
    args.languages = [c for c in args.languages.split(",") if c]
    # A trained language is reported as seen, never also as unseen.
    args.unseen = [c for c in args.unseen.split(",") if c and c not in args.languages]
    unknown = [c for c in args.languages + args.unseen if c not in available]
    if unknown:
        parser.error(f"unknown language code(s) {unknown}; available: {', '.join(available)}")
    if not args.languages or len(set(args.languages)) != len(args.languages):
        parser.error(f"--languages needs distinct codes, got {args.languages}")
    if min(args.steps, args.batch_size, args.log_every, args.context, args.threads) < 1:
        parser.error("--steps, --batch-size, --log-every, --context and --threads must be >= 1")
    if args.d_model % args.n_head:
        parser.error(f"--d-model {args.d_model} is not divisible by --n-head {args.n_head}")
    if args.warmup is None:
        args.warmup = max(1, args.steps // 10)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    missing = [name for name in TORCHRUN_ENV if name not in os.environ]
    if missing:
        parser.error(
            f"the torchrun environment is missing ({', '.join(missing)} unset); "
            f"this script runs one process per rank, launch it as:\n  {LAUNCH}"
        )
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if args.device == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise SystemExit(
                f"--device cuda: LOCAL_RANK {local_rank} needs cuda:{local_rank}, but only "
                f"{torch.cuda.device_count()} GPU(s) are visible; use one process per GPU"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl"  # gloo for the hook's small host-side exchange
    else:
        device = torch.device("cpu")
        torch.set_num_threads(args.threads)  # the ranks share the machine's cores
        backend = "gloo"
    # device_id binds NCCL to this rank's GPU up front (and tells barrier() which one to use).
    dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    train(args, rank, world, device)
    # Wait until every rank is done before tearing down. The barrier also gives gloo's worker
    # threads (waiting here for the GIL) time to drop the tensors of the last collective: one
    # still holding them once the interpreter shuts down aborts the process (SIGABRT).
    dist.barrier()
    dist.destroy_process_group()


def train(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> None:
    master = rank == 0
    langs, n_langs = args.languages, len(args.languages)
    rotate = world < n_langs

    def log(message: str) -> None:
        if master:
            print(message, flush=True)

    # Data: identical splits on every rank (udhr_split is deterministic).
    texts = load_udhr(langs + args.unseen)
    train_data: dict[str, Tensor] = {}
    valid_data: dict[str, Tensor] = {}
    for code, paragraphs in texts.items():
        train_part, valid_part = udhr_split(paragraphs, args.valid_fraction)
        train_data[code], valid_data[code] = encode(train_part), encode(valid_part)
        if len(train_data[code]) <= args.context:
            raise ValueError(f"{code}: {len(train_data[code])} training bytes < context")

    # Same seed everywhere, so every rank builds the same initial model (DDP would broadcast
    # rank 0's anyway); the batches come from a per-rank stream seeded by (seed, rank).
    torch.manual_seed(args.seed)
    cfg = GPTConfig(args.context, args.n_layer, args.n_head, args.d_model)
    model = GPT(cfg).to(device)
    batches = torch.Generator().manual_seed(args.seed * 1_000_003 + rank)

    ddp = DDP(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        bucket_cap_mb=args.bucket_cap_mb,
    )
    state = None
    if args.weighting != "ddp":
        # Static assignment: declare the whole map once; rotation: each rank sets it every step.
        static_map = (
            None if rotate else [langs[language_index(r, 0, world, n_langs)] for r in range(world)]
        )
        state = BucketMOOState(objective_of_rank=static_map, weighting=args.weighting)
        register_bucket_moo_hook(ddp, state)

    # Decay matrices only (nanoGPT): biases, LayerNorms and position embeddings stay undecayed.
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.95),
    )

    n_params = sum(p.numel() for p in params)
    log(
        f"{world} ranks on {device.type} ({dist.get_backend()}), weighting={args.weighting}, "
        f"{n_params / 1e3:.1f}k params, bucket cap {args.bucket_cap_mb} MB, "
        f"{args.steps} steps x {args.batch_size} x {args.context} bytes per rank"
    )
    if rotate:
        log(
            f"languages: {' '.join(langs)}, rotating: rank r trains language (r + step*{world}) "
            f"mod {n_langs}"
        )
    else:
        log(
            "rank -> language: "
            + "  ".join(f"{r}:{langs[language_index(r, 0, world, n_langs)]}" for r in range(world))
        )
    log("train bytes: " + "  ".join(f"{c} {len(train_data[c])}" for c in langs))
    log(f"unseen (eval only): {' '.join(args.unseen) or '-'}")

    bpb_start = evaluate(model, valid_data, rank, world, device)

    # Losses stay on the device until a log step gathers them (no host sync every step).
    step_losses = torch.zeros(args.steps, device=device)
    losses: list[dict[str, float]] = []  # per step: language -> loss (mean over its ranks)
    logged = 0
    log("train loss, nats per byte (each language's mean since the previous line):")
    t0 = time.perf_counter()
    for step in range(args.steps):
        lang = langs[language_index(rank, step, world, n_langs)]
        if state is not None and rotate:
            state.set_objective(lang)  # before backward: the hook reads it at bucket 0
        lr = lr_at(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr

        x, y = get_batch(train_data[lang], args.batch_size, args.context, batches)
        _, loss = ddp(x.to(device), y.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # DDP (or the hook) combines the gradients of all languages here
        if args.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        step_losses[step] = loss.detach()

        done = step + 1
        if done % args.log_every and done != 1 and done != args.steps:
            continue
        # Gather every rank's losses since the last log line; the schedule says which language
        # each value belongs to, so ranks of the same language are averaged.
        window = step_losses[logged:done].contiguous()
        gathered = [torch.empty_like(window) for _ in range(world)]
        dist.all_gather(gathered, window)
        per_rank = torch.stack(gathered).tolist()
        for offset, s in enumerate(range(logged, done)):
            sums: dict[str, list[float]] = {}
            for r in range(world):
                sums.setdefault(langs[language_index(r, s, world, n_langs)], []).append(
                    per_rank[r][offset]
                )
            losses.append({c: sum(v) / len(v) for c, v in sums.items()})
        shown = []
        for code in langs:
            values = [step_loss[code] for step_loss in losses[logged:] if code in step_loss]
            shown.append(f"{code} {sum(values) / len(values):.3f}" if values else f"{code}   -  ")
        logged = done
        elapsed = time.perf_counter() - t0
        log(f"step {done:4d}/{args.steps} | {'  '.join(shown)} | lr {lr:.1e} | {elapsed:5.1f}s")
    train_time = time.perf_counter() - t0

    bpb = evaluate(model, valid_data, rank, world, device)
    seen_mean = sum(bpb[c] for c in langs) / n_langs
    unseen_mean = sum(bpb[c] for c in args.unseen) / len(args.unseen) if args.unseen else None
    n_valid = math.ceil(round(args.valid_fraction * len(texts[langs[0]]), 9))
    log(f"\nbits per byte on held-out paragraphs (last {n_valid} of {len(texts[langs[0]])}):")
    log(f"{'lang':<14}{'set':<8}{'start':>7}{'final':>7}")
    for code in langs + args.unseen:
        kind = "seen" if code in langs else "unseen"
        log(f"{code:<14}{kind:<8}{bpb_start[code]:7.3f}{bpb[code]:7.3f}")
    log(f"{'mean':<14}{'seen':<8}{sum(bpb_start[c] for c in langs) / n_langs:7.3f}{seen_mean:7.3f}")
    if unseen_mean is not None:
        start_unseen = sum(bpb_start[c] for c in args.unseen) / len(args.unseen)
        log(f"{'mean':<14}{'unseen':<8}{start_unseen:7.3f}{unseen_mean:7.3f}")

    comm: dict[str, object]
    if state is not None:
        sent, ring = state.ledger.last_step_bytes(), state.ledger.last_step_allreduce_bytes()
        buckets = len(state.ledger.last_step)
        comm = {"hook_bytes": sent, "allreduce_bytes": ring, "buckets": buckets}
        log(
            f"\ncomm, rank 0, last step: hook sent {sent / 1e3:.1f} kB over {buckets} buckets; "
            f"a ring all-reduce of the same buckets sends {ring / 1e3:.1f} kB "
            f"({sent / ring:.3f}x)"
        )
    else:
        ring = ring_allreduce_bytes(n_params, 4, world)
        comm = {"allreduce_bytes": ring}
        log(f"\ncomm, rank 0, last step: plain DDP ring all-reduce, ~{ring / 1e3:.1f} kB (no hook)")
    log(f"done in {train_time:.1f}s of training ({train_time / args.steps * 1e3:.0f} ms/step)")

    if master and args.json:
        result = {
            "config": vars(args) | {"world_size": world},
            "steps": [
                {"step": s + 1, "lr": lr_at(s, args), "loss": step_loss}
                for s, step_loss in enumerate(losses)
            ],
            "eval": {
                code: {
                    "set": "seen" if code in langs else "unseen",
                    "bpb_start": bpb_start[code],
                    "bpb": bpb[code],
                }
                for code in langs + args.unseen
            },
            "mean_bpb": {"seen": seen_mean, "unseen": unseen_mean},
            "comm": comm,
            "train_seconds": train_time,
        }
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
