"""Conflict-aware (multi-objective) gradient aggregation inside PyTorch's gradient collectives.

Each rank's gradient is the gradient of its objective (e.g. its language). Per gradient bucket,
the hook replaces DDP's average by a multi-objective combination (MGDA and other Gramian-based
weightings) computed with the shard-Gramian protocol, which moves the bytes of an all-reduce::

    from bucketmoo_hooks import BucketMOOState, bucket_moo_hook
    state = BucketMOOState(objective_of_rank=[0, 0, 1, 1], weighting="mgda", process_group=None)
    ddp_model.register_comm_hook(state, bucket_moo_hook)
"""

from . import reference, weightings
from ._diagnostics import Diagnostics
from ._fsdp1 import register_fsdp_moo_hook
from ._fsdp2 import BucketMOOReduceScatter, install_fsdp_moo
from ._hook import bucket_moo_hook, register_bucket_moo_hook
from ._install import install_bucket_moo
from ._ledger import BucketTraffic, CommLedger, ring_allreduce_bytes
from ._nonfinite import NonFiniteGradientError
from ._objectives import ObjectiveMap, objective_key
from ._state import BucketMOOState
from ._units import FSDPUnit
from .weightings import Weighting, weighting_names

__all__ = [
    "BucketMOOReduceScatter",
    "BucketMOOState",
    "BucketTraffic",
    "CommLedger",
    "Diagnostics",
    "FSDPUnit",
    "NonFiniteGradientError",
    "ObjectiveMap",
    "Weighting",
    "bucket_moo_hook",
    "install_bucket_moo",
    "install_fsdp_moo",
    "objective_key",
    "reference",
    "register_bucket_moo_hook",
    "register_fsdp_moo_hook",
    "ring_allreduce_bytes",
    "weighting_names",
    "weightings",
]
