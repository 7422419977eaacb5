"""DeepSpeed ZeRO-1/2/3: every gradient bucket of the ZeRO optimizer goes through the core.

DeepSpeed has no communication hook, so the adapter replaces, on the engine's ZeRO optimizer
object (never DeepSpeed's classes or modules), the one method that reduces a bucket:

- ZeRO-1/2 (``DeepSpeedZeroOptimizer``): ``gradient_reduction_w_predivide(tensor, dtype)``, the
  in-place all-reduce of one flat bucket (the ``reduce_scatter: false`` path, which the
  installer selects): the all-reduce form, as DDP's bucket. Its parameters are those of the
  optimizer's ``ipg_buckets[dtype]``, laid out one after the other.
- ZeRO-3 (``DeepSpeedZeroOptimizer_Stage3``): ``__avg_scatter_grads(params, dtype)``, which
  returns this rank's partition of every parameter's averaged gradient (the
  ``reduce_scatter: true`` path, which the installer selects): the reduce-scatter form, with
  the ``[R, c]`` layout of ``reduce_scatter_coalesced`` (row ``r``: chunk ``r`` of every
  parameter, ``⌈n/R⌉`` elements, zero-padded).

Buckets carry no index: the adapter numbers them in the order the optimizer reduces them. A
step opens at the first bucket after the optimizer's reduction epilogue
(``independent_gradient_partition_epilogue``, which ends every backward pass that reduced) and
closes when that epilogue returns. Both outputs are on the scale of an average, whatever
``gradient_predivide_factor`` and ``postscale_gradients`` say (they only move DeepSpeed's
division around its sum, against fp16 overflow; the exchange never sums raw fp16 gradients).
"""

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import _core
from ._collectives import Collectives
from ._objectives import ObjectiveMap
from ._protocol import Bucket, Gradient
from ._runtime import ranks_of, register
from ._state import BucketMOOState

logger = logging.getLogger("bucketmoo_hooks")

# The ZeRO-3 optimizer's private reduction (``self.__avg_scatter_grads``, name-mangled).
_STAGE3_REDUCTION = "_DeepSpeedZeroOptimizer_Stage3__avg_scatter_grads"


def is_deepspeed_engine(model: object) -> bool:
    """Whether ``model`` is a ``deepspeed.DeepSpeedEngine`` (without importing DeepSpeed)."""
    return any(
        cls.__name__ == "DeepSpeedEngine" and cls.__module__.startswith("deepspeed.")
        for cls in type(model).__mro__
    )


class _Steps:
    """One hook step per backward pass that reduces: opened by its first bucket, closed when the
    optimizer's reduction epilogue returns; numbers the buckets of the step."""

    __slots__ = ("buckets", "open", "state")

    def __init__(self, state: BucketMOOState) -> None:
        self.state = state
        self.open = False
        self.buckets = 0  # buckets of the open step so far: the next one's index

    def objective_map(self, group: dist.ProcessGroup, bucket: Bucket) -> ObjectiveMap:
        """The step's objective map, opening the step at its first bucket."""
        if self.open:
            return _core.step_map(self.state, bucket)
        self.open = True
        return _core.open_step(self.state, group)

    def close(self) -> None:
        if self.open:
            self.open, self.buckets = False, 0
            _core.close_step(self.state)


class _ZeroReduction:
    """What replaces the ZeRO optimizer's bucket reduction; one per installation."""

    def __init__(
        self,
        state: BucketMOOState,
        optimizer: Any,
        stage: int,
        positions: dict[int, int],
        sum_scale: float,
    ) -> None:
        self.state = state
        self.optimizer = optimizer
        self.stage = stage
        self.positions = positions  # id(parameter) → position in model.parameters()
        self.sum_scale = sum_scale  # gradient_allreduce_op "sum": R, else 1 (an average)
        self.steps = _Steps(state)

    def _bucket(self, parameters: Sequence[nn.Parameter]) -> Bucket:
        """The next bucket of the step, keyed by its parameters' positions."""
        index = self.steps.buckets
        self.steps.buckets += 1
        try:
            problems = tuple(self.positions[id(p)] for p in parameters)
        except KeyError:
            raise ValueError(
                f"ZeRO-{self.stage} bucket {index} holds a parameter that is not in the engine's "
                "module; install bucket-MOO on the DeepSpeedEngine that owns the optimizer"
            ) from None
        label = f"ZeRO-{self.stage} bucket {index}"
        return Bucket(index, label, problems, [(p,) for p in problems])

    def _reduce(self, parameters: Sequence[nn.Parameter], gradient: Gradient) -> None:
        """One bucket through the core; an error closes the step (every rank raises alike)."""
        state = self.state
        try:
            bucket = self._bucket(parameters)
            objective_map = self.steps.objective_map(state.group, bucket)
            flat = gradient.flat
            traffic = state.ledger.open_bucket(bucket.index, flat.numel(), flat.element_size())
            comm = Collectives(state.group, traffic, ranks_per_node=state.ranks_per_node)
            averaging = state._runtime.averaging(objective_map, flat.device)
            future = _core.reduce(state, comm, bucket, gradient, objective_map, averaging)
            if future is not None:  # the all-reduce form: the reduced bucket
                reduced = future.wait()
                if reduced is not flat:
                    flat.copy_(reduced)
        except BaseException:
            self.steps.close()
            raise

    def all_reduce(
        self, tensor: Tensor, communication_data_type: torch.dtype | None = None
    ) -> Tensor:
        """ZeRO-1/2: ``gradient_reduction_w_predivide``. Reduces ``tensor`` (the bucket, or one
        parameter larger than a bucket) in ``communication_data_type`` and returns the reduced
        tensor in that dtype (DeepSpeed copies partitions out of it), ``tensor`` updated too."""
        if tensor.numel() == 0:
            return tensor
        dtype = communication_data_type or tensor.dtype
        optimizer = self.optimizer
        parameters = [
            optimizer.bit16_groups[group][index]
            for group, index, _ in optimizer.ipg_buckets[dtype].params
        ]
        sizes = [p.numel() for p in parameters]
        if sum(sizes) != tensor.numel():
            raise RuntimeError(
                f"ZeRO-{self.stage}: a bucket of {tensor.numel()} elements holds parameters of "
                f"{sum(sizes)}; this DeepSpeed version lays buckets out in a way bucketmoo_hooks "
                "does not know"
            )
        flat = tensor if dtype == tensor.dtype else tensor.to(dtype)
        self._reduce(parameters, Gradient(flat, None, sizes))
        if self.sum_scale != 1:
            flat.mul_(self.sum_scale)
        if flat is not tensor:
            tensor.copy_(flat)
        return flat

    def reduce_scatter(
        self, parameters: list[nn.Parameter], communication_data_type: torch.dtype
    ) -> list[Tensor]:
        """ZeRO-3: ``__avg_scatter_grads``. This rank's partition of every parameter's combined
        gradient (on the scale of an average), in the optimizer's gradient accumulation dtype."""
        optimizer = self.optimizer
        # DeepSpeed < 0.19 partitions every gradient over the data-parallel group.
        partition_group = getattr(optimizer, "_get_param_partition_group", None)
        group = (
            optimizer.dp_process_group
            if partition_group is None
            else partition_group(parameters[0])
        )
        if group is not self.state.group and ranks_of(group) != ranks_of(self.state.group):
            raise ValueError(
                f"ZeRO-3 partitions gradients over ranks {ranks_of(group)}, not over the state's "
                f"group {ranks_of(self.state.group)} (MiCS or hpZ gradient partitioning); "
                "bucket-MOO needs the data-parallel group"
            )
        world_size, rank = group.size(), group.rank()
        grads = [p.grad.reshape(-1) for p in parameters]
        chunks = [math.ceil(g.numel() / world_size) for g in grads]
        device = grads[0].device
        rows = torch.empty(world_size, sum(chunks), dtype=communication_data_type, device=device)
        offset = 0
        for grad, chunk in zip(grads, chunks, strict=True):
            # ``reduce_scatter_coalesced``'s layout; its padding is zero here (a Gramian reads it).
            full, rest = divmod(grad.numel(), chunk) if chunk else (0, 0)
            rows[:full, offset : offset + chunk].copy_(grad[: full * chunk].view(full, chunk))
            if rest:
                rows[full, offset : offset + rest].copy_(grad[full * chunk :])
                rows[full, offset + rest : offset + chunk].zero_()
            rows[full + bool(rest) :, offset : offset + chunk].zero_()
            offset += chunk
        output = rows.new_empty(sum(chunks))
        self._reduce(parameters, Gradient(rows.view(-1), output, chunks, rows=True))
        partitions = []
        offset = 0
        for grad, chunk in zip(grads, chunks, strict=True):
            owned = min(chunk, max(0, grad.numel() - rank * chunk))
            partitions.append(output.narrow(0, offset, owned))
            offset += chunk
        accumulation = optimizer.gradient_accumulation_dtype
        return [p.to(accumulation) for p in partitions]

    def epilogue(self, original: Callable[[], None]) -> Callable[[], None]:
        """The optimizer's reduction epilogue, then the end of the step."""

        def independent_gradient_partition_epilogue() -> None:
            try:
                original()
            finally:
                self.steps.close()

        return independent_gradient_partition_epilogue


def _refuse(engine: Any, state: BucketMOOState, stage: int) -> None:
    """Raise at install, naming the configuration key, what the adapter cannot serve."""
    config = engine._config
    zero = config.zero_config

    def refuse(key: str, why: str) -> None:
        raise ValueError(f"DeepSpeed {key}: {why}")

    if stage not in (1, 2, 3):
        refuse(
            "zero_optimization.stage",
            f"stage {stage} reduces gradients outside a ZeRO optimizer; bucket-MOO serves ZeRO "
            "stages 1, 2 and 3 (stage 1 has the memory of DDP or less)",
        )
    if state.granularity == "global":
        refuse(
            "(BucketMOOState granularity)",
            "granularity='global' cannot serve ZeRO: the optimizer consumes each bucket's "
            "reduction as soon as it returns; use granularity='bucket' with a "
            "reduce_bucket_size larger than the model for one problem over the whole model",
        )
    if getattr(engine, "has_moe_layers", False):
        refuse(
            "MoE layers (deepspeed.moe)",
            "expert parameters are reduced over expert-data-parallel groups, which bucket-MOO "
            "does not serve",
        )
    if getattr(engine, "is_deepcompile_active", lambda: False)():  # DeepSpeed ≥ 0.17.3
        refuse("compile.deepcompile", "DeepCompile reduces gradients inside the compiled graph")
    if getattr(engine, "pipeline_parallelism", False):
        refuse("pipeline parallelism (PipelineModule)", "not supported by bucket-MOO")
    autotp = getattr(engine, "autotp_size", lambda: 0)() or 0  # DeepSpeed ≥ 0.16.4
    if getattr(engine, "mpu", None) is not None or autotp > 1:
        refuse(
            "tensor parallelism (tensor_parallel.autotp_size, or an mpu)",
            "tensor-parallel ranks hold different slices of a layer, so their buckets would get "
            "different weights and their copies of replicated parameters would drift apart",
        )
    if getattr(engine, "sequence_parallel_size", 1) != 1:
        refuse(
            "sequence_parallel_size",
            "sequence parallelism (Ulysses) splits one sample's gradient over ranks, which are "
            "then not one objective each",
        )
    if getattr(engine, "zenflow", False):
        refuse("zero_optimization.zenflow", "ZenFlow reduces selected channels on its own path")
    if engine.zero_quantized_gradients():
        refuse(
            "zero_optimization.zero_quantized_gradients",
            "ZeRO++ quantized gradients are reduced by an all-to-all that bypasses the reduction "
            "bucket-MOO replaces",
        )
    if getattr(zero, "mics_shard_size", -1) > 0:
        refuse("zero_optimization.mics_shard_size", "MiCS partitions gradients over subgroups")
    if state.nonfinite == "raise" and engine.fp16_enabled():
        refuse(
            "fp16 (with BucketMOOState nonfinite='raise')",
            "fp16 loss scaling overflows on purpose (DeepSpeed then skips the step), which "
            "nonfinite='raise' would turn into an error; use the default nonfinite='propagate'",
        )
    if stage in (1, 2) and not engine.zero_contiguous_gradients():
        refuse(
            "zero_optimization.contiguous_gradients",
            f"false sends ZeRO-{stage} buckets through buffered_reduce_fallback, which "
            "bucket-MOO does not serve; set it to true (the default)",
        )


def install_deepspeed(engine: Any, state: BucketMOOState) -> int:
    """:func:`~bucketmoo_hooks.install_bucket_moo` for a ``DeepSpeedEngine`` with ZeRO 1, 2 or 3:
    refuses what it cannot serve (naming the configuration key), selects the reduction path it
    replaces (``reduce_scatter`` off for ZeRO-1/2, on for ZeRO-3, logged when that changes the
    configuration) and replaces it on the engine's optimizer. Returns the ZeRO stage."""
    stage = engine.zero_optimization_stage()
    _refuse(engine, state, stage)
    optimizer = engine.optimizer
    expected = "DeepSpeedZeroOptimizer_Stage3" if stage == 3 else "DeepSpeedZeroOptimizer"
    if expected not in (cls.__name__ for cls in type(optimizer).__mro__):
        raise ValueError(
            f"DeepSpeed built a {type(optimizer).__name__} for ZeRO-{stage}, not a {expected} "
            "(e.g. bf16 with data_types.grad_accum_dtype 'fp32' on ZeRO-1, or no optimizer); "
            "bucket-MOO replaces the ZeRO optimizer's reduction: use ZeRO-2, or bf16 gradient "
            "accumulation, and give deepspeed.initialize an optimizer"
        )
    if stage == 3 and getattr(optimizer, "use_muon", False):
        raise ValueError(
            "DeepSpeed ZeRO-3 with the Muon optimizer reduces without reduce_scatter, on a path "
            "bucket-MOO does not serve; use another optimizer or ZeRO-1/2"
        )
    if getattr(optimizer, "_bucket_moo", None) is not None:
        raise ValueError("this DeepSpeed engine already has bucket-MOO installed; install it once")
    needed = "gradient_reduction_w_predivide" if stage in (1, 2) else _STAGE3_REDUCTION
    for name in (needed, "independent_gradient_partition_epilogue", "ipg_buckets"):
        if not hasattr(optimizer, name):
            import deepspeed

            raise RuntimeError(
                f"the ZeRO-{stage} optimizer of DeepSpeed {deepspeed.__version__} has no "
                f"{name.replace('_DeepSpeedZeroOptimizer_Stage3', '')}; see docs/deepspeed.md "
                "for the DeepSpeed versions bucketmoo_hooks supports"
            )
    group = optimizer.dp_process_group
    register(state, engine, group, cpu_buckets=False)
    positions = {id(p): i for i, p in enumerate(engine.module.parameters())}
    sum_scale = 1.0 if getattr(optimizer, "gradient_average", True) else float(group.size())
    reduction = _ZeroReduction(state, optimizer, stage, positions, sum_scale)
    if stage in (1, 2):
        _select_path(optimizer, stage, False)
        optimizer.gradient_reduction_w_predivide = reduction.all_reduce
    else:
        _select_path(optimizer, stage, True)
        setattr(optimizer, _STAGE3_REDUCTION, reduction.reduce_scatter)
    optimizer.independent_gradient_partition_epilogue = reduction.epilogue(
        optimizer.independent_gradient_partition_epilogue
    )
    optimizer._bucket_moo = reduction
    if stage >= 2 and engine.gradient_accumulation_steps() > 1:
        logger.warning(
            "bucketmoo_hooks: ZeRO-%d reduces every micro-batch (gradient_accumulation_steps=%d): "
            "the combination runs per micro-batch, state.iter counts micro-batches, and the "
            "optimizer steps on the mean of the micro-batches' combinations; ZeRO-1 combines "
            "once per optimizer step (docs/deepspeed.md)",
            stage,
            engine.gradient_accumulation_steps(),
        )
    return stage


def _select_path(optimizer: Any, stage: int, reduce_scatter: bool) -> None:
    """Set ``optimizer.reduce_scatter`` to the path bucket-MOO replaces, logging a change."""
    if optimizer.reduce_scatter == reduce_scatter:
        return
    optimizer.reduce_scatter = reduce_scatter
    if reduce_scatter:
        why = (
            "ZeRO-3 keeps only this rank's partition of each gradient, so bucket-MOO reduces "
            "every bucket as a reduce-scatter (half the bytes of the all-reduce that "
            "reduce_scatter: false asks for)"
        )
    else:
        why = (
            f"ZeRO-{stage}'s reduce_scatter path reduces each owner's slices of a bucket "
            "separately, which would split the bucket's problem; bucket-MOO reduces the whole "
            "bucket as an all-reduce (the bytes of DeepSpeed's default multi-rank bucket "
            "all-reduce)"
        )
    logger.warning(
        "bucketmoo_hooks: DeepSpeed zero_optimization.reduce_scatter set to %s: %s",
        str(reduce_scatter).lower(),
        why,
    )
