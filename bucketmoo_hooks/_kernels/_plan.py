"""How a slice is cut into work items: one thread block of each kernel per item.

The table layout is the one ``csrc/common.cuh`` reads (int32): the first item of every segment
(``S + 1`` entries), then ``(segment, lo, hi)`` per item. Segment items come first, in segment
order, each at most ``chunk`` columns, and every segment has at least one (an empty segment gets an
empty item, whose block still computes the segment's weights). Gap items (segment ``-1``) cover the
columns outside every segment; the combine writes zeros there, as ``combine_segments`` does.
"""

import itertools
from collections.abc import Sequence

from ._sources import BLOCK

Segment = tuple[int, int]

#: Items per multiprocessor for a long slice: enough blocks to fill the device with a few blocks
#: per multiprocessor and balance the tail, few enough that each runs long and the partial
#: Gramians stay small.
ITEMS_PER_MULTIPROCESSOR = 4
#: Item lengths are multiples of this (two tiles of one column per thread) …
GRANULE = 2 * BLOCK
#: … and at least this long, so that a block amortises its prologue (rank plan, weights).
MIN_CHUNK = 8 * GRANULE


def chunk_columns(columns: int, multiprocessors: int) -> int:
    """The longest item for a slice of ``columns`` on a device with ``multiprocessors``."""
    target = -(-columns // (ITEMS_PER_MULTIPROCESSOR * multiprocessors))
    return max(MIN_CHUNK, -(-target // GRANULE) * GRANULE)


def work_table(columns: int, segments: Sequence[Segment], chunk: int) -> tuple[list[int], int]:
    """The table for ``segments`` of a slice of ``columns``, and how many segment items it has.

    Raises:
        ValueError: A segment outside ``[0, columns]``, reversed, or overlapping another, or no
            segment at all.
    """
    if not segments:
        raise ValueError("a slice needs at least one segment")
    covered: list[Segment] = []
    for lo, hi in segments:
        if not 0 <= lo <= hi <= columns:
            raise ValueError(f"segment ({lo}, {hi}) is not within the slice [0, {columns}]")
        if lo < hi:
            covered.append((lo, hi))
    covered.sort()
    for (_, end), (start, _) in itertools.pairwise(covered):
        if start < end:
            raise ValueError(f"segments overlap: one ends at {end}, the next starts at {start}")

    starts: list[int] = []
    items: list[int] = []
    for segment, (lo, hi) in enumerate(segments):
        starts.append(len(items) // 3)
        items += [segment, lo, lo] if lo == hi else []
        for start in range(lo, hi, chunk):
            items += [segment, start, min(start + chunk, hi)]
    segment_items = len(items) // 3
    starts.append(segment_items)

    position = 0
    for lo, hi in [*covered, (columns, columns)]:
        for start in range(position, lo, chunk):
            items += [-1, start, min(start + chunk, lo)]
        position = hi
    return starts + items, segment_items
