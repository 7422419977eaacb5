"""Ranks of the DeepSpeed tests: ZeRO engines on gloo (CPU accelerator), with and without
bucket-MOO, recording what each rank's gradient was and what the engine reduced."""

import contextlib
import importlib
import logging
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from bucketmoo_hooks import BucketMOOState, install_bucket_moo

IN, HIDDEN, OUT, BATCH = 6, 10, 5, 4


@contextlib.contextmanager
def deepspeed_on_cpu() -> Iterator[Any]:
    """``deepspeed``, with its shared-memory comm op not built (minutes of compilation the
    first time; gloo serves the CPU collectives without it) and the layout it reads from the
    environment set (the process group exists already); both undone after."""
    import deepspeed

    comm_torch = importlib.import_module(
        "deepspeed.comm.torch"
    )  # ``deepspeed.comm.torch`` is torch
    saved_build, saved_env = comm_torch.build_shm_op, dict(os.environ)
    comm_torch.build_shm_op = lambda: None
    rank, world_size = dist.get_rank(), dist.get_world_size()
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT="29500",
    )
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    try:
        yield deepspeed
    finally:
        comm_torch.build_shm_op = saved_build
        os.environ.clear()
        os.environ.update(saved_env)


class Net(nn.Module):
    """A shared body and one output head per language (``heads`` of them, or one shared): a
    rank trains its own head only, which its objective is then alone to be present on."""

    def __init__(self, heads: int = 1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(HIDDEN, OUT) for _ in range(heads))

    def forward(self, x: torch.Tensor, head: int = 0) -> torch.Tensor:
        hidden = self.body(x)
        # Every head runs (ZeRO needs a gradient for every parameter on every rank); the other
        # languages' heads get zero gradients.
        return sum((h(hidden) * float(i == head) for i, h in enumerate(self.heads)), 0.0)


def config(
    stage: int,
    *,
    dtype: str = "fp32",
    reduce_scatter: bool = True,
    overlap_comm: bool = False,
    accumulation: int = 1,
    bucket: int = 40,
    **zero: Any,
) -> dict[str, Any]:
    """A ZeRO config whose buckets split the model (``bucket`` elements: several buckets, and
    parameters larger than a bucket), with SGD at learning rate 1 (the step is the gradient)."""
    settings = {
        "train_micro_batch_size_per_gpu": BATCH,
        "gradient_accumulation_steps": accumulation,
        "optimizer": {"type": "SGD", "params": {"lr": 1.0}},
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {
            "stage": stage,
            "reduce_scatter": reduce_scatter,
            "overlap_comm": overlap_comm,
            "reduce_bucket_size": bucket,
            "allgather_bucket_size": bucket,
            **zero,
        },
        "steps_per_print": 10**9,
    }
    if stage == 3:
        settings["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        settings["zero_optimization"]["stage3_prefetch_bucket_size"] = bucket
    if dtype == "bf16":
        settings["bf16"] = {"enabled": True}
    return settings


def batches(rank: int, steps: int, accumulation: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's micro-batches (its objective's data), alike in every run."""
    generator = torch.Generator().manual_seed(1000 + rank)
    return [
        (torch.randn(BATCH, IN, generator=generator), torch.randn(BATCH, OUT, generator=generator))
        for _ in range(steps * accumulation)
    ]


def _full(engine: Any, what: str = "param") -> torch.Tensor:
    """Every parameter's full fp32 value (master copy), or with ``what="grad"`` its reduced
    gradient, flat."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    read = safe_get_full_grad if what == "grad" else safe_get_full_fp32_param
    return torch.cat([read(p).reshape(-1).float() for p in engine.module.parameters()])


def head_of(rank: int, objective_of_rank: list | None) -> int:
    """The head of this rank's objective (objectives in order of first appearance)."""
    if objective_of_rank is None:
        return rank
    return list(dict.fromkeys(objective_of_rank)).index(objective_of_rank[rank])


def train(
    rank: int,
    settings: dict[str, Any],
    state: BucketMOOState | None,
    steps: int = 2,
    heads: int = 1,
    read_grads: bool = True,
) -> dict[str, Any]:
    """``steps`` optimizer steps of a ZeRO engine (with bucket-MOO if ``state``). Per step: this
    rank's own gradient of every micro-batch (from a plain copy of the model at the step's
    parameters) and the gradient the engine reduced; at the end, the parameters.

    ``heads``: one output head per objective (language-specific parameters), else one shared.
    ``read_grads=False``: parameters only (DeepSpeed's ``safe_get_full_grad``, which reads the
    reduced gradient, fails under ``round_robin_gradients``).
    """
    with deepspeed_on_cpu() as deepspeed:
        model = Net(heads)
        engine, *_ = deepspeed.initialize(
            model=model, config=settings, model_parameters=model.parameters()
        )
        installation = None if state is None else install_bucket_moo(engine, state)
        accumulation = settings["gradient_accumulation_steps"]
        dtype = next(engine.module.parameters()).dtype
        head = 0 if heads == 1 else head_of(rank, state and state.objective_of_rank)
        own, reduced = [], []
        data = batches(rank, steps, accumulation)
        for step in range(steps):
            plain = Net(heads).to(dtype)
            values = _full(engine)
            torch.nn.utils.vector_to_parameters(values.to(dtype), plain.parameters())
            micro = []
            for x, y in data[step * accumulation : (step + 1) * accumulation]:
                for module, sink in ((plain, micro), (engine, None)):
                    loss = nn.functional.mse_loss(module(x.to(dtype), head).float(), y)
                    if sink is None:
                        engine.backward(loss)
                        if read_grads and engine.is_gradient_accumulation_boundary():
                            reduced.append(_full(engine, "grad"))
                        engine.step()
                    else:
                        grads = torch.autograd.grad(loss, list(plain.parameters()))
                        sink.append(torch.cat([g.reshape(-1).float() for g in grads]))
            own.append(torch.stack(micro))
        result = {
            "own": torch.stack(own),  # [steps, micro-batches, N]
            "reduced": torch.stack(reduced) if reduced else None,  # [steps, N]
            "params": _full(engine),
            "sizes": [p.numel() for p in Net(heads).parameters()],
        }
        if state is not None:
            result.update(
                iter=state.iter,
                engine=installation.engine,
                stage=installation.zero_stage,
                sent=state.ledger.last_step_bytes(),
                allreduce=state.ledger.last_step_allreduce_bytes(),
                buckets=len(state.ledger.last_step),
                # Per bucket of the last step: (elements, element size, bytes by collective).
                traffic=[(t.numel, t.element_size, dict(t.sent)) for t in state.ledger.last_step],
                links=state.ledger.last_step_link_bytes(),
                reduce_scatter=engine.optimizer.reduce_scatter,
            )
            state.close()
        engine.destroy()
        return result


def zero_cases(rank: int, world_size: int, cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every case of the matrix: ``{"config": ..., "state": BucketMOOState kwargs or None}``."""
    results = []
    for case in cases:
        state = None if case["state"] is None else BucketMOOState(**case["state"])
        results.append(
            train(
                rank,
                case["config"],
                state,
                case.get("steps", 2),
                case.get("heads", 1),
                case.get("read_grads", True),
            )
        )
    return results


def refusals(rank: int, world_size: int, cases: list[tuple[dict, dict]]) -> list[str]:
    """What ``install_bucket_moo`` raises for each ``(config, state kwargs)``; the kwargs
    ``"twice": True`` installs a second state on the same engine."""
    messages = []
    with deepspeed_on_cpu() as deepspeed:
        for settings, state_kwargs in cases:
            model = Net()
            engine, *_ = deepspeed.initialize(
                model=model, config=settings, model_parameters=model.parameters()
            )
            kwargs = dict(state_kwargs)
            try:
                if kwargs.pop("twice", False):
                    install_bucket_moo(engine, BucketMOOState(**kwargs))
                install_bucket_moo(engine, BucketMOOState(**kwargs))
            except (ValueError, TypeError, RuntimeError) as error:
                messages.append(f"{type(error).__name__}: {error}")
            else:
                messages.append("installed")
            engine.destroy()
    return messages


def trainer_with_deepspeed(rank: int, world_size: int, stage: int) -> dict[str, Any]:
    """``transformers.Trainer`` with a DeepSpeed dict config, one language per rank, bucket-MOO
    installed by the callback (:func:`_integration_workers.trained_by_trainer`)."""
    from _integration_workers import trained_by_trainer
    from deepspeed.utils import safe_get_full_fp32_param

    deepspeed_config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 2,
        "zero_optimization": {"stage": stage, "reduce_bucket_size": 20000},
        "zero_allow_untested_optimizer": True,
    }
    with deepspeed_on_cpu(), tempfile.TemporaryDirectory() as output_dir:
        trainer, state, callback = trained_by_trainer(
            rank, world_size, 3, output_dir, deepspeed=deepspeed_config
        )
        engine = trainer.model_wrapped
        params = torch.cat(
            [safe_get_full_fp32_param(p).reshape(-1) for p in engine.module.parameters()]
        )
        result = {
            "engine": callback.installation.engine,
            "stage": callback.installation.zero_stage,
            "iter": state.iter,
            "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
            "params": params,
            "sent": state.ledger.last_step_bytes(),
            "allreduce": state.ledger.last_step_allreduce_bytes(),
        }
        state.close()
        engine.destroy()
        return result
