"""The bytes of the sketch protocol's one small collective, derived from the protocol's
description (docs/protocols.md), for the DDP and FSDP byte tests."""

from collections.abc import Sequence

from bucketmoo_hooks._collectives import all_gather_bytes, all_reduce_bytes
from bucketmoo_hooks._sketch import fold_width


def sketch_collective(
    problem_sizes: Sequence[int],
    parameters: int,
    num_objectives: int,
    world_size: int,
    sketch_size: int,
    element_size: int = 4,
) -> tuple[str, int]:
    """``(collective, bytes)``: ``Y`` (a problem of ``n`` elements takes ``n`` numbers when
    ``n ≤ k``, else ``p``) and ``L`` presence counts per parameter, all-reduced as ``[L, K]``
    rows or all-gathered as ``[R, K + P]``, whichever sends fewer bytes."""
    width = sum(n if n <= sketch_size else fold_width(sketch_size) for n in problem_sizes)
    reduced = (num_objectives * width + parameters * num_objectives) * element_size
    gathered = world_size * (width + parameters) * element_size
    all_gather = all_gather_bytes(gathered, world_size)
    all_reduce = all_reduce_bytes(reduced, world_size)
    return ("all_gather", all_gather) if all_gather < all_reduce else ("all_reduce", all_reduce)
