"""Weightings: functions of the Gramian ``G = [⟨ḡ_a, ḡ_b⟩]`` that return one weight per objective.

Every method is usable in the hook (``BucketMOOState(weighting=...)``), in
:mod:`bucketmoo_hooks.reference`, and on its own::

    from bucketmoo_hooks.weightings import MGDA
    weights = MGDA()(gramian)
"""

from ._aligned_mtl import AlignedMTL
from ._base import (
    BatchedWeighting,
    CallableWeighting,
    Weighting,
    WeightingContext,
    get_weighting,
    weighting_names,
)
from ._cagrad import CAGrad
from ._dualproj import DualProj
from ._gradvac import GradVac
from ._imtl_g import IMTLG
from ._mean import Mean
from ._mgda import MGDA, duality_gap, min_norm_weights
from ._nash_mtl import NashMTL
from ._pcgrad import PCGrad
from ._upgrad import UPGrad

__all__ = [
    "IMTLG",
    "MGDA",
    "AlignedMTL",
    "BatchedWeighting",
    "CAGrad",
    "CallableWeighting",
    "DualProj",
    "GradVac",
    "Mean",
    "NashMTL",
    "PCGrad",
    "UPGrad",
    "Weighting",
    "WeightingContext",
    "duality_gap",
    "get_weighting",
    "min_norm_weights",
    "weighting_names",
]
