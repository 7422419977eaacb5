"""Byte accounting: what this rank sends through every collective the hook issues."""

from dataclasses import dataclass, field

from ._collectives import all_reduce_bytes, reduce_scatter_bytes

#: The link classes of :attr:`BucketTraffic.links`.
LINKS = ("intra_node", "cross_node")


@dataclass(slots=True)
class BucketTraffic:
    """Bytes this rank sent for one bucket, by collective and by link class.

    ``numel`` and ``element_size`` describe the bucket itself, so that the traffic can be compared
    with the plain all-reduce of the same bucket (:meth:`allreduce_bytes`). ``links``: the same
    bytes by link class, ``"intra_node"`` and ``"cross_node"`` (:mod:`._collectives`).
    """

    index: int
    numel: int
    element_size: int
    sent: dict[str, int] = field(default_factory=dict)
    links: dict[str, int] = field(default_factory=lambda: dict.fromkeys(LINKS, 0))

    def add(self, collective: str, nbytes: int, cross_node: int = 0) -> None:
        """Count ``nbytes`` sent through ``collective``, ``cross_node`` of them off the node."""
        self.sent[collective] = self.sent.get(collective, 0) + nbytes
        self.links["intra_node"] += nbytes - cross_node
        self.links["cross_node"] += cross_node

    @property
    def total(self) -> int:
        return sum(self.sent.values())

    def allreduce_bytes(self, world_size: int) -> int:
        """What DDP's ring all-reduce of the same bucket sends."""
        return all_reduce_bytes(self.numel * self.element_size, world_size)

    def reduce_scatter_bytes(self, world_size: int) -> int:
        """What FSDP's own reduce-scatter of the same unit sends."""
        return reduce_scatter_bytes(self.numel * self.element_size, world_size)


class CommLedger:
    """Per-bucket and per-step record of the bytes this rank sends through each collective.

    Every collective the hook issues is counted from the tensors it is given (per bucket in a
    :class:`BucketTraffic`, outside buckets with :meth:`record_overhead`) as the bytes a rank
    sends under the bandwidth-optimal algorithm of that collective (all-to-all: all but its own
    chunk; ring all-reduce: ``2(R−1)/R`` of the tensor; all-gather: ``R−1`` chunks). Counting is
    host-side integer arithmetic on tensor sizes: it never touches the device.

    Attributes:
        world_size: ``R`` of the process group the bytes were counted for (set by the hook).
        last_step: The buckets of the last completed step, in the order the hook saw them.
        step_overhead: Bytes of the last completed step that belong to no bucket (the objective
            exchange at the start of the step), by collective.
        totals: Bytes by collective, summed over all completed steps.
        link_totals: The buckets' bytes by link class (``"intra_node"``, ``"cross_node"``),
            summed over all completed steps.
        steps: Number of completed steps.
    """

    __slots__ = (
        "_current",
        "_current_overhead",
        "last_step",
        "link_totals",
        "step_overhead",
        "steps",
        "totals",
        "world_size",
    )

    def __init__(self, world_size: int = 0) -> None:
        self.world_size = world_size
        self._current: list[BucketTraffic] = []
        self._current_overhead: dict[str, int] = {}
        self.last_step: list[BucketTraffic] = []
        self.step_overhead: dict[str, int] = {}
        self.totals: dict[str, int] = {}
        self.link_totals: dict[str, int] = dict.fromkeys(LINKS, 0)
        self.steps = 0

    def __setstate__(self, state: tuple[None, dict[str, object]]) -> None:
        # Ledgers pickled before the link classes: none counted.
        self.link_totals = dict.fromkeys(LINKS, 0)
        for slot, value in state[1].items():
            setattr(self, slot, value)
        for traffic in self.last_step:
            if not hasattr(traffic, "links"):
                traffic.links = dict.fromkeys(LINKS, 0)

    def open_bucket(self, index: int, numel: int, element_size: int) -> BucketTraffic:
        traffic = BucketTraffic(index, numel, element_size)
        self._current.append(traffic)
        return traffic

    def record_overhead(self, collective: str, nbytes: int) -> None:
        """Count bytes of this step that belong to no bucket."""
        self._current_overhead[collective] = self._current_overhead.get(collective, 0) + nbytes

    def close_step(self) -> None:
        for traffic in self._current:
            for collective, nbytes in traffic.sent.items():
                self.totals[collective] = self.totals.get(collective, 0) + nbytes
            for link, nbytes in traffic.links.items():
                self.link_totals[link] += nbytes
        for collective, nbytes in self._current_overhead.items():
            self.totals[collective] = self.totals.get(collective, 0) + nbytes
        self.last_step, self._current = self._current, []
        self.step_overhead, self._current_overhead = self._current_overhead, {}
        self.steps += 1

    def last_step_bytes(self) -> int:
        """Everything this rank sent in the last completed step, overhead included."""
        return sum(t.total for t in self.last_step) + sum(self.step_overhead.values())

    def last_step_link_bytes(self) -> dict[str, int]:
        """The buckets' bytes of the last completed step by link class (the per-step objective
        exchange, a few bytes per rank, is left out)."""
        links = dict.fromkeys(LINKS, 0)
        for traffic in self.last_step:
            for link, nbytes in traffic.links.items():
                links[link] += nbytes
        return links

    def last_step_allreduce_bytes(self) -> int:
        """What a ring all-reduce of the same buckets would have sent in the last step."""
        return sum(t.allreduce_bytes(self.world_size) for t in self.last_step)

    def last_step_reduce_scatter_bytes(self) -> int:
        """What FSDP's reduce-scatter of the same units would have sent in the last step (1-D
        FSDP; for HSDP ``world_size`` is the whole mesh and this is not the comparison)."""
        return sum(t.reduce_scatter_bytes(self.world_size) for t in self.last_step)
