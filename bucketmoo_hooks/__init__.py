"""Conflict-aware (multi-objective) gradient aggregation inside PyTorch's gradient collectives.

Each rank's gradient is the gradient of its objective (e.g. its language). Per gradient bucket
(a DDP bucket, an FSDP unit), the engine's average is replaced by a multi-objective combination
(MGDA and other Gramian-based weightings) computed with an exchange protocol that moves the
bytes of the engine's own reduction::

    from bucketmoo_hooks import BucketMOOState, install_bucket_moo
    state = BucketMOOState(objective_of_rank=[0, 0, 1, 1], weighting="mgda")
    install_bucket_moo(model, state)  # DDP, FSDP2 (HSDP with hsdp_mesh=), FSDP1

or, on a DDP model, ``ddp_model.register_comm_hook(state, bucket_moo_hook)``.
"""

from . import reference, weightings
from ._ddp import bucket_moo_hook
from ._diagnostics import Diagnostics
from ._fsdp2 import BucketMOOReduceScatter
from ._install import Installation, install_bucket_moo
from ._ledger import CommLedger
from ._nonfinite import NonFiniteGradientError
from ._objectives import ObjectiveMap, objective_key
from ._state import BucketMOOState
from ._units import FSDPUnit
from .weightings import Weighting, weighting_names

__all__ = [
    "BucketMOOReduceScatter",
    "BucketMOOState",
    "CommLedger",
    "Diagnostics",
    "FSDPUnit",
    "Installation",
    "NonFiniteGradientError",
    "ObjectiveMap",
    "Weighting",
    "bucket_moo_hook",
    "install_bucket_moo",
    "objective_key",
    "reference",
    "weighting_names",
    "weightings",
]
