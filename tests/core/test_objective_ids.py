"""Objective ids and weighting configurations: what ranks compare must be the same value in
every process, and different configurations must not look alike."""

import functools
import inspect
import io
import re
import sys

import numpy as np
import pytest
import torch
from _distributed import shared_spawn
from _id_workers import id_and_weighting_checks, scaled, tempered

from bucketmoo_hooks import BucketMOOState, Diagnostics, objective_key, reference
from bucketmoo_hooks.single_device import SingleDeviceMOO
from bucketmoo_hooks.weightings import CallableWeighting, Weighting, get_weighting, weighting_names

# -- objective ids ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "value"),
    [
        (torch.tensor(0), 0),
        (torch.tensor(3, dtype=torch.int32), 3),
        (torch.tensor(0.5), 0.5),
        (torch.tensor(True), True),
        (np.int64(3), 3),
        (np.float32(0.5), 0.5),
        (np.bool_(True), True),
        (np.str_("en"), "en"),
        (np.array(2), 2),
        (("en", torch.tensor(1)), ("en", 1)),
    ],
    ids=repr,
)
def test_scalar_tensors_and_numpy_scalars_are_their_python_value(given, value) -> None:
    # A tensor's pickle holds its storage address: two equal tensors alive at once differ.
    assert objective_key(given) == objective_key(value)
    twin = given.clone() if isinstance(given, torch.Tensor) else given
    assert objective_key(twin) == objective_key(given)
    assert BucketMOOState([given]).objective_of_rank == (value,)


def test_scalar_tensor_kinds_stay_apart() -> None:
    """int, float and bool tensors become int, float and bool: different objectives, as 1, 1.0
    and True are."""
    keys = {objective_key(torch.tensor(1, dtype=dtype)) for dtype in (torch.int64, torch.bool)}
    keys.add(objective_key(torch.tensor(1.0)))
    assert len(keys) == 3


@pytest.mark.parametrize(
    "given", [torch.tensor([0]), torch.zeros(2, 3), np.array([1, 2])], ids=["[1]", "[2,3]", "np"]
)
def test_tensor_ids_with_dimensions_are_refused(given) -> None:
    pattern = r"an objective id must be a scalar, got a \w+ of shape .*\.item\(\)"
    with pytest.raises(TypeError, match=pattern):
        objective_key(given)
    with pytest.raises(TypeError, match=pattern):
        BucketMOOState().set_objective(given)


@pytest.mark.parametrize(
    "given",
    [
        float("nan"),
        float("inf") - float("inf"),
        torch.tensor(float("nan")),
        np.float64("nan"),
        ("en", float("nan")),
        complex(0.0, float("nan")),
    ],
    ids=["nan", "inf-inf", "tensor", "numpy", "in tuple", "complex"],
)
def test_nan_ids_are_refused(given) -> None:
    with pytest.raises(ValueError, match=r"an objective id must not be NaN"):
        objective_key(given)
    with pytest.raises(ValueError, match=r"must not be NaN"):
        BucketMOOState([given])
    with pytest.raises(ValueError, match=r"must not be NaN"):
        BucketMOOState().set_objective(given)


def test_ids_whose_pickle_varies_are_refused_or_normalised() -> None:
    """A frozenset pickles its items in (salted) hash order; -0.0 pickles unlike 0.0."""
    with pytest.raises(TypeError, match=r"must not be a frozenset.*sorted tuple"):
        objective_key(frozenset({"en", "de"}))
    assert objective_key(-0.0) == objective_key(0.0)
    assert objective_key(torch.tensor(-0.0)) == objective_key(0.0)


def test_every_entry_point_takes_a_scalar_tensor_as_its_value() -> None:
    state = BucketMOOState([torch.tensor(0), "de"], diagnostics=Diagnostics())
    state.set_objective(torch.tensor(7))
    assert state._steps.own_key(state, rank=0) == objective_key(7)
    assert state._steps.objective == (7, objective_key(7))
    assert set(state.diagnostics.labels.values()) == {"0", "de", "7"}  # not "tensor(0)"
    digest = BucketMOOState([0, "de"])._config_digest(2)
    assert BucketMOOState([torch.tensor(0), "de"])._config_digest(2) == digest
    assert state.state_dict()["objective_keys"] == [objective_key(0), objective_key("de")]

    grads = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    objective_grads, objective_map = reference.objective_gradients(
        grads, [torch.tensor(0), 0, torch.tensor(1)]
    )
    assert objective_map.group_sizes == (2, 1)
    torch.testing.assert_close(objective_grads[0], (grads[0] + grads[1]) / 2)

    model = torch.nn.Linear(2, 1)
    engine = SingleDeviceMOO(model.parameters(), diagnostics=Diagnostics())
    for objective in (torch.tensor(0), 0):
        model(torch.ones(1, 2)).sum().backward()
        engine.add_gradient(objective)
    assert len(set(engine._keys)) == 1
    assert engine.diagnostics.labels == {objective_key(0): "0"}


# -- weighting configurations ----------------------------------------------------------------------

ADDRESS = re.compile(r"0x[0-9a-f]{6,}")
#: Another value for every constructor argument of a built-in weighting (first one it accepts).
OTHER_VALUES = {
    "scale_mode": ("median",),
    "c": (0.9,),
    "iterations": (3,),
    "reg_eps": (0.5,),
    "beta": (0.5,),
    "seed": (1,),
    "normalization": ("l2", "none"),
}


def other_instance(cls: type[Weighting], argument: str, default: object) -> Weighting:
    for value in OTHER_VALUES[argument]:
        if value != default:
            try:
                return cls(**{argument: value})
            except ValueError:
                continue
    raise AssertionError(f"no other value of {cls.__name__}({argument}=...) in OTHER_VALUES")


@pytest.mark.parametrize("name", weighting_names())
def test_builtin_configs_name_every_hyperparameter(name: str) -> None:
    cls = Weighting._registry[name]
    config = cls().config()
    assert config == repr(cls()) and not ADDRESS.search(config)
    for argument in inspect.signature(cls).parameters.values():
        if argument.kind in (argument.VAR_POSITIONAL, argument.VAR_KEYWORD):
            continue
        assert argument.name in OTHER_VALUES, f"add {name}'s {argument.name} to OTHER_VALUES"
        other = other_instance(cls, argument.name, argument.default)
        assert other.config() != config, f"{name}'s config leaves out {argument.name}"


class Opaque:
    def __call__(self, gramian: torch.Tensor) -> torch.Tensor:
        return gramian.diagonal()


class AddressInRepr(Opaque):
    def __repr__(self) -> str:
        return f"AddressInRepr(helper={object()!r})"


def test_callable_configs_are_process_independent_and_hold_hyperparameters() -> None:
    module = __name__
    partial = CallableWeighting(functools.partial(tempered, temperature=1.0))
    assert partial.config().startswith("CallableWeighting(functools.partial(_id_workers.tempered, ")
    assert partial.config().endswith("temperature=1.0))")
    assert partial.config() == get_weighting(functools.partial(tempered, temperature=1.0)).config()
    assert partial.config() != get_weighting(functools.partial(tempered, temperature=2.0)).config()
    assert scaled(1.0) is not scaled(1.0)
    assert get_weighting(scaled(1.0)).config() == get_weighting(scaled(1.0)).config()
    assert get_weighting(scaled(1.0)).config() != get_weighting(scaled(2.0)).config()
    assert "scaled.<locals>.weights[scale=1.0]" in get_weighting(scaled(1.0)).config()
    tensor_argument = CallableWeighting(functools.partial(tempered, torch.ones(1))).config()
    assert tensor_argument.endswith("tempered, <Tensor>))")  # not by value: by type only
    assert CallableWeighting(Opaque()).config() == "CallableWeighting(Opaque)"
    assert CallableWeighting(AddressInRepr()).config() == "CallableWeighting(AddressInRepr)"
    assert CallableWeighting(Opaque().__call__).config() == (
        f"CallableWeighting({module}.Opaque.__call__)"
    )


def test_digest_and_checkpoint_follow_the_config() -> None:
    def state(temperature: float) -> BucketMOOState:
        return BucketMOOState(weighting=functools.partial(tempered, temperature=temperature))

    assert state(1.0)._config_digest(2) == state(1.0)._config_digest(2)
    assert state(1.0)._config_digest(2) != state(2.0)._config_digest(2)
    assert BucketMOOState(weighting=scaled(1.0))._config_digest(2) != (
        BucketMOOState(weighting=scaled(2.0))._config_digest(2)
    )
    saved = state(1.0)
    saved.iter = 5
    buffer = io.BytesIO()
    torch.save(saved.state_dict(), buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    restored = state(1.0)
    restored.load_state_dict(checkpoint)
    assert restored.iter == 5
    for other in (state(2.0), BucketMOOState(weighting=scaled(1.0))):
        with pytest.raises(ValueError, match=r"the checkpoint was saved with weighting="):
            other.load_state_dict(checkpoint)
    closure = BucketMOOState(weighting=scaled(1.0)).state_dict()
    with pytest.raises(ValueError, match=r"saved with weighting=.*scale=1\.0"):
        BucketMOOState(weighting=scaled(2.0)).load_state_dict(closure)


def test_checkpoints_naming_a_function_by_qualified_name_still_load() -> None:
    legacy = BucketMOOState(weighting=tempered).state_dict()
    legacy["weighting"] = "CallableWeighting(tempered)"
    legacy["iter"] = 3
    state = BucketMOOState(weighting=tempered)
    state.load_state_dict(legacy)
    assert state.iter == 3
    with pytest.raises(ValueError, match=r"saved with weighting='CallableWeighting\(tempered\)'"):
        BucketMOOState(weighting=scaled(1.0)).load_state_dict(legacy)


# -- torchjd aggregators ---------------------------------------------------------------------------


def test_torchjd_aggregators_are_refused_with_the_weighting_to_use() -> None:
    aggregation = pytest.importorskip("torchjd.aggregation")
    gramian = torch.tensor([[4.0, -1.0], [-1.0, 1.0]])
    # What an Aggregator would have done: other numbers than the matching Weighting.
    assert not torch.allclose(aggregation.UPGrad()(gramian), aggregation.UPGradWeighting()(gramian))
    with pytest.raises(TypeError, match=r"torchjd\.aggregation\.UPGradWeighting\(\.\.\.\)"):
        get_weighting(aggregation.UPGrad())
    with pytest.raises(TypeError, match=r"torchjd has no ConFIGWeighting"):
        BucketMOOState(weighting=aggregation.ConFIG())
    assert isinstance(get_weighting(aggregation.UPGradWeighting()), CallableWeighting)


def test_aggregators_are_recognised_without_torchjd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchjd.aggregation", None)  # import raises ImportError
    aggregator = type("Aggregator", (), {"__module__": "torchjd.aggregation._aggregator_bases"})
    upgrad = type("UPGrad", (aggregator,), {"__call__": lambda self, matrix: matrix.sum(0)})
    with pytest.raises(TypeError, match=r"is a torchjd Aggregator .* torchjd has no UPGradWeig"):
        get_weighting(upgrad())
    lookalike = type("Aggregator", (), {"__call__": lambda self, gramian: gramian.diagonal()})
    assert isinstance(get_weighting(lookalike()), CallableWeighting)


# -- across ranks ----------------------------------------------------------------------------------


def _overlapped(message: str) -> str:
    """``message`` as the overlap worker hands it to ``backward()``."""
    return (
        "RuntimeError: Got the following error when running the callback: BucketHookError: "
        rf"bucket_moo_hook failed on bucket 0 of step \d: {message}"
    )


CHECKS = shared_spawn(2).add(id_and_weighting_checks, timeout=90)


@pytest.mark.slow
def test_ranks_agree_on_tensor_ids_and_weighting_configs() -> None:
    mixed = (
        r"ValueError: state\.set_objective was called on ranks \[0\] but not on ranks \[1\] "
        r"before step 0; .* call state\.set_objective\(id\) on every rank before backward\(\), "
        "or on none"
    )
    disagree = r"ValueError: ranks disagree on the BucketMOOState configuration .*scale=[12]\.0\]\)"
    for results in CHECKS.results():
        # A tensor id per rank in objective_of_rank: no false "ranks disagree".
        assert results["tensor_map_outcome"] == "no error"
        assert results["tensor_map_objectives"] == 2
        # set_objective(tensor(0)) on both ranks: one objective, not two.
        assert results["tensor_set_outcome"] == "no error"
        assert results["tensor_set_objectives"] == 1
        assert re.match(mixed, results["mixed_set_overlap_False"])
        assert re.match(_overlapped(mixed), results["mixed_set_overlap_True"])
        assert re.match(mixed, results["mixed_set_fsdp2"])
        assert results["partial"] == "no error"
        assert re.match(_overlapped(disagree), results["closures"])
