"""What conflict-aware aggregation costs next to a plain all-reduce: bytes, time and memory.

One measurement (launched by torchrun; gloo/CPU, or NCCL when every rank has a GPU)::

    torchrun --nproc-per-node 4 benchmarks/comm_overhead.py run --out /tmp/r4.json

(``--shared-gpu``: every rank on GPU 0 over gloo, for a step-time comparison with ``R > 1`` on
one GPU; NCCL refuses two ranks on one device)

trains a GPT-style transformer (``--layers``/``--d-model``, default ≈25M parameters; or, with
``--model mlp``, a residual MLP over the previous ``--context`` bytes, default ≈6.4M parameters:
little compute per byte of gradient) under each
method of ``--methods`` (all by default, see ``METHODS``), one after the other in the same
processes, every rank training its own language (objective): ``--rounds`` rounds, each method
``--warmup`` + ``--steps`` steps per round on a fresh model, the order rotated by one method per
round so that no method always runs first or after the same neighbour (the machine's drift
and the heap left by the previous method average out); the timed steps of all rounds are
pooled. The whole table, its world-size and model-size sweeps, the JSON, the Markdown and the
plot::

    python benchmarks/comm_overhead.py sweep            # → benchmarks/results/comm_overhead_*

Bytes are measured three ways, per rank per step: ``algorithm`` intercepts every collective that
Python issues (the ``ProcessGroup`` methods ``torch.distributed`` calls, so the hook, the
baselines and FSDP are counted by one counter that knows nothing of the library) and counts the
bytes a bandwidth-optimal algorithm sends for the tensors given (ring all-reduce
``2(R−1)/R·n·b``, all-to-all and reduce-scatter ``(R−1)/R·n·b``, all-gather ``(R−1)·n_in·b``):
what NCCL's ring algorithms send. ``wire`` (gloo only) is what the kernel saw the process write
(``/proc/self/io`` ``wchar``): gloo's TCP payload with its own algorithms (gloo's reduce-scatter
sends as much as an all-reduce). ``ledger`` is the library's own count (hook methods only), which
must equal ``algorithm``. Time: per step (after a barrier, forward + backward + optimizer, the
slowest rank's time), backward, the time the hook blocks autograd (``hook body``), the time from
the hook's call to its future's completion summed over buckets (``hook latency``), and what
backward waited after handing over its last bucket (``tail``: communication not hidden behind
backward). Memory: before the timed steps, freed heap pages go back to the system and the peak
RSS restarts (``malloc_trim``, ``/proc/self/clear_refs``); ``peak above live`` is the peak RSS of
the timed steps minus the RSS then (model, gradients and optimizer state are live then, so it is
activations plus what the reduction allocates), and for global MOO the bytes it holds until the
last bucket (``state.held_bytes``). With CUDA, ``torch.cuda.max_memory_allocated`` replaces RSS.
"""

# No ``from __future__ import annotations``: DDP checks the comm hooks' annotations at runtime.

import argparse
import contextlib
import ctypes
import datetime
import gc
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from bucketmoo_hooks import (
    BucketMOOReduceScatter,
    BucketMOOState,
    bucket_moo_hook,
    install_bucket_moo,
)
from bucketmoo_hooks._collectives import SENT_BYTES
from bucketmoo_hooks._compat import all_gather_single
from bucketmoo_hooks._ddp import install_ddp
from bucketmoo_hooks.weightings import MGDA

#: Every method, in table order. ``*-blocking`` is the hook with ``overlap=False`` (the hook as it
#: was before overlap: the exchange blocks backward). ``sketch*``: ``protocol="sketch"``
#: (``--sketch-size``), MGDA weights from sketched Gramians, then DDP's (FSDP's) own reduction.
#: ``*hierarchical``: ``protocol="hierarchical"`` on nodes of ``--ranks-per-node`` ranks (default
#: torchrun's ``LOCAL_WORLD_SIZE``: one node, where it is the shard protocol's exchange).
METHODS = (
    "allreduce",
    "mean",
    "mgda",
    "pcgrad",
    "global",
    "sketch",
    "sketch-global",
    "hierarchical",
    "mean-blocking",
    "mgda-blocking",
    "naive",
    "powersgd",
    "fsdp2",
    "fsdp2-moo",
    "fsdp2-sketch",
    "fsdp2-hierarchical",
)
#: The DDP hook's methods: (weighting, granularity, overlap, protocol).
HOOK_METHODS = {
    "mean": ("mean", "bucket", True, "shard"),
    "mgda": ("mgda", "bucket", True, "shard"),
    "pcgrad": ("pcgrad", "bucket", True, "shard"),
    "global": ("mgda", "global", True, "shard"),
    "sketch": ("mgda", "bucket", True, "sketch"),
    "sketch-global": ("mgda", "global", True, "sketch"),
    "hierarchical": ("mgda", "bucket", True, "hierarchical"),
    "mean-blocking": ("mean", "bucket", False, "shard"),
    "mgda-blocking": ("mgda", "bucket", False, "shard"),
}
#: FSDP2 with the library's reduce-scatter: the protocol.
FSDP_MOO_METHODS = {
    "fsdp2-moo": "shard",
    "fsdp2-sketch": "sketch",
    "fsdp2-hierarchical": "hierarchical",
}
#: ``--model``: (layers, d_model) when not given.
MODEL_DEFAULTS = {"gpt": (8, 512), "mlp": (3, 512)}
RESULTS = Path(__file__).resolve().parent / "results"
VOCAB = 256  # bytes as tokens

# -- the model -------------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.up, self.down = nn.Linear(d_model, 4 * d_model), nn.Linear(4 * d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(batch, length, 3, self.heads, -1).unbind(2)
        attended = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class GPT(nn.Module):
    """Pre-LN decoder: ``12·d²`` parameters per layer (≈25M for 8 layers of width 512)."""

    def __init__(self, layers: int, d_model: int, context: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d_model)
        self.position = nn.Parameter(torch.zeros(context, d_model))
        self.blocks = nn.ModuleList(Block(d_model, max(1, d_model // 64)) for _ in range(layers))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, VOCAB, bias=False)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


class MLPBlock(nn.Module):
    """Pre-LN residual feed-forward block (the transformer block's without attention)."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d_model)
        self.up, self.down = nn.Linear(d_model, 4 * d_model), nn.Linear(4 * d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.down(F.gelu(self.up(self.ln(x))))


class MLP(nn.Module):
    """Next byte from the previous ``context`` bytes: their embeddings (``d_model // context``
    wide) side by side, projected to ``d_model`` if they are narrower, ``layers`` residual blocks
    of ``8·d²`` parameters (≈6.4M for 3 blocks of width 512). One prediction per sequence: at
    equal batch, far less compute per gradient byte than the transformer."""

    def __init__(self, layers: int, d_model: int, context: int) -> None:
        super().__init__()
        width = max(1, d_model // context)
        self.embed = nn.Embedding(VOCAB, width)
        self.proj = (
            nn.Identity() if width * context == d_model else nn.Linear(width * context, d_model)
        )
        self.blocks = nn.ModuleList(MLPBlock(d_model) for _ in range(layers))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, VOCAB, bias=False)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.proj(self.embed(tokens).flatten(1))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def make_model(model: str, layers: int, d_model: int, context: int) -> nn.Module:
    return (MLP if model == "mlp" else GPT)(layers, d_model, context)


def loss_of(model: nn.Module, tokens: Tensor) -> Tensor:
    """Next-token loss of a batch of ``[batch, context + 1]`` tokens: at every position (the
    transformer), or of the last token (the MLP)."""
    logits = model(tokens[:, :-1])
    if logits.dim() == 2:  # the MLP: one prediction per sequence
        return F.cross_entropy(logits, tokens[:, -1])
    return F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def parameter_count(layers: int, d_model: int, context: int, model: str = "gpt") -> int:
    if model == "mlp":
        width = max(1, d_model // context)
        proj = 0 if width * context == d_model else (width * context + 1) * d_model
        per_block = 8 * d_model * d_model + 7 * d_model
        return VOCAB * width + proj + layers * per_block + (2 + VOCAB) * d_model
    per_layer = 12 * d_model * d_model + 13 * d_model
    return layers * per_layer + (2 * VOCAB + context + 2) * d_model


# -- measuring bytes -------------------------------------------------------------------------------


def _nbytes(tensors: list[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _flat(items: Any) -> list[Tensor]:
    if isinstance(items, Tensor):
        return [items]
    return [t for item in items for t in _flat(item)]


# ProcessGroup method → (collective, the tensors its bytes are counted from, how many of them
# make the size SENT_BYTES takes: the all-reduced tensor, the all-to-all's or reduce-scatter's
# input, the all-gather's output; lists are the per-rank pieces of that size).
_ALGORITHM: dict[str, tuple[str, Callable[[int, tuple], int]]] = {
    "allreduce": ("all_reduce", lambda r, a: _nbytes(_flat(a[0]))),
    "allreduce_coalesced": ("all_reduce", lambda r, a: _nbytes(_flat(a[0]))),
    "all_to_all_single": ("all_to_all", lambda r, a: _nbytes([a[1]])),
    "alltoall": ("all_to_all", lambda r, a: _nbytes(_flat(a[1]))),
    "all_gather_single": ("all_gather", lambda r, a: _nbytes([a[0]])),
    "all_gather_single_coalesced": ("all_gather", lambda r, a: _nbytes(_flat(a[0]))),
    "allgather": ("all_gather", lambda r, a: r * _nbytes(_flat(a[1]))),
    "reduce_scatter_single": ("reduce_scatter", lambda r, a: _nbytes([a[1]])),
    "reduce_scatter_single_coalesced": ("reduce_scatter", lambda r, a: _nbytes(_flat(a[1]))),
    "reduce_scatter": ("reduce_scatter", lambda r, a: r * _nbytes(_flat(a[0]))),
    "broadcast": ("broadcast", lambda r, a: _nbytes(_flat(a[0]))),
}


def _sent(collective: str, world_size: int, nbytes: int) -> int:
    """Bytes one rank sends in ``collective`` of ``nbytes`` (a broadcast: the root's tensor)."""
    if collective == "broadcast":
        return nbytes
    return SENT_BYTES[collective](nbytes, world_size)


class CollectiveCounter:
    """Counts every collective issued from Python, on any thread, by wrapping the
    ``ProcessGroup`` methods that ``torch.distributed``'s functions call.

    Collectives on ``ignore`` (the benchmark's own barrier group) are not counted.
    """

    def __init__(self, ignore: dist.ProcessGroup) -> None:
        self.ignore = ignore
        self.sent: dict[str, int] = {}
        self._originals: dict[str, Any] = {}

    def install(self) -> None:
        process_group = torch._C._distributed_c10d.ProcessGroup
        for method, (collective, count) in _ALGORITHM.items():
            original = getattr(process_group, method)
            self._originals[method] = original

            def counted(group: Any, *args: Any, _o=original, _c=collective, _n=count) -> Any:
                if group is not self.ignore:
                    size = group.size()
                    self.sent[_c] = self.sent.get(_c, 0) + _sent(_c, size, _n(size, args))
                return _o(group, *args)

            setattr(process_group, method, counted)

    def reset(self) -> None:
        self.sent = {}


def wire_bytes() -> int:
    """Bytes this process has written (sockets included), as the kernel counts them."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no wchar line")


# -- measuring memory ------------------------------------------------------------------------------


_LIBC = ctypes.CDLL(None)


def rss() -> dict[str, float]:
    """Current and peak resident set of this process, MiB (``VmRSS``, ``VmHWM``)."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            name, value = line.split(":")
            values[name] = int(value.split()[0]) / 1024
    return values


def reset_peak(device: torch.device) -> None:
    """Start a peak-memory window at the live memory: freed heap pages go back to the system
    (``malloc_trim``, all threads' arenas) and the peak restarts from the current RSS."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        _LIBC.malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def memory_now(device: torch.device) -> tuple[float, float]:
    """(current, peak since :func:`reset_peak`), MiB."""
    if device.type == "cuda":
        mib = 2.0**20
        return torch.cuda.memory_allocated(device) / mib, torch.cuda.max_memory_allocated(
            device
        ) / mib
    values = rss()
    return values["VmRSS"], values["VmHWM"]


# -- timing the hooks ------------------------------------------------------------------------------


@dataclass
class HookTimes:
    """Per step: time the hook blocked autograd, call → completion summed over buckets, and
    when the last bucket was handed over."""

    body: float = 0.0
    latency: float = 0.0
    last_return: float = 0.0
    buckets: list[dict[str, Any]] = field(default_factory=list)

    def reset(self) -> None:
        self.body = self.latency = self.last_return = 0.0
        self.buckets = []


def timed_hook(hook: Callable, times: HookTimes) -> Callable:
    """``hook`` with its body and latency added to ``times`` (and the bucket layout kept)."""

    def wrapped(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
        start = time.perf_counter()
        future = hook(state, bucket)
        times.last_return = time.perf_counter()
        times.body += times.last_return - start
        times.buckets.append(
            {
                "numel": bucket.buffer().numel(),
                "element_size": bucket.buffer().element_size(),
                "shapes": [list(p.shape) for p in bucket.parameters()],
            }
        )

        def done(_: torch.futures.Future) -> None:
            times.latency += time.perf_counter() - start

        future.add_done_callback(done)
        return future

    return wrapped


@contextmanager
def timed_reduce_scatters(times: HookTimes) -> Iterator[None]:
    """Time FSDP2's reduce-scatters (its own and the library's) as the hook of an FSDP step."""
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultReduceScatter

    originals = {cls: cls.__call__ for cls in (DefaultReduceScatter, BucketMOOReduceScatter)}

    def timed(original: Callable) -> Callable:
        def call(self: Any, *args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            result = original(self, *args, **kwargs)
            input = kwargs["input_tensor"] if "input_tensor" in kwargs else args[1]
            times.last_return = time.perf_counter()
            times.body += times.last_return - start
            times.latency += times.last_return - start
            bucket = {"numel": input.numel(), "element_size": input.element_size()}
            if isinstance(self, BucketMOOReduceScatter):  # presence counts: L per parameter
                bucket["parameters"] = len(self.unit.segment_sizes)
            times.buckets.append(bucket)
            return result

        return call

    for cls, original in originals.items():
        cls.__call__ = timed(original)
    try:
        yield
    finally:
        for cls, original in originals.items():
            cls.__call__ = original


def serialised(hook: Callable) -> Callable:
    """``hook`` waited for in the hook body: one bucket at a time.

    PowerSGD issues its P and Q all-reduces from future callbacks, which run on gloo's threads
    as earlier collectives complete; with several buckets in flight the ranks can issue them in
    different orders, and gloo aborts on the mismatched sizes. Waiting keeps one bucket in
    flight (its time is then that of a blocking hook: it serves here for its bytes).
    """

    def wrapped(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
        future = hook(state, bucket)
        future.wait()
        return future

    return wrapped


# -- the straw man ---------------------------------------------------------------------------------


@dataclass
class NaiveState:
    """All-gather every rank's whole bucket, then group-average, weight and combine locally."""

    group: dist.ProcessGroup
    averaging: Tensor  # M, [L, R]
    weighting: MGDA = field(default_factory=MGDA)


def naive_hook(state: NaiveState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """Moves ``(R−1)·n·b`` bytes per rank, ``R/2`` times a ring all-reduce; holds the ``R``
    gradients of the bucket on every rank. Asynchronous like ``allreduce_hook``."""
    buffer = bucket.buffer()
    world_size = state.group.size()
    gathered = buffer.new_empty(world_size * buffer.numel())
    work = all_gather_single(gathered, buffer, group=state.group, async_op=True)

    def combine(_: torch.futures.Future) -> Tensor:
        objectives = state.averaging.to(torch.float32) @ gathered.view(world_size, -1).float()
        weights = state.weighting(objectives @ objectives.T)
        return buffer.copy_(weights @ objectives)

    return work.get_future().then(combine)


# -- one measurement -------------------------------------------------------------------------------


@dataclass
class Config:
    layers: int
    d_model: int
    context: int
    batch: int
    steps: int
    warmup: int
    bucket_cap_mb: float
    model: str = "gpt"
    sketch_size: int | None = None  # protocol="sketch"'s k; None: the library's default
    ranks_per_node: int | None = None  # protocol="hierarchical"'s nodes; None: LOCAL_WORLD_SIZE
    #: The library's methods train one language per node of ``ranks_per_node`` ranks (the
    #: hierarchical protocol's recommended layout) instead of one per rank.
    node_languages: bool = False


def batches(rank: int, config: Config, device: torch.device) -> Iterator[Tensor]:
    """Every rank its own 'language': tokens from its own band of the byte range."""
    generator = torch.Generator().manual_seed(rank)
    low = (rank * 37) % (VOCAB - 64)
    while True:
        tokens = torch.randint(
            low, low + 64, (config.batch, config.context + 1), generator=generator
        )
        yield tokens.to(device)


def build(
    method: str, config: Config, device: torch.device, group: dist.ProcessGroup, times: HookTimes
) -> tuple[nn.Module, Any]:
    """The model wrapped for ``method``; returns (model, hook state or None)."""
    torch.manual_seed(0)
    model = make_model(config.model, config.layers, config.d_model, config.context).to(device)
    world_size = group.size()
    if method.startswith("fsdp2"):
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        if method in FSDP_MOO_METHODS:
            protocol = FSDP_MOO_METHODS[method]
            state = BucketMOOState(
                languages(config, world_size), "mgda", **protocol_options(protocol, config)
            )
            install_bucket_moo(model, state)
            return model, state
        return model, None
    ddp = DistributedDataParallel(model, bucket_cap_mb=config.bucket_cap_mb)
    if method == "allreduce":
        ddp.register_comm_hook(group, timed_hook(allreduce_hook, times))
        return ddp, None
    if method == "powersgd":
        state = powersgd.PowerSGDState(
            process_group=group, matrix_approximation_rank=1, start_powerSGD_iter=2
        )
        ddp.register_comm_hook(state, timed_hook(serialised(powersgd.powerSGD_hook), times))
        return ddp, state
    if method == "naive":
        averaging = torch.eye(world_size, device=device)  # every rank its own objective
        ddp.register_comm_hook(NaiveState(group, averaging), timed_hook(naive_hook, times))
        return ddp, None
    weighting, granularity, overlap, protocol = HOOK_METHODS[method]
    state = BucketMOOState(
        languages(config, world_size),
        weighting=weighting,
        granularity=granularity,
        overlap=overlap,
        **protocol_options(protocol, config),
    )
    # install_bucket_moo's DDP path with the hook wrapped in a timer: stable problem keys, and no
    # presence check, since this DDP (no find_unused_parameters) uses every parameter on every
    # rank (benchmarks/protocol_phases.py times the check).
    install_ddp(ddp, state, hook=timed_hook(bucket_moo_hook, times))
    return ddp, state


def languages(config: Config, world_size: int) -> list[int] | None:
    """The library's ``objective_of_rank``: one language per rank (``None``), or per node."""
    if not config.node_languages:
        return None
    if config.ranks_per_node is None:
        raise SystemExit("--node-languages needs --ranks-per-node")
    return [rank // config.ranks_per_node for rank in range(world_size)]


def protocol_options(protocol: str, config: Config) -> dict[str, Any]:
    """``BucketMOOState``'s protocol arguments."""
    if protocol == "sketch":
        return {"protocol": "sketch", "sketch_size": config.sketch_size}
    if protocol == "hierarchical":
        return {"protocol": "hierarchical", "ranks_per_node": config.ranks_per_node}
    return {"protocol": protocol}


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return {"median": statistics.median(ordered), "p10": at(0.1), "p90": at(0.9)}


def measure(
    method: str,
    config: Config,
    device: torch.device,
    counter: CollectiveCounter,
    control: dist.ProcessGroup,
    steps: int,
) -> dict[str, Any]:
    """Train ``config.warmup + steps`` steps under ``method``, measuring the last ``steps``;
    this rank's record."""
    rank = dist.get_rank()
    times = HookTimes()
    model, state = build(method, config, device, dist.group.WORLD, times)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    data = batches(rank, config, device)
    samples: dict[str, list[float]] = {
        k: [] for k in ("step", "backward", "body", "latency", "tail")
    }
    ledger = getattr(state, "ledger", None)  # the library's own count, for the hook methods
    timing_context = timed_reduce_scatters(times) if method.startswith("fsdp2") else _nothing()
    with timing_context:
        for step in range(config.warmup + steps):
            if step == config.warmup:
                counter.reset()
                wire_start = wire_bytes()
                faults_start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                ledger_start = 0 if ledger is None else sum(ledger.totals.values())
                gc.collect()
                reset_peak(device)
                base, _ = memory_now(device)
            tokens = next(data)
            dist.barrier(group=control)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.reset()
            start = time.perf_counter()
            loss = loss_of(model, tokens)
            backward_start = time.perf_counter()
            loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            backward_end = time.perf_counter()
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            end = time.perf_counter()
            if step >= config.warmup:
                samples["step"].append(end - start)
                samples["backward"].append(backward_end - backward_start)
                samples["body"].append(times.body)
                samples["latency"].append(times.latency)
                samples["tail"].append(max(0.0, backward_end - times.last_return))
    wire = wire_bytes() - wire_start
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_start
    _, peak = memory_now(device)
    record = {
        "method": method,
        "rank": rank,
        "world_size": dist.get_world_size(),
        "steps": samples,
        "algorithm": {k: v // steps for k, v in counter.sent.items()},
        "wire": wire // steps if device.type == "cpu" else None,
        "ledger": None if ledger is None else (sum(ledger.totals.values()) - ledger_start) // steps,
        "held_bytes": getattr(state, "held_bytes", 0),
        "page_faults": faults // steps,
        "transient_mb": peak - base,
        "buckets": times.buckets,
    }
    if isinstance(state, BucketMOOState):
        state.close()
    del model, optimizer, state
    gc.collect()
    return record


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def exact_rss() -> None:
    """From now on, serve every allocation above 128 KiB with its own mmap, returned on free.

    glibc otherwise raises this threshold up to 32 MiB as large blocks are freed and keeps freed
    blocks in its heaps, so RSS keeps what was freed and its peak tells little about the
    tensors alive together. Fixed, it makes allocation slower (a page fault per new page):
    it is set only for the memory passes, after every timed pass.
    """
    _M_MMAP_THRESHOLD = -3
    _LIBC.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)


def run(args: argparse.Namespace) -> None:
    """The torchrun entry point: every method in turn; rank 0 writes the gathered records."""
    cuda = args.shared_gpu or (
        torch.cuda.is_available()
        and torch.cuda.device_count() >= int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    )
    if cuda:
        # --shared-gpu: every rank on GPU 0 over gloo (NCCL refuses two ranks on one GPU).
        local_rank = 0 if args.shared_gpu else int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)
    backend = "nccl" if cuda and not args.shared_gpu else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))
    control = dist.new_group(backend="gloo")
    counter = CollectiveCounter(ignore=control)
    counter.install()
    config = Config(
        args.layers,
        args.d_model,
        args.context,
        args.batch,
        args.steps,
        args.warmup,
        args.bucket_cap_mb,
        args.model,
        args.sketch_size,
        args.ranks_per_node,
        args.node_languages,
    )
    methods = args.methods.split(",")
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    records = {m: measure(m, config, device, counter, control, args.steps) for m in methods}
    for round_index in range(1, args.rounds):
        shift = round_index % len(methods)
        for method in methods[shift:] + methods[:shift]:
            again = measure(method, config, device, counter, control, args.steps)
            for key, samples in again["steps"].items():
                records[method]["steps"][key] += samples
            records[method]["page_faults"] += again["page_faults"]
    for record in records.values():
        record["page_faults"] //= args.rounds
    records = [records[m] for m in methods]
    if args.memory_steps:
        if device.type == "cpu":
            exact_rss()
        for record, method in zip(records, methods, strict=True):
            memory = measure(method, config, device, counter, control, args.memory_steps)
            record["transient_mb"] = memory["transient_mb"]
    else:
        for record in records:
            record["transient_mb"] = None
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, records, group=control)
    if dist.get_rank() == 0:
        summary = {
            "config": asdict(config),
            "parameters": parameter_count(args.layers, args.d_model, args.context, args.model),
            "world_size": dist.get_world_size(),
            "backend": dist.get_backend(),
            "device": torch.cuda.get_device_name() if cuda else cpu_model(),
            "records": [list(per_method) for per_method in zip(*gathered, strict=True)],
        }
        Path(args.out).write_text(json.dumps(summary))
        print(table(summarise(summary), summary), flush=True)
    dist.barrier(group=control)
    dist.destroy_process_group()


# -- summarising -----------------------------------------------------------------------------------


def summarise(measurement: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per method: bytes of rank 0, the slowest rank's times, the largest memory."""
    rows = []
    for per_rank in measurement["records"]:
        first = per_rank[0]
        steps = len(first["steps"]["step"])

        def slowest(key: str, per_rank: list = per_rank, steps: int = steps) -> list[float]:
            return [max(r["steps"][key][i] for r in per_rank) for i in range(steps)]

        rows.append(
            {
                "method": first["method"],
                "world_size": measurement["world_size"],
                "parameters": measurement["parameters"],
                "algorithm_bytes": sum(first["algorithm"].values()),
                "algorithm_by_collective": first["algorithm"],
                "wire_bytes": first["wire"],
                "ledger_bytes": first["ledger"],
                "timed_steps": steps,
                "step_ms": {k: 1e3 * v for k, v in percentiles(slowest("step")).items()},
                "backward_ms": 1e3 * statistics.median(slowest("backward")),
                "hook_body_ms": {k: 1e3 * v for k, v in percentiles(slowest("body")).items()},
                "hook_latency_ms": 1e3 * statistics.median(slowest("latency")),
                "tail_ms": 1e3 * statistics.median(slowest("tail")),
                "transient_mb": None
                if first["transient_mb"] is None
                else max(r["transient_mb"] for r in per_rank),
                "held_mb": first["held_bytes"] / 2**20,
                "page_faults": max(r["page_faults"] for r in per_rank),
                "buckets": first["buckets"],
            }
        )
    baseline = next((r for r in rows if r["method"] == "allreduce"), None)
    fsdp = next((r for r in rows if r["method"] == "fsdp2"), None)
    for row in rows:
        reference = fsdp if row["method"].startswith("fsdp2") and fsdp else baseline
        if reference is None:  # measured without its baseline: no ratios
            continue
        row["baseline"] = reference["method"]
        row["bytes_ratio"] = row["algorithm_bytes"] / reference["algorithm_bytes"]
        if row["wire_bytes"] is not None:
            row["wire_ratio"] = row["wire_bytes"] / reference["wire_bytes"]
        row["time_ratio"] = row["step_ms"]["median"] / reference["step_ms"]["median"]
        if row["transient_mb"] is not None:
            row["extra_transient_mb"] = row["transient_mb"] - reference["transient_mb"]
    return rows


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def load_average() -> float:
    return os.getloadavg()[0]


def launch(
    world_size: int, args: argparse.Namespace, layers: int, methods: list[str], memory: bool
) -> dict:
    """One torchrun measurement; returns what rank 0 wrote."""
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "result.json"
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={world_size}",
            __file__,
            "run",
            f"--model={args.model}",
            f"--layers={layers}",
            f"--d-model={args.d_model}",
            f"--context={args.context}",
            f"--batch={args.batch}",
            f"--steps={args.steps}",
            f"--rounds={args.rounds}",
            f"--warmup={args.warmup}",
            f"--memory-steps={args.memory_steps if memory else 0}",
            f"--bucket-cap-mb={args.bucket_cap_mb}",
            *([f"--sketch-size={args.sketch_size}"] if args.sketch_size is not None else []),
            *([f"--ranks-per-node={args.ranks_per_node}"] if args.ranks_per_node else []),
            *(["--node-languages"] if args.node_languages else []),
            f"--methods={','.join(methods)}",
            f"--out={out}",
        ]
        environment = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run(command, check=True, env=environment)
        return json.loads(out.read_text())


def sweep(args: argparse.Namespace) -> None:
    """The world-size sweep at the default model, the model-size sweep at ``--size-world``."""
    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = load_average()
    rows: list[dict[str, Any]] = []
    for world_size in (int(w) for w in args.worlds.split(",")):
        methods = args.methods.split(",")
        if world_size != args.size_world:
            methods = [m for m in methods if not m.endswith("-blocking")]
        memory = world_size == args.size_world
        load = load_average()
        rows += [
            row | {"load_1min_at_launch": load}
            for row in summarise(launch(world_size, args, args.layers, methods, memory))
        ]
    for layers in (int(n) for n in args.sizes.split(",")):
        if layers == args.layers:
            continue
        methods = args.size_methods.split(",")
        load = load_average()
        rows += [
            row | {"load_1min_at_launch": load}
            for row in summarise(launch(args.size_world, args, layers, methods, memory=True))
        ]
    oversubscribed = [w for w in {r["world_size"] for r in rows} if w > (os.cpu_count() or 1)]
    result = {
        "benchmark": "comm_overhead",
        "date": started.isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "load_average_1min": {"before": load_before, "after": load_average()},
        "oversubscribed_world_sizes": sorted(oversubscribed),
        "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / args.name
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(result, args))
    plot(result, stem.with_suffix(".png"), args)
    print(stem.with_suffix(".md").read_text())


def _mb(nbytes: float | None) -> str:
    return "—" if nbytes is None else f"{nbytes / 2**20:.1f}"


def markdown(result: dict[str, Any], args: argparse.Namespace) -> str:
    machine = result["machine"]
    load = result["load_average_1min"]
    lines = [
        f"Communication overhead, {machine['cpu']} ({machine['cores']} cores), torch "
        f"{machine['torch']}, gloo, {result['date']}; 1-min load {load['before']:.1f} before, "
        f"{load['after']:.1f} after.",
        "",
        f"Command: `{result['command']}`",
        "",
        "Bytes per rank per step (algorithm = bandwidth-optimal bytes of the collectives issued, "
        "as NCCL's ring sends them; wire = gloo's TCP payload), ratios to DDP `allreduce_hook` "
        "(FSDP2 rows: to FSDP2's own reduce-scatter). Time: median step of the slowest rank "
        f"(p10–p90) over {args.rounds} rounds × {args.steps} steps (the method order rotated "
        "each round), hook body = time the hook blocks autograd, tail = time backward waits after "
        "its last bucket. Memory (memory pass, allocations over 128 KiB mmap-ed): the peak RSS "
        "above the live memory at the start of the measured steps (largest rank), the "
        "difference to the baseline's, and what global MOO holds until its last bucket."
        + (
            f" World sizes {result['oversubscribed_world_sizes']} run more processes than cores: "
            "their times are oversubscribed."
            if result["oversubscribed_world_sizes"]
            else ""
        ),
        "",
    ]
    header = (
        "| R | params | method | algorithm MiB | × | wire MiB | × | step ms (p10–p90) | × | "
        "backward ms | hook body ms (p10–p90) | tail ms | peak above live MiB | vs baseline | "
        "held MiB |"
    )
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for row in rows_in_order(result["rows"]):
        step, body = row["step_ms"], row["hook_body_ms"]
        wire_ratio = f"{row['wire_ratio']:.2f}" if row.get("wire_ratio") is not None else "—"
        memory = "— | —"
        if row["transient_mb"] is not None:
            memory = f"{row['transient_mb']:.0f} | {row['extra_transient_mb']:+.0f}"
        label = row["method"] + (
            " (oversubscribed)" if row["world_size"] in result["oversubscribed_world_sizes"] else ""
        )
        lines.append(
            f"| {row['world_size']} | {row['parameters'] / 1e6:.1f}M | {label} | "
            f"{_mb(row['algorithm_bytes'])} | {row['bytes_ratio']:.3f} | "
            f"{_mb(row['wire_bytes'])} | {wire_ratio} | "
            f"{step['median']:.0f} ({step['p10']:.0f}–{step['p90']:.0f}) | "
            f"{row['time_ratio']:.2f} | {row['backward_ms']:.0f} | "
            f"{body['median']:.1f} ({body['p10']:.1f}–{body['p90']:.1f}) | {row['tail_ms']:.1f} | "
            f"{memory} | {row['held_mb']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def table(rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    """What ``run`` prints: one line per method, ratios to its baseline where it was measured."""

    def ratio(row: dict[str, Any], key: str) -> str:
        return f"{row[key]:.3f}x" if key in row else "—"

    lines = [
        f"R = {summary['world_size']} ({summary['backend']}, {summary['device']}), "
        f"{summary['parameters']:,} parameters; per rank per step, slowest rank's "
        "median step (p10-p90); ratios to allreduce (FSDP2 rows: to fsdp2)",
        f"{'method':<19}{'MiB sent':>10}{'bytes':>9}{'step ms':>22}{'time':>9}"
        f"{'hook body ms':>14}{'tail ms':>9}{'peak MiB':>10}",
    ]
    for row in rows:
        step = row["step_ms"]
        spread = f"{step['median']:.0f} ({step['p10']:.0f}-{step['p90']:.0f})"
        peak = "—" if row["transient_mb"] is None else f"{row['transient_mb']:.0f}"
        lines.append(
            f"{row['method']:<19}{_mb(row['algorithm_bytes']):>10}{ratio(row, 'bytes_ratio'):>9}"
            f"{spread:>22}{ratio(row, 'time_ratio'):>9}{row['hook_body_ms']['median']:>14.1f}"
            f"{row['tail_ms']:>9.1f}{peak:>10}"
        )
    return "\n".join(lines)


def rows_in_order(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(
        rows, key=lambda r: (r["parameters"], r["world_size"], METHODS.index(r["method"]))
    )


def plot(result: dict[str, Any], path: Path, args: argparse.Namespace) -> None:
    """Ratios to the baseline against world size (default model) and model size (``R =
    --size-world``), and the extra memory against model size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    default = parameter_count(args.layers, args.d_model, args.context, args.model)
    figure, axes = plt.subplots(1, 4, figsize=(19, 4.4))

    def series(method: str, by: str) -> list[tuple[float, dict[str, Any]]]:
        if by == "world_size":
            chosen = [r for r in rows if r["method"] == method and r["parameters"] == default]
            return sorted((r["world_size"], r) for r in chosen)
        chosen = [r for r in rows if r["method"] == method and r["world_size"] == args.size_world]
        return sorted((r["parameters"] / 1e6, r) for r in chosen)

    for index, method in enumerate(METHODS[1:]):
        # The same colour and line for a method in every panel (past ten colours: dashed).
        colour, line = f"C{index % 10}", "o-" if index < 10 else "s--"
        for axis, key, by in (
            (axes[0], "bytes_ratio", "world_size"),
            (axes[1], "time_ratio", "world_size"),
            (axes[2], "time_ratio", "parameters"),
        ):
            points = series(method, by)
            if len(points) > 1:
                xs, ys = [x for x, _ in points], [r[key] for _, r in points]
                axis.plot(xs, ys, line, color=colour, label=method)
        points = [(x, r) for x, r in series(method, "parameters") if r["transient_mb"] is not None]
        if len(points) > 1 and method in args.size_methods.split(","):
            extra = [r["extra_transient_mb"] for _, r in points]
            xs = [x for x, _ in points]
            axes[3].plot(xs, extra, line, color=colour, label=f"{method}: peak − allreduce")
    held = [(x, r["held_mb"]) for x, r in series("global", "parameters")]
    if held:
        axes[3].plot(*zip(*held, strict=True), "k--", label="global: held slices")
    titles = (
        "bytes / baseline",
        "step time / baseline",
        f"step time / baseline, R = {args.size_world}",
        f"extra memory (MiB), R = {args.size_world}",
    )
    for index, (axis, title) in enumerate(zip(axes, titles, strict=True)):
        axis.set_title(title)
        axis.grid(alpha=0.3)
        if index < 2:
            axis.set_xlabel("world size R (more ranks than cores: oversubscribed)")
            axis.set_xscale("log", base=2)
        else:
            axis.set_xlabel("model parameters (M)")
        if index < 3:
            axis.axhline(1.0, color="grey", lw=0.8)
    for axis in axes[1:3]:
        axis.axhline(1.15, color="red", lw=0.8, ls="--")
    axes[1].legend(fontsize=7, ncol=2)
    axes[3].legend(fontsize=7)
    figure.suptitle(
        f"bucket MOO vs DDP allreduce_hook (FSDP2: vs its reduce-scatter), gloo/CPU, "
        f"{result['machine']['cores']} cores, {result['date'][:10]}"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown (but no ``None``: the help says what applies), and lines wrapped at
    spaces only (method names keep their hyphens)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Commands: 'run' (under torchrun) measures once; 'sweep' launches the runs of the "
        "recorded table. Each takes --help.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    summaries = {
        "run": "one measurement, launched by torchrun: every method in turn, a table on rank 0",
        "sweep": "the world-size and model-size sweeps: JSON, Markdown and PNG under --out",
    }
    for name, summary in summaries.items():
        sub = commands.add_parser(
            name,
            help=summary,
            description=summary,
            formatter_class=_HelpFormatter,
        )
        sub.add_argument(
            "--model",
            choices=tuple(MODEL_DEFAULTS),
            default="gpt",
            help="gpt: the transformer; mlp: a residual MLP over the previous --context bytes, "
            "one prediction per sequence (compute-light)",
        )
        sub.add_argument(
            "--layers",
            type=int,
            default=None,
            help="transformer (MLP) blocks; default: "
            + ", ".join(f"{m} {d[0]}" for m, d in MODEL_DEFAULTS.items()),
        )
        sub.add_argument(
            "--d-model",
            type=int,
            default=None,
            help="model width; default: "
            + ", ".join(f"{m} {d[1]}" for m, d in MODEL_DEFAULTS.items()),
        )
        sub.add_argument("--context", type=int, default=64, help="tokens per sequence")
        sub.add_argument("--batch", type=int, default=2, help="sequences per rank per step")
        sub.add_argument("--steps", type=int, default=6, help="timed steps per method and round")
        sub.add_argument(
            "--rounds",
            type=int,
            default=2,
            help="rounds over the methods, each in a rotated order; their timed steps are pooled",
        )
        sub.add_argument("--warmup", type=int, default=3, help="untimed steps first")
        sub.add_argument(
            "--memory-steps",
            type=int,
            default=2,
            help="steps of the memory pass after the timed passes (0: none)",
        )
        sub.add_argument("--bucket-cap-mb", type=float, default=25.0, help="DDP's bucket cap")
        sub.add_argument(
            "--sketch-size",
            type=int,
            default=None,
            help="k of the sketch methods (protocol='sketch'); default: the library's (4096)",
        )
        sub.add_argument(
            "--ranks-per-node",
            type=int,
            default=None,
            help="simulated nodes of the hierarchical methods; default: LOCAL_WORLD_SIZE",
        )
        sub.add_argument(
            "--node-languages",
            action="store_true",
            help="the library's methods train one language per node, not one per rank",
        )
        sub.add_argument(
            "--methods",
            default="all",
            help=f"comma-separated, of: {', '.join(METHODS)}; 'all': every one, in this order",
        )
    commands.choices["run"].add_argument("--out", required=True, help="JSON written by rank 0")
    commands.choices["run"].add_argument(
        "--shared-gpu",
        action="store_true",
        help="every rank on GPU 0 over gloo: a one-GPU step-time comparison with R > 1",
    )
    sweep_parser = commands.choices["sweep"]
    sweep_parser.add_argument("--worlds", default="2,4,8", help="world sizes of the table")
    sweep_parser.add_argument("--sizes", default="2,8,16", help="layer counts of the size sweep")
    sweep_parser.add_argument(
        "--size-world", type=int, default=4, help="world size of the size sweep"
    )
    sweep_parser.add_argument(
        "--size-methods", default="allreduce,mgda,global,naive", help="methods of the size sweep"
    )
    sweep_parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    sweep_parser.add_argument("--name", default="comm_overhead_cpu", help="results file stem")
    # Under torchrun every rank parses: only rank 0 prints --help or a usage error.
    quiet = os.environ.get("RANK", "0") != "0"
    with contextlib.ExitStack() as stack:
        if quiet:
            sink = stack.enter_context(open(os.devnull, "w"))
            stack.enter_context(contextlib.redirect_stdout(sink))
            stack.enter_context(contextlib.redirect_stderr(sink))
        args = parser.parse_args()
    for name in ("steps", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.methods == "all":
        args.methods = ",".join(METHODS)
    layers, d_model = MODEL_DEFAULTS[args.model]
    args.layers = layers if args.layers is None else args.layers
    args.d_model = d_model if args.d_model is None else args.d_model
    run(args) if args.command == "run" else sweep(args)


if __name__ == "__main__":
    main()
