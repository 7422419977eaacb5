"""The bytes of every collective by link class, derived from the protocols' descriptions
(docs/protocols.md), for the DDP and FSDP byte tests: the flat protocols split each collective
by peer pairs, the hierarchical protocol sends within and across nodes as its steps say."""

from bucketmoo_hooks._collectives import all_reduce_bytes


def flat_links(sent: dict[str, int], world_size: int, ranks_per_node: int | None) -> dict[str, int]:
    """One call per collective over all ``R`` ranks, each peer getting an equal share: of a
    rank's ``R−1`` peers, ``R−G`` are on other nodes (none when ``G`` is unknown)."""
    size = world_size if ranks_per_node is None else ranks_per_node
    cross = sum(n * (world_size - size) // (world_size - 1) for n in sent.values())
    return {"intra_node": sum(sent.values()) - cross, "cross_node": cross}


def hierarchical_bytes(
    numel: int,
    element_size: int,
    world_size: int,
    ranks_per_node: int,
    objectives_on_node: int,
    gramian_numbers: int,
    all_reduce: bool,
) -> tuple[dict[str, int], dict[str, int]]:
    """``(bytes by collective, bytes by link class)`` of one bucket on a rank whose node trains
    ``objectives_on_node`` objectives (``L_k``): step 1's all-to-all within the node, step 3's
    across nodes, the Gramian all-reduce over all ranks, and (an all-reduce) step 5's
    all-gathers across nodes, then within."""
    size, nodes = ranks_per_node, world_size // ranks_per_node
    b, c = element_size, -(-numel // world_size)
    gramian = all_reduce_bytes(gramian_numbers * 4, world_size)
    gramian_cross = gramian * (world_size - size) // (world_size - 1)
    within = (size - 1) * nodes * c * b  # one node-local exchange: (G−1)/G of R·c
    sent = {
        "all_to_all": within + objectives_on_node * c * (nodes - 1) * b,
        "all_reduce": gramian,
    }
    cross = objectives_on_node * c * (nodes - 1) * b + gramian_cross
    if all_reduce:
        sent["all_gather"] = c * (nodes - 1) * b + within
        cross += c * (nodes - 1) * b
    return sent, {"intra_node": sum(sent.values()) - cross, "cross_node": cross}
