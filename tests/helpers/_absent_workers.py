"""Language-specific parameters: workers for ``test_absent.py`` (spawned processes import them).

The model has a shared trunk and head and one adapter per language; each rank runs its
language's adapter only, so the other adapters get no gradient there (DDP with
``find_unused_parameters=True`` zero-fills them, FSDP2 reduces their zeros).
"""

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from _ddp_workers import every_rank_bucket
from _fsdp_workers import CPU, full_parameters, gather_rows
from torch import Tensor, nn
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from bucketmoo_hooks import (
    BucketMOOState,
    _core,
    bucket_moo_hook,
    install_bucket_moo,
)

LANGUAGES = ("de", "fr")  # one adapter each; both also share the Latin-script adapter
OBJECTIVES = ("de", "fr", "fr")  # rank → language (3 ranks: fr averages two)
#: With Russian (no adapter of its own, not Latin-script) the Latin adapter has 2 of 3 languages.
THREE_LANGUAGES = ("de", "fr", "ru")
WIDTH = 6


class AdapterModel(nn.Module):
    """``head(h + adapter[lang](h) + latin(h))``, ``h = tanh(trunk(x))``: trunk and head are
    shared, each adapter is its language's, ``latin`` is de's and fr's."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(WIDTH, WIDTH)
        self.adapters = nn.ModuleDict({lang: nn.Linear(WIDTH, WIDTH) for lang in LANGUAGES})
        self.latin = nn.Linear(WIDTH, WIDTH, bias=False)
        self.head = nn.Linear(WIDTH, 3)

    def forward(self, x: Tensor, language: str) -> Tensor:
        h = torch.tanh(self.trunk(x))
        if language in LANGUAGES:
            h = h + self.adapters[language](h) + self.latin(h)
        return self.head(h)


def adapter_positions(model: nn.Module) -> dict[str, list[int]]:
    """Positions of each language's adapter among ``model``'s trainable parameters."""
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    return {
        lang: [i for i, n in enumerate(names) if f"adapters.{lang}." in n] for lang in LANGUAGES
    }


def loss_of(model: nn.Module, rank: int, step: int, language: str) -> Tensor:
    generator = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(5, WIDTH, generator=generator)
    target = torch.randn(5, 3, generator=generator) + rank
    return nn.functional.mse_loss(model(x, language), target)


@dataclass(frozen=True)
class AdapterRun:
    name: str
    weighting: str = "mgda"
    granularity: str = "bucket"
    #: DDP's bucket cap: tiny puts every parameter in a bucket of its own, large shares one.
    bucket_cap_mb: float = 25.0
    absent: str = "exclude"
    #: Register with install_bucket_moo (no per-bucket capture) instead of a raw hook.
    registered: bool = False
    steps: int = 2
    #: The language of every rank.
    objectives: tuple[str, ...] = OBJECTIVES
    #: protocol="sketch" with this sketch_size; None: the shard protocol.
    sketch_size: int | None = None
    #: protocol="hierarchical" on simulated nodes of this many ranks.
    ranks_per_node: int | None = None

    @property
    def protocol(self) -> str:
        if self.ranks_per_node is not None:
            return "hierarchical"
        return "shard" if self.sketch_size is None else "sketch"


def local_gradients(model: nn.Module, rank: int, step: int, language: str) -> Tensor:
    """This rank's own flat gradient of the trainable parameters (zeros for unused ones), from a
    plain copy."""
    shadow = copy.deepcopy(model)
    shadow.zero_grad(set_to_none=True)
    loss_of(shadow, rank, step, language).backward()
    return torch.cat(
        [
            torch.zeros(p.numel()) if p.grad is None else p.grad.flatten()
            for p in shadow.parameters()
            if p.requires_grad
        ]
    )


def ddp_run(rank: int, world_size: int, run: AdapterRun) -> dict[str, Any]:
    language = run.objectives[rank]
    model = AdapterModel()
    ddp = DistributedDataParallel(
        model, bucket_cap_mb=run.bucket_cap_mb, find_unused_parameters=True
    )
    state = BucketMOOState(
        run.objectives,
        weighting=run.weighting,
        granularity=run.granularity,
        absent=run.absent,
        protocol=run.protocol,
        sketch_size=run.sketch_size,
        ranks_per_node=run.ranks_per_node,
    )
    position = {id(p): i for i, p in enumerate(model.parameters())}
    records: list[dict[str, Any]] = []
    step = 0

    def capture(state: BucketMOOState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
        _, inputs = every_rank_bucket(bucket, world_size)
        future = bucket_moo_hook(state, bucket)
        records.append(
            {
                "step": step,
                "index": bucket.index(),
                "inputs": inputs,
                "future": future,
                "params": [position[id(p)] for p in bucket.parameters()],
                "sizes": [p.numel() for p in bucket.parameters()],
            }
        )
        return future

    if run.registered:
        install_bucket_moo(ddp, state)
    else:
        state._runtime.parameter_index = position  # as install_bucket_moo does
        ddp.register_comm_hook(state, capture)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    steps = []
    for step in range(run.steps):
        own = local_gradients(model, rank, step, language)
        loss_of(ddp, rank, step, language).backward()
        for record in (r for r in records if r["step"] == step):
            record["output"] = record.pop("future").value().clone()
        steps.append(
            {
                "local": gather_rows(own),
                "reduced": torch.cat([p.grad.flatten() for p in model.parameters()]),
            }
        )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"records": records, "steps": steps}


def checks_presence(find_unused_parameters: bool, static_graph: bool) -> bool:
    """Whether a state registered on such a DDP model checks which objectives are present."""
    ddp = DistributedDataParallel(
        nn.Linear(2, 2), find_unused_parameters=find_unused_parameters, static_graph=static_graph
    )
    state = BucketMOOState(OBJECTIVES)
    install_bucket_moo(ddp, state)
    return _core.checks_presence(state)


def registered_unlike(rank: int) -> str:
    """Rank 0 registers with install_bucket_moo (no presence check), the others raw (with
    it): their Gramian all-reduces would differ in size, so every rank must refuse the step."""
    model = nn.Linear(3, 2)
    ddp = DistributedDataParallel(model)
    state = BucketMOOState(OBJECTIVES)
    if rank == 0:
        install_bucket_moo(ddp, state)
    else:
        ddp.register_comm_hook(state, bucket_moo_hook)
    try:
        ddp(torch.randn(4, 3)).sum().backward()
    except RuntimeError as error:
        return str(error)
    return "no error"


def ddp_runs(rank: int, world_size: int, runs: list[AdapterRun]) -> dict[str, Any]:
    return {
        "runs": [ddp_run(rank, world_size, run) for run in runs],
        "checks": {
            options: checks_presence(*options)
            for options in ((False, False), (True, False), (False, True))
        },
        "registered_unlike": registered_unlike(rank),
    }


def fsdp_run(
    rank: int,
    world_size: int,
    version: int,
    weighting: str,
    frozen: bool,
    objectives: tuple[str, ...] = OBJECTIVES,
    ranks_per_node: int | None = None,
) -> dict[str, Any]:
    """One FSDP unit (the root) over the whole adapter model, one step; ``frozen``: the trunk's
    weight needs no gradient (as a LoRA's base weights), which FSDP2 leaves out of the row.
    ``ranks_per_node``: the hierarchical protocol on simulated nodes of that many ranks."""
    language = objectives[rank]
    model = AdapterModel()
    model.trunk.weight.requires_grad_(not frozen)
    own = local_gradients(model, rank, 0, language)
    protocol = "shard" if ranks_per_node is None else "hierarchical"
    state = BucketMOOState(
        objectives, weighting=weighting, protocol=protocol, ranks_per_node=ranks_per_node
    )
    if version == 1:
        wrapped = FullyShardedDataParallel(model, device_id=CPU, use_orig_params=True)
        install_bucket_moo(wrapped, state)
    else:
        wrapped = fully_shard(model)
        install_bucket_moo(wrapped, state)
    loss_of(wrapped, rank, 0, language).backward()
    if version == 1:
        with FullyShardedDataParallel.summon_full_params(wrapped, with_grads=True):
            reduced = torch.cat([p.grad.flatten() for p in wrapped.parameters() if p.requires_grad])
    else:
        reduced = torch.cat(
            [
                (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).flatten()
                for p in wrapped.parameters()
                if p.requires_grad
            ]
        )
    full_parameters(wrapped)  # every rank through the same collectives before returning
    return {"local": gather_rows(own), "reduced": reduced}


def fsdp_runs(rank: int, world_size: int, cases: list[tuple]) -> list[dict[str, Any]]:
    """``(FSDP version, weighting, frozen[, objectives, ranks_per_node])`` per case."""
    return [fsdp_run(rank, world_size, *case) for case in cases]


def adapter_runs(
    rank: int, world_size: int, runs: list[AdapterRun], cases: list[tuple]
) -> dict[str, Any]:
    """DDP ``runs`` and FSDP ``cases`` on ranks other than the 3 of :data:`OBJECTIVES`."""
    return {
        "ddp": [ddp_run(rank, world_size, run) for run in runs],
        "fsdp": fsdp_runs(rank, world_size, cases),
    }
