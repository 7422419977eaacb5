"""Ranks of the integration tests: the dispatching installer and the Trainer callback."""

import os
import tempfile
from typing import Any

import torch
from _ddp_workers import make_model
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
from torch.nn.parallel import DistributedDataParallel

from bucketmoo_hooks import BucketMOOState, install_bucket_moo
from bucketmoo_hooks.data import load_udhr

LANGUAGES = ("eng", "rus")
CONTEXT = 16


def installed_paths(rank: int, world_size: int) -> dict[str, str]:
    """What ``install_bucket_moo`` chooses for each wrapper (or the error it raises)."""
    fsdp2 = make_model((7,), torch.float32)
    fully_shard(fsdp2[0])
    fully_shard(fsdp2)
    models = {
        "ddp": DistributedDataParallel(make_model((7,), torch.float32)),
        "fsdp1": FullyShardedDataParallel(
            make_model((7,), torch.float32), device_id=torch.device("cpu")
        ),
        "fsdp2": fsdp2,
        "plain": make_model((7,), torch.float32),
    }
    paths = {}
    for name, model in models.items():
        try:
            paths[name] = install_bucket_moo(model, BucketMOOState()).engine
        except TypeError as error:
            paths[name] = f"TypeError: {error}"
    return paths


class _Windows(torch.utils.data.Dataset):
    """Byte windows of one language, as causal-LM examples."""

    def __init__(self, text: str, count: int) -> None:
        data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
        self.rows = data.unfold(0, CONTEXT, CONTEXT // 2)[:count]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[index], "labels": self.rows[index]}


def trained_by_trainer(
    rank: int, world_size: int, steps: int, output_dir: str, **arguments: Any
) -> tuple[Any, BucketMOOState, Any]:
    """A tiny GPT-2 (built from a config: nothing downloaded) trained by ``transformers.Trainer``
    for ``steps`` steps of 2 micro-batches on this rank's language, with bucket-MOO (UPGrad)
    installed by the callback; ``arguments``: more ``TrainingArguments`` (e.g. ``deepspeed=``).
    Returns the trainer, the state and the callback."""
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    from bucketmoo_hooks.trainer import BucketMOOCallback

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=256, n_positions=CONTEXT, n_embd=32, n_layer=2, n_head=2)
    model = GPT2LMHeadModel(config)
    # Equal lengths on every rank: the distributed sampler then gives each rank its own data.
    dataset = _Windows(load_udhr([LANGUAGES[rank]])[LANGUAGES[rank]][0] * 4, count=64)
    args = TrainingArguments(
        output_dir=output_dir,
        use_cpu=True,
        max_steps=steps,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        **arguments,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    state = BucketMOOState(objective_of_rank=LANGUAGES[:world_size], weighting="upgrad")
    callback = BucketMOOCallback(trainer, state)
    trainer.add_callback(callback)
    trainer.train()
    return trainer, state, callback


def train_with_trainer(rank: int, world_size: int, steps: int) -> dict[str, Any]:
    """:func:`trained_by_trainer` (DDP, through accelerate). (Also returns
    :func:`installed_paths`, to share the launch.)"""
    paths = installed_paths(rank, world_size)
    # The process group exists already; accelerate reads the layout from the environment.
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    with tempfile.TemporaryDirectory() as output_dir:
        trainer, state, callback = trained_by_trainer(rank, world_size, steps, output_dir)
    model = trainer.model
    ledger = state.ledger
    return {
        "path": callback.installation.engine,
        "iter": state.iter,
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "params": torch.cat([p.detach().flatten() for p in model.parameters()]),
        "sent": ledger.last_step_bytes(),
        "allreduce": ledger.last_step_allreduce_bytes(),
        "buckets": len(ledger.last_step),
        "installed_paths": paths,
    }
