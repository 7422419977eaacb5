"""What a state uses while it runs, and how an installer ties a state to its model and group.

None of it is configuration or progress: it is rebuilt after unpickling, never saved.
"""

import functools
import weakref
from collections import OrderedDict
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._collectives import nbytes
from ._groups import (
    HOST,
    OVERLAP,
    SKETCH,
    helper_group,
    node_groups,
    node_layout_error,
    ranks_of,
    shared_worker,
)
from ._objectives import ObjectiveMap
from ._worker import BucketWorker

if TYPE_CHECKING:
    from ._core import _Held
    from ._protocol import ExchangeProtocol
    from ._state import BucketMOOState

# Distinct (objective map, device) pairs whose averaging matrix is kept; per-step sampling of
# languages can produce many maps, so the cache is bounded.
_AVERAGING_CACHE_SIZE = 64


class Workspace:
    """Buffers reused from bucket to bucket for the exchange of CPU buckets, one bucket at a time.

    A fresh bucket-sized tensor on CPU is fresh pages: glibc hands large blocks back to the
    system when they are freed, so every bucket would page-fault its buffers in again (tens of
    thousands of faults per step, measured to cost as much as the exchange itself on gloo). Holds
    at most two buffers of the largest bucket per dtype. Not for CUDA tensors (the caching
    allocator already reuses blocks, in stream order) and not for slices that outlive the call
    (global MOO holds them).
    """

    __slots__ = ("_buffers",)

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype], Tensor] = {}

    def take(self, slot: str, numel: int, dtype: torch.dtype) -> Tensor:
        """``numel`` elements of buffer ``slot``; its content is whatever the last user left."""
        buffer = self._buffers.get((slot, dtype))
        if buffer is None or buffer.numel() < numel:
            buffer = self._buffers[slot, dtype] = torch.empty(numel, dtype=dtype)
        return buffer[:numel]

    @property
    def nbytes(self) -> int:
        return sum(nbytes(b) for b in self._buffers.values())


class Runtime:
    """The registered model, the process groups, threads, streams and buffers of one state."""

    __slots__ = (
        "_averaging",
        "_host_group",
        "_side_streams",
        "_worker",
        "every_parameter_used",
        "held",
        "model",
        "parameter_index",
        "protocol",
        "workspace",
    )

    def __init__(self) -> None:
        # -- set by the installers -----------------------------------------------------------------
        # The model the state is installed on (weakly): one per state.
        self.model: weakref.ref[nn.Module] | None = None
        # id(parameter) → position in model.parameters() (DDP): stable problem keys.
        self.parameter_index: dict[int, int] | None = None
        # The engine guarantees every rank uses every parameter (DDP without
        # find_unused_parameters): then no objective can be absent and nobody looks.
        self.every_parameter_used = False
        # -- per step ------------------------------------------------------------------------------
        # Global MOO: the buckets waiting for the model's weights (:mod:`._core`).
        self.held: list[_Held] = []
        # -- resources -----------------------------------------------------------------------------
        # The state's protocol object (:func:`._core.protocol_of`), with its device buffers.
        self.protocol: ExchangeProtocol | None = None
        self._host_group: dist.ProcessGroup | None = None
        self._worker: BucketWorker | None = None
        self._side_streams: dict[torch.device, torch.cuda.Stream] = {}
        self.workspace = Workspace()  # CPU exchange buffers, reused from bucket to bucket
        self._averaging: OrderedDict[tuple[tuple[int, ...], torch.device], Tensor] = OrderedDict()

    def averaging(self, objective_map: ObjectiveMap, device: torch.device) -> Tensor:
        """``M`` of ``objective_map`` on ``device`` (cached)."""
        cache_key = (objective_map.keys, device)
        matrix = self._averaging.get(cache_key)
        if matrix is None:
            matrix = objective_map.averaging_matrix(device)
            self._averaging[cache_key] = matrix
            if len(self._averaging) > _AVERAGING_CACHE_SIZE:
                self._averaging.popitem(last=False)
        else:
            self._averaging.move_to_end(cache_key)
        return matrix

    def host_group(self, group: dist.ProcessGroup) -> dist.ProcessGroup:
        """A group over ``group``'s ranks that runs collectives on CPU tensors: ``group`` itself
        if it has a gloo backend, else its gloo copy."""
        if has_cpu_backend(group):
            return group
        if self._host_group is None:
            self._host_group = helper_group(group, HOST)
        return self._host_group

    def overlap_worker(self, group: dist.ProcessGroup) -> BucketWorker:
        """The worker thread for CPU buckets, over the copy of ``group`` that every state over
        its ranks shares (made at registration; with ``register_comm_hook`` directly, here at
        bucket 0, where every rank of the group makes it alike)."""
        if self._worker is None or self._worker.closed:
            self._worker = shared_worker(helper_group(group, OVERLAP))
        return self._worker

    def side_stream(self, device: torch.device) -> torch.cuda.Stream:
        stream = self._side_streams.get(device)
        if stream is None:
            stream = self._side_streams[device] = torch.cuda.Stream(device)
        return stream

    def fail_held(self, error: BaseException) -> None:
        """Complete the held buckets' futures with ``error``: DDP waits on them."""
        held, self.held = self.held, []
        for h in held:
            h.outcome.set_result(error)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.close()


def register(
    state: "BucketMOOState", model: nn.Module, group: dist.ProcessGroup | None, cpu_buckets: bool
) -> None:
    """What every installer does once the model is checked, before it installs anything.

    Refuses a state registered on another live model; adopts ``group`` (the one the model
    reduces over; ``None``: the state's own) if ``state.process_group`` is ``None``, else checks
    that ``process_group`` has its ranks in order; checks ``objective_of_rank`` against the group
    adopted; creates the gloo groups the hook will use beside it (a rendezvous of its ranks,
    here rather than inside backward). Raises alike on every rank, before the rendezvous.
    """
    runtime = state._runtime
    registered = None if runtime.model is None else runtime.model()
    if registered is not None:
        raise ValueError(
            f"this BucketMOOState is already registered on another model "
            f"({type(registered).__name__}); create one state per DDP or FSDP model"
        )
    if group is None:
        group, described = state.group, "the state's process group"
    elif state.process_group is None:
        described = "the model's process group"
    elif ranks_of(state.process_group) != ranks_of(group):
        raise ValueError(
            f"state.process_group (ranks {ranks_of(state.process_group)}) is not the process "
            f"group the model reduces over (ranks {ranks_of(group)}); pass process_group=None "
            "to adopt the model's group, or a group with its ranks"
        )
    else:  # the state's own group over the model's ranks: the one the hook uses
        group, described = state.process_group, "process_group"
    state._check_world_size(group.size(), described_group(described, group))
    runtime.host_group(group)
    if state.overlap and cpu_buckets:
        helper_group(group, OVERLAP)
    if state.protocol == "sketch" and state.overlap and cpu_buckets:
        helper_group(group, SKETCH)
    if state.protocol == "hierarchical":
        _check_nodes(state, group)
        base = helper_group(group, OVERLAP) if state.overlap and cpu_buckets else group
        if state.ranks_per_node not in (1, group.size()):  # else one level: the flat exchange
            node_groups(base, state.ranks_per_node)
    state.process_group = group
    runtime.model = weakref.ref(model)
    # The step's objective exchange starts at its first forward, not at its first bucket.
    # (The model holds the state anyway, through its comm hook or reduce-scatter hooks.)
    model.register_forward_pre_hook(functools.partial(_start_exchange, state))


def _start_exchange(state: "BucketMOOState", module: nn.Module, args: object) -> None:
    """Forward pre-hook: start the step's objective exchange (:class:`._steps.StepAgreement`)."""
    state._steps.start(state)


def _check_nodes(state: "BucketMOOState", group: dist.ProcessGroup) -> None:
    """The hierarchical protocol's nodes: ``ranks_per_node`` the same on every rank (it may come
    from each node's ``LOCAL_WORLD_SIZE``) and a layout of whole nodes. Raises alike on every
    rank, before any rank makes the node groups (a rank that raised alone would leave the
    others waiting in that rendezvous)."""
    values: list[object] = [None] * group.size()
    dist.all_gather_object(values, state.ranks_per_node, group=state._runtime.host_group(group))
    if len(set(values)) != 1:
        raise ValueError(
            f"ranks disagree on ranks_per_node (per rank of the process group: {values}); "
            "protocol='hierarchical' needs nodes of the same size, the same on every rank"
        )
    error = node_layout_error(state.ranks_per_node, ranks_of(group))
    if error is not None:
        raise ValueError(error)


def has_cpu_backend(group: dist.ProcessGroup) -> bool:
    """Whether collectives on CPU tensors run on ``group`` (gloo, or a ``cpu:gloo,...`` group)."""
    return "gloo" in dist.get_backend(group)


def described_group(name: str, group: dist.ProcessGroup) -> str:
    return f"{name} (global ranks {ranks_of(group)})"
