"""Bucket-level MOO under Hugging Face ``accelerate``: one language per process, DDP or FSDP.

    accelerate launch --multi_gpu --num_processes 2 scripts/accelerate_example.py            # DDP
    accelerate launch --multi_gpu --num_processes 2 scripts/accelerate_example.py --fsdp 2   # FSDP2

(``--multi_gpu`` selects accelerate's torchrun launcher; the script itself runs on the CPU with
gloo, ``Accelerator(cpu=True)``.)

Process ``r`` trains a tiny byte-level next-byte model on language ``r`` of the vendored UDHR
sample. ``Accelerator.prepare`` wraps the model (DDP, or FSDP2 with one unit per block), and
``install_bucket_moo`` replaces the gradient average by the conflict-aware combination in every
bucket or FSDP unit. Gradient accumulation goes through ``accelerator.accumulate``. Nothing is
downloaded. Prints each language's held-out loss before and after, and what the hook sent
against the collective it replaces.
"""

import argparse
import json
import math

import torch
from accelerate import Accelerator, DistributedType, FullyShardedDataParallelPlugin, PartialState
from torch import nn

from bucketmoo_hooks import BucketMOOState, install_bucket_moo, weighting_names
from bucketmoo_hooks.data import load_udhr, udhr_split

CONTEXT = 8  # bytes of context per prediction


class Block(nn.Module):
    """Residual MLP block: one FSDP unit each."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class ByteModel(nn.Module):
    """Next-byte prediction from the previous ``CONTEXT`` bytes."""

    def __init__(self, width: int = 64, blocks: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, width // 4)
        self.proj = nn.Linear(CONTEXT * (width // 4), width)
        self.blocks = nn.Sequential(*(Block(width) for _ in range(blocks)))
        self.head = nn.Linear(width, 256)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.proj(self.embed(context).flatten(1))))


def windows(text: str) -> torch.Tensor:
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    return data.unfold(0, CONTEXT + 1, 1)  # [N, CONTEXT + 1]: context and target


def loss_of(model: nn.Module, rows: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(rows[:, :CONTEXT]), rows[:, CONTEXT])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # FSDP1 is served too (install_bucket_moo), but accelerate 1.15 cannot build it on the CPU
    # (its device_id cpu:0 does not match the parameters' cpu).
    parser.add_argument("--fsdp", type=int, choices=(0, 2), default=0, help="0: DDP, 2: FSDP2")
    parser.add_argument("--languages", default="eng,rus,jpn,arb")
    parser.add_argument("--weighting", default="mgda", choices=weighting_names())
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--accumulate", type=int, default=2, help="micro-batches per step")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--json", help="write the results here (rank 0)")
    args = parser.parse_args()

    plugin = None
    if args.fsdp:
        plugin = FullyShardedDataParallelPlugin(
            fsdp_version=args.fsdp,
            auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=["Block"],
        )
    accelerator = Accelerator(
        cpu=True, fsdp_plugin=plugin, gradient_accumulation_steps=args.accumulate
    )
    if plugin is not None and accelerator.distributed_type == DistributedType.MULTI_CPU:
        # accelerate (1.15) wraps CPU runs in DDP even when given an FSDP plugin (on GPUs it
        # shards); switch its shared state to FSDP, as it does itself on GPUs, so that this CPU
        # demo runs accelerate's FSDP path.
        PartialState().distributed_type = DistributedType.FSDP
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
    rank, world_size = accelerator.process_index, accelerator.num_processes
    languages = args.languages.split(",")
    language_of_rank = [languages[r % len(languages)] for r in range(world_size)]
    texts = load_udhr(sorted(set(language_of_rank)))
    train, valid = udhr_split(texts[language_of_rank[rank]])
    train_rows, valid_rows = windows("\n".join(train)), windows("\n".join(valid))[:2048]

    torch.manual_seed(0)  # the same initial model on every process
    model = ByteModel()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    state = BucketMOOState(objective_of_rank=language_of_rank, weighting=args.weighting)
    path = install_bucket_moo(model, state).engine  # "ddp", "fsdp1" or "fsdp2"

    def held_out() -> float:
        with torch.no_grad():
            return loss_of(model, valid_rows).item() / math.log(2)  # bits per byte

    start = held_out()
    generator = torch.Generator().manual_seed(1000 + rank)
    for _ in range(args.steps):
        for _ in range(args.accumulate):
            rows = train_rows[torch.randint(len(train_rows), (args.batch,), generator=generator)]
            with accelerator.accumulate(model):
                accelerator.backward(loss_of(model, rows))
                optimizer.step()
                optimizer.zero_grad()
    end = held_out()

    losses = accelerator.gather(torch.tensor([[start, end]])).tolist()
    ledger = state.ledger
    plain = (
        ledger.last_step_allreduce_bytes()
        if path == "ddp"
        else ledger.last_step_reduce_scatter_bytes()
    )
    if accelerator.is_main_process:
        print(
            f"{world_size} processes ({path}, {args.weighting}), {state.iter} steps of "
            f"{args.accumulate} x {args.batch} windows per process"
        )
        for language, (before, after) in zip(language_of_rank, losses, strict=True):
            print(f"{language}: held-out bits per byte {before:.3f} -> {after:.3f}")
        sent = ledger.last_step_bytes()
        print(
            f"comm, rank 0, last step: hook sent {sent} bytes over {len(ledger.last_step)} "
            f"{'buckets' if path == 'ddp' else 'FSDP units'}; "
            f"{'all-reduce' if path == 'ddp' else 'reduce-scatter'} of the same: {plain} bytes"
        )
        if args.json:
            results = {
                "path": path,
                "steps": state.iter,
                "languages": language_of_rank,
                "losses": losses,
                "sent": sent,
                "plain": plain,
                "buckets": len(ledger.last_step),
            }
            with open(args.json, "w", encoding="utf-8") as handle:
                json.dump(results, handle)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
