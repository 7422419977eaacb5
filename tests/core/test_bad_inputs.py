"""The catalogue of bad inputs: every class of wrong argument a user can hand the library is
rejected at once with an error that names the argument, the value and what was expected.

Cases that need a process group run on a one-rank gloo group in this process; the multi-rank
ones (ranks that disagree, FSDP layouts) live beside their features (test_ddp_hook, test_fsdp).
"""

import math
import os
import re
from collections.abc import Callable
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torchjd.aggregation as torchjd_aggregation
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from bucketmoo_hooks import (
    BucketMOOState,
    Diagnostics,
    install_bucket_moo,
    objective_key,
    reference,
)
from bucketmoo_hooks._core import protocol_of
from bucketmoo_hooks._hierarchical import LOCAL_SIZE_VARIABLES
from bucketmoo_hooks.data import load_udhr, udhr_split
from bucketmoo_hooks.weightings import (
    MGDA,
    CAGrad,
    GradVac,
    NashMTL,
    PCGrad,
    UPGrad,
    get_weighting,
)


@pytest.fixture(scope="module")
def one_rank_group(tmp_path_factory: pytest.TempPathFactory):
    """A one-rank gloo process group (the registration checks need a real DDP model)."""
    store = tmp_path_factory.mktemp("store") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.barrier()
    dist.destroy_process_group()


def ddp(**options: object) -> DistributedDataParallel:
    return DistributedDataParallel(nn.Linear(3, 2), **options)


def hooked() -> DistributedDataParallel:
    model = ddp()
    install_bucket_moo(model, BucketMOOState(["en"]))
    return model


class Unpicklable:
    def __reduce__(self):
        raise TypeError("no pickling")

    def __hash__(self) -> int:
        return 0


def state_dict_with(**changes: object) -> dict:
    saved = BucketMOOState(["en"]).state_dict()
    saved.update(changes)
    return saved


# (id, call, exception type, message pattern). Each id is one class of bad input.
CATALOGUE: list[tuple[str, Callable[[], object], type[Exception], str]] = [
    # BucketMOOState(...)
    (
        "state.granularity",
        lambda: BucketMOOState(granularity="layer"),
        ValueError,
        r"granularity must be one of \('bucket', 'parameter', 'global'\), got 'layer'",
    ),
    (
        "state.objective_of_rank=str",
        lambda: BucketMOOState("en"),
        TypeError,
        r"objective_of_rank must be a sequence with one objective id per rank",
    ),
    (
        "state.objective_of_rank=int",
        lambda: BucketMOOState(4),
        TypeError,
        r"objective_of_rank must be a sequence .* got 4",
    ),
    (
        "state.objective_of_rank=[]",
        lambda: BucketMOOState([]),
        ValueError,
        r"objective_of_rank must name the objective of every rank, got \[\]",
    ),
    ("state.objective id unhashable", lambda: BucketMOOState([["en"]]), TypeError, r"objective id"),
    (
        "state.protocol",
        lambda: BucketMOOState(protocol="ring"),
        ValueError,
        r"protocol must be one of \('shard', 'sketch', 'hierarchical'\), got 'ring'",
    ),
    (
        "state.ranks_per_node=0",
        lambda: BucketMOOState(protocol="hierarchical", ranks_per_node=0),
        ValueError,
        r"ranks_per_node must be at least 1, got 0",
    ),
    (
        "state.ranks_per_node=float",
        lambda: BucketMOOState(ranks_per_node=2.0),
        TypeError,
        r"ranks_per_node must be an int \(ranks on each node, or None\), got float 2.0",
    ),
    (
        "state.ranks_per_node=bool",
        lambda: BucketMOOState(ranks_per_node=True),
        TypeError,
        r"ranks_per_node must be an int \(ranks on each node, or None\), got bool True",
    ),
    (
        "state.LOCAL_WORLD_SIZE",
        lambda: with_environment({"LOCAL_WORLD_SIZE": "eight"}, BucketMOOState),
        ValueError,
        r"ranks_per_node defaults to the environment's LOCAL_WORLD_SIZE, which is 'eight', not "
        r"a positive int; pass ranks_per_node=",
    ),
    (
        "state.LOCAL_SIZE",
        lambda: with_environment({"LOCAL_SIZE": "0"}, BucketMOOState),
        ValueError,
        r"ranks_per_node defaults to the environment's LOCAL_SIZE, which is '0', not a positive "
        r"int; pass ranks_per_node=",
    ),
    (
        # Through register_comm_hook nothing checks at registration: the first bucket does.
        "hook: hierarchical without nodes",
        lambda: with_environment(
            {}, lambda: protocol_of(BucketMOOState(["en"], protocol="hierarchical"))
        ),
        ValueError,
        r"protocol='hierarchical' needs ranks_per_node",
    ),
    (
        "state.sketch_size<16",
        lambda: BucketMOOState(protocol="sketch", sketch_size=0),
        ValueError,
        r"sketch_size must be in \[16, 1048576\] .* got 0",
    ),
    (
        "state.sketch_size huge",
        lambda: BucketMOOState(protocol="sketch", sketch_size=1 << 30),
        ValueError,
        r"sketch_size must be in \[16, 1048576\] .* got 1073741824",
    ),
    (
        "state.sketch_size=float",
        lambda: BucketMOOState(protocol="sketch", sketch_size=4096.0),
        TypeError,
        r"sketch_size must be an int .* got float 4096.0",
    ),
    (
        "state.sketch_size=bool",
        lambda: BucketMOOState(protocol="sketch", sketch_size=True),
        TypeError,
        r"sketch_size must be an int .* got bool True",
    ),
    (
        "state.sketch_size without sketch",
        lambda: BucketMOOState(sketch_size=1024),
        ValueError,
        r"sketch_size applies to protocol='sketch' only, got sketch_size=1024 with "
        r"protocol='shard'",
    ),
    (
        "reference.sketch_gramian size",
        lambda: reference.sketch_gramian(torch.ones(2, 40), 8),
        ValueError,
        r"sketch_size must be in \[16, 1048576\]",
    ),
    (
        "state.objective id unpicklable",
        lambda: BucketMOOState([Unpicklable()]),
        TypeError,
        r"objective id",
    ),
    (
        "state.weighting unknown",
        lambda: BucketMOOState(weighting="mgdaa"),
        ValueError,
        r"weighting='mgdaa' is not a known weighting; expected one of \[",
    ),
    (
        "state.weighting type",
        lambda: BucketMOOState(weighting=3),
        TypeError,
        r"weighting must be a name .* got int",
    ),
    (
        "state.process_group type",
        lambda: BucketMOOState(process_group="gloo"),
        TypeError,
        r"process_group must be a torch.distributed.ProcessGroup or None, got str",
    ),
    (
        "state.diagnostics type",
        lambda: BucketMOOState(diagnostics=10),
        TypeError,
        r"diagnostics must be a bucketmoo_hooks.Diagnostics or None, got int",
    ),
    (
        "state.kernels",
        lambda: BucketMOOState(kernels="triton"),
        ValueError,
        r"kernels must be one of .* got 'triton'",
    ),
    (
        "state.set_objective unpicklable",
        lambda: BucketMOOState().set_objective(Unpicklable()),
        TypeError,
        r"objective id",
    ),
    (
        "state.objective id tensor with dimensions",
        lambda: BucketMOOState([torch.tensor([0, 1])]),
        TypeError,
        r"an objective id must be a scalar, got a Tensor of shape \(2,\); .*\.item\(\)",
    ),
    (
        "state.set_objective NaN",
        lambda: BucketMOOState().set_objective(float("nan")),
        ValueError,
        r"an objective id must not be NaN, got nan",
    ),
    (
        "state.weighting torchjd Aggregator",
        lambda: BucketMOOState(weighting=torchjd_aggregation.UPGrad()),
        TypeError,
        r"weighting=UPGrad\(\.\.\.\) is a torchjd Aggregator .* "
        r"pass torchjd\.aggregation\.UPGradWeighting\(\.\.\.\)",
    ),
    (
        "state.nonfinite",
        lambda: BucketMOOState(nonfinite="skip"),
        ValueError,
        r"nonfinite must be one of \('propagate', 'raise'\), got 'skip'",
    ),
    (
        "state.overlap",
        lambda: BucketMOOState(overlap="yes"),
        TypeError,
        r"overlap must be a bool, got 'yes'",
    ),
    # BucketMOOState.load_state_dict(...)
    (
        "load_state_dict type",
        lambda: BucketMOOState(["en"]).load_state_dict([1]),
        TypeError,
        r"state_dict must be a dict, got list",
    ),
    (
        "load_state_dict keys",
        lambda: BucketMOOState(["en"]).load_state_dict({"iter": 1}),
        ValueError,
        r"not a BucketMOOState state_dict: missing keys \[",
    ),
    (
        "load_state_dict version",
        lambda: BucketMOOState(["en"]).load_state_dict(state_dict_with(version=99)),
        ValueError,
        r"state_dict version 99 is not 1",
    ),
    (
        "load_state_dict iter",
        lambda: BucketMOOState(["en"]).load_state_dict(state_dict_with(iter=-1)),
        TypeError,
        r"state_dict\['iter'\] must be a non-negative int, got -1",
    ),
    (
        "load_state_dict other weighting",
        lambda: BucketMOOState(["en"], weighting="mean").load_state_dict(state_dict_with()),
        ValueError,
        r"the checkpoint was saved with weighting='MGDA\(iterations=None\)'",
    ),
    (
        "load_state_dict other objectives",
        lambda: BucketMOOState(["de"]).load_state_dict(state_dict_with()),
        ValueError,
        r"the checkpoint was saved with objective_keys=",
    ),
    (
        "load_state_dict other granularity",
        lambda: BucketMOOState(["en"], granularity="global").load_state_dict(state_dict_with()),
        ValueError,
        r"the checkpoint was saved with granularity='bucket'",
    ),
    (
        "load_state_dict weighting state",
        lambda: BucketMOOState(["en"]).load_state_dict(
            state_dict_with(weighting_state={"targets": []})
        ),
        ValueError,
        r"MGDA is stateless but the checkpoint holds weighting state",
    ),
    # Weightings
    (
        "MGDA.iterations",
        lambda: MGDA(iterations=0),
        ValueError,
        r"iterations must be a positive int or None, got 0",
    ),
    (
        "MGDA.normalization",
        lambda: MGDA(normalization="loss"),
        ValueError,
        r"normalization must be one of \('none', 'l2'\)",
    ),
    ("PCGrad.seed", lambda: PCGrad(seed=0.5), ValueError, r"seed must be an int"),
    ("GradVac.beta", lambda: GradVac(beta=2.0), ValueError, r"beta must be a number in \(0, 1\]"),
    ("CAGrad.c", lambda: CAGrad(c=math.nan), ValueError, r"c must be a finite number ≥ 0"),
    (
        "UPGrad.reg_eps",
        lambda: UPGrad(reg_eps=-1.0),
        ValueError,
        r"reg_eps must be a finite number ≥ 0",
    ),
    (
        "NashMTL.normalization",
        lambda: NashMTL(normalization="l1"),
        ValueError,
        r"normalization must be one of \('sum', 'none'\), got 'l1'",
    ),
    (
        "weighting on a non-square Gramian",
        lambda: MGDA()(torch.ones(2, 3)),
        ValueError,
        r"gramian must be a non-empty square matrix \[L, L\], got shape \(2, 3\)",
    ),
    (
        "callable weighting output",
        lambda: get_weighting(lambda g: g)(torch.eye(2)),
        ValueError,
        r"must return a tensor of shape \[2\] \(one weight per objective\), got \(2, 2\)",
    ),
    (
        "GradVac state",
        lambda: GradVac().load_state_dict({"ema": []}),
        ValueError,
        r"not a GradVac state: keys \['ema'\]",
    ),
    (
        "NashMTL state shape",
        lambda: NashMTL().load_state_dict(
            {"starts": [{"problem": None, "objectives": [1], "beta": torch.ones(2)}]}
        ),
        ValueError,
        r"beta must be a tensor of shape \[1\] \(one row per objective\), got \[2\]",
    ),
    # Diagnostics(...)
    (
        "Diagnostics.log_every",
        lambda: Diagnostics(log_every=0),
        ValueError,
        r"log_every must be a positive int, got 0",
    ),
    (
        "Diagnostics.tensorboard",
        lambda: Diagnostics(tensorboard=object()),
        TypeError,
        r"tensorboard must have add_scalar\(tag, value, step\)",
    ),
    # reference
    (
        "reference grads",
        lambda: reference.bucket_update(torch.ones(3), [0, 1, 2], "mean"),
        ValueError,
        r"grads",
    ),
    (
        "reference objective count",
        lambda: reference.bucket_update(torch.ones(3, 4), [0, 1], "mean"),
        ValueError,
        r"objective_of_rank",
    ),
    (
        "reference bucket sizes",
        lambda: reference.model_update(torch.ones(2, 4), [3, 2], [0, 1], "mean"),
        ValueError,
        r"bucket",
    ),
    ("objective_key unpicklable", lambda: objective_key(Unpicklable()), TypeError, r"objective id"),
    # data
    (
        "load_udhr language",
        lambda: load_udhr(["xx"]),
        ValueError,
        r"unknown UDHR language code\(s\) 'xx'; available: ",
    ),
    (
        "udhr_split fraction",
        lambda: udhr_split({}, valid_fraction=1.5),
        ValueError,
        r"valid_fraction",
    ),
]

# Cases that need the one-rank process group.
DISTRIBUTED: list[tuple[str, Callable[[], object], type[Exception], str]] = [
    (
        "register: not DDP",
        lambda: install_bucket_moo(nn.Linear(2, 2), BucketMOOState()),
        TypeError,
        r"model \(Linear\) is not wrapped for data parallelism: bucket-MOO needs "
        r"DistributedDataParallel",
    ),
    (
        "register: hsdp_mesh for DDP",
        lambda: install_bucket_moo(ddp(), BucketMOOState(["en"]), hsdp_mesh=object()),
        TypeError,
        r"hsdp_mesh is for FSDP2 models \(fully_shard over hsdp_mesh\['shard'\]\), but model "
        r"is a DistributedDataParallel",
    ),
    (
        "register: not a state",
        lambda: install_bucket_moo(ddp(), {"weighting": "mgda"}),
        TypeError,
        r"state must be a BucketMOOState, got dict",
    ),
    (
        "register: second hook",
        lambda: install_bucket_moo(hooked(), BucketMOOState(["en"])),
        ValueError,
        r"the model already has a comm hook \(\['bucket_moo_hook'\]\)",
    ),
    (
        "state: objective count",
        lambda: BucketMOOState(["en", "de"], process_group=dist.group.WORLD),
        ValueError,
        r"objective_of_rank has 2 entries but process_group \(global ranks \[0\]\) has 1 ranks",
    ),
    (
        "register: hierarchical without nodes",
        lambda: with_environment(
            {},
            lambda: install_bucket_moo(ddp(), BucketMOOState(["en"], protocol="hierarchical")),
        ),
        ValueError,
        r"protocol='hierarchical' needs ranks_per_node \(the ranks on each node; torchrun's "
        r"LOCAL_WORLD_SIZE or the DeepSpeed launcher's LOCAL_SIZE is its default, and neither "
        r"is set\)",
    ),
    (
        "register: hierarchical nodes not dividing",
        lambda: install_bucket_moo(
            ddp(), BucketMOOState(["en"], protocol="hierarchical", ranks_per_node=2)
        ),
        ValueError,
        r"ranks_per_node=2 does not divide the process group's 1 ranks; "
        r"protocol='hierarchical' needs whole nodes",
    ),
    (
        # With process_group=None the group is the model's, known at registration.
        "register: objective count",
        lambda: install_bucket_moo(ddp(), BucketMOOState(["en", "de"])),
        ValueError,
        r"objective_of_rank has 2 entries but the model's process group \(global ranks \[0\]\) "
        r"has 1 ranks",
    ),
    (
        "install: unknown wrapper",
        lambda: install_bucket_moo(nn.Linear(2, 2), BucketMOOState()),
        TypeError,
        r"Linear",
    ),
]


def with_environment(values: dict[str, str], call: Callable[[], object]) -> object:
    """``call()`` with the launchers' node sizes (``LOCAL_WORLD_SIZE``, ``LOCAL_SIZE``) as
    ``values`` say (absent if not there)."""
    with mock.patch.dict(os.environ, values):
        for variable in LOCAL_SIZE_VARIABLES:
            if variable not in values:
                os.environ.pop(variable, None)
        return call()


def check(call: Callable[[], object], error: type[Exception], pattern: str) -> None:
    with pytest.raises(error) as raised:
        call()
    assert re.search(pattern, str(raised.value)), str(raised.value)


@pytest.mark.parametrize(
    ("call", "error", "pattern"), [c[1:] for c in CATALOGUE], ids=[c[0] for c in CATALOGUE]
)
def test_bad_input_is_rejected_clearly(call, error, pattern) -> None:
    check(call, error, pattern)


@pytest.mark.parametrize(
    ("call", "error", "pattern"), [c[1:] for c in DISTRIBUTED], ids=[c[0] for c in DISTRIBUTED]
)
def test_bad_registration_is_rejected_clearly(one_rank_group, call, error, pattern) -> None:
    check(call, error, pattern)


def test_catalogue_size() -> None:
    """The README quotes this count; keep them in step."""
    assert len({c[0] for c in CATALOGUE + DISTRIBUTED}) == len(CATALOGUE + DISTRIBUTED) >= 50
