"""BucketMOOState construction, validation and pickling (no process group needed)."""

import io
import pickle

import pytest
import torch
import torch.distributed as dist

from bucketmoo_hooks import BucketMOOState, objective_key
from bucketmoo_hooks.weightings import MGDA, Mean


@pytest.fixture(autouse=True)
def no_process_group() -> None:
    assert not dist.is_initialized()


def test_defaults() -> None:
    state = BucketMOOState()
    assert state.objective_of_rank is None
    assert isinstance(state.weighting, MGDA)
    assert state.iter == 0
    assert state.objective_map is None


def test_objective_of_rank_is_kept_as_given() -> None:
    ids = ["en", "de", "en"]
    state = BucketMOOState(objective_of_rank=ids, weighting="mean")
    assert state.objective_of_rank == ("en", "de", "en")
    assert ids == ["en", "de", "en"]
    assert isinstance(state.weighting, Mean)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"objective_of_rank": "en"}, TypeError, "objective_of_rank must be a sequence"),
        ({"objective_of_rank": 4}, TypeError, "objective_of_rank must be a sequence"),
        ({"objective_of_rank": []}, ValueError, "must name the objective of every rank"),
        ({"objective_of_rank": [["en"], "de"]}, TypeError, "objective id must be hashable"),
        ({"weighting": "pcgrad-typo"}, ValueError, "is not a known weighting"),
        ({"weighting": 0.5}, TypeError, "weighting must be a name"),
        ({"process_group": "world"}, TypeError, "process_group must be a"),
        ({"granularity": "layer"}, ValueError, "granularity must be one of"),
        ({"overlap": "yes"}, TypeError, "overlap must be a bool"),
    ],
)
def test_bad_construction_arguments(kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        BucketMOOState(**kwargs)


def test_group_needs_an_initialised_process_group() -> None:
    with pytest.raises(RuntimeError, match=r"torch\.distributed is not initialised"):
        BucketMOOState().group  # noqa: B018


def test_set_objective_checks_the_id_at_once() -> None:
    state = BucketMOOState()
    state.set_objective("ja")
    assert state._steps.own_key(state, rank=5) == objective_key("ja")
    with pytest.raises(TypeError, match="must be hashable"):
        state.set_objective({"ja"})


def test_own_objective_defaults() -> None:
    fresh = BucketMOOState()
    assert fresh._steps.own_key(fresh, rank=2) == objective_key(2)
    state = BucketMOOState(objective_of_rank=["en", "de"])
    assert state._steps.own_key(state, rank=1) == objective_key("de")


def test_pickling_keeps_configuration_and_progress_but_not_the_group() -> None:
    state = BucketMOOState(objective_of_rank=["en", "de"], weighting=MGDA(iterations=9))
    state.set_objective("ja")
    state.iter = 12
    state.ledger.record_overhead("objective_exchange", 24)
    state.ledger.close_step()
    restored = pickle.loads(pickle.dumps(state))
    assert restored.process_group is None
    assert restored.objective_of_rank == ("en", "de")
    assert repr(restored.weighting) == "MGDA(iterations=9)"
    assert restored.iter == 12
    assert restored._steps.own_key(restored, rank=0) == objective_key("ja")
    assert restored.ledger.totals == {"objective_exchange": 24}
    assert restored.objective_map is None
    assert "iter=12" in repr(restored)


def test_config_digest_covers_weighting_world_size_and_map() -> None:
    base = BucketMOOState(objective_of_rank=[0, 1])._config_digest(2)
    assert BucketMOOState(objective_of_rank=[0, 1])._config_digest(2) == base
    assert BucketMOOState(objective_of_rank=[1, 0])._config_digest(2) != base
    assert BucketMOOState(objective_of_rank=[0, 1], weighting="mean")._config_digest(2) != base
    assert BucketMOOState(objective_of_rank=[0, 1])._config_digest(3) != base
    assert BucketMOOState(objective_of_rank=[0, 1], granularity="global")._config_digest(2) != base
    weighted = BucketMOOState(objective_of_rank=[0, 1], weighting=lambda g: torch.ones(2))
    assert weighted._config_digest(2) != base
    sketched = BucketMOOState(objective_of_rank=[0, 1], protocol="sketch")._config_digest(2)
    assert sketched != base
    smaller = BucketMOOState(objective_of_rank=[0, 1], protocol="sketch", sketch_size=1024)
    assert smaller._config_digest(2) not in (base, sketched)


def saved_and_loaded(state_dict: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)  # no unsafe pickle


def test_state_dict_round_trip_through_a_safe_checkpoint() -> None:
    state = BucketMOOState(objective_of_rank=["en", ("de", 1)], granularity="parameter")
    state.iter = 7
    state.ledger.record_overhead("objective_exchange", 24)
    state.ledger.close_step()
    restored = BucketMOOState(objective_of_rank=["en", ("de", 1)], granularity="parameter")
    restored.load_state_dict(saved_and_loaded(state.state_dict()))
    assert restored.iter == 7
    assert restored.ledger.totals == {"objective_exchange": 24}
    assert restored.ledger.steps == 1
    assert restored.state_dict() == state.state_dict()


@pytest.mark.parametrize(
    ("other", "field"),
    [
        ({"weighting": "mean"}, "weighting"),
        ({"granularity": "global"}, "granularity"),
        ({"objective_of_rank": ["de", "en"]}, "objective_keys"),
        ({"objective_of_rank": None}, "objective_keys"),
    ],
)
def test_loading_a_checkpoint_of_another_configuration_is_refused(other: dict, field: str) -> None:
    saved = BucketMOOState(objective_of_rank=["en", "de"]).state_dict()
    state = BucketMOOState(**{"objective_of_rank": ["en", "de"], **other})
    with pytest.raises(ValueError, match=f"the checkpoint was saved with {field}="):
        state.load_state_dict(saved)
    assert state.iter == 0  # nothing was loaded


def test_sketch_configuration_is_saved_and_pickled_and_may_change_on_resume() -> None:
    state = BucketMOOState(["en", "de"], protocol="sketch", sketch_size=1024)
    assert state.sketch_size == 1024
    assert BucketMOOState(protocol="sketch").sketch_size == 4096
    assert BucketMOOState().sketch_size is None
    assert "protocol='sketch', sketch_size=1024" in repr(state)
    restored = pickle.loads(pickle.dumps(state))
    assert (restored.protocol, restored.sketch_size) == ("sketch", 1024)
    saved = saved_and_loaded(state.state_dict())
    assert (saved["protocol"], saved["sketch_size"]) == ("sketch", 1024)
    BucketMOOState(["en", "de"], protocol="sketch", sketch_size=1024).load_state_dict(saved)
    # A run may resume under another protocol or sketch size: the step carries over.
    state.iter = 9
    saved = saved_and_loaded(state.state_dict())
    for other in (
        BucketMOOState(["en", "de"], protocol="sketch", sketch_size=4096),
        BucketMOOState(["en", "de"]),
    ):
        other.load_state_dict(saved)
        assert other.iter == 9
    # A checkpoint from before the sketch protocol existed (the shard protocol's) loads too.
    earlier = dict(BucketMOOState(["en", "de"]).state_dict())
    del earlier["protocol"], earlier["sketch_size"]
    BucketMOOState(["en", "de"], protocol="sketch").load_state_dict(earlier)
    with pytest.raises(ValueError, match=r"state_dict\['protocol'\] must be one of"):
        BucketMOOState(["en", "de"]).load_state_dict({**earlier, "protocol": "ring"})
    with pytest.raises(ValueError, match="sketch_size must be in"):
        BucketMOOState(["en", "de"]).load_state_dict({**saved, "sketch_size": 3})


def test_ranks_per_node_is_saved_pickled_digested_and_may_change_on_resume(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_SIZE", raising=False)
    assert BucketMOOState().ranks_per_node is None  # unknown: the ledger counts one node
    monkeypatch.setenv("LOCAL_SIZE", "8")
    assert BucketMOOState().ranks_per_node == 8  # the DeepSpeed launcher's
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert BucketMOOState().ranks_per_node == 4  # torchrun's, first
    assert BucketMOOState(ranks_per_node=2).ranks_per_node == 2  # given wins
    state = BucketMOOState(["en", "de"], protocol="hierarchical", ranks_per_node=2)
    assert "protocol='hierarchical', ranks_per_node=2, iter=0" in repr(state)
    assert pickle.loads(pickle.dumps(state)).ranks_per_node == 2
    # The hierarchical protocol's exchange depends on it: ranks must agree. Elsewhere it only
    # labels the ledger's bytes, and nodes of different sizes may train together.
    digest = state._config_digest(2)
    other = BucketMOOState(["en", "de"], protocol="hierarchical", ranks_per_node=1)
    assert other._config_digest(2) != digest
    shard = BucketMOOState(["en", "de"], ranks_per_node=2)._config_digest(2)
    assert BucketMOOState(["en", "de"], ranks_per_node=1)._config_digest(2) == shard
    state.iter = 5
    state.ledger.link_totals["cross_node"] = 96
    saved = saved_and_loaded(state.state_dict())
    assert saved["ranks_per_node"] == 2
    # A run may resume on other nodes or under another protocol: the step and ledger carry over.
    for resumed in (
        BucketMOOState(["en", "de"], protocol="hierarchical", ranks_per_node=4),
        BucketMOOState(["en", "de"]),
    ):
        resumed.load_state_dict(saved)
        assert resumed.iter == 5 and resumed.ledger.link_totals["cross_node"] == 96
    # Checkpoints from before ranks_per_node and the link classes load too.
    earlier = dict(saved)
    del earlier["ranks_per_node"], earlier["ledger_link_totals"]
    BucketMOOState(["en", "de"], protocol="hierarchical", ranks_per_node=2).load_state_dict(earlier)
    with pytest.raises(ValueError, match="ranks_per_node must be at least 1, got 0"):
        BucketMOOState(["en", "de"]).load_state_dict({**saved, "ranks_per_node": 0})
    with pytest.raises(ValueError, match=r"state_dict\['ledger_link_totals'\] must have the keys"):
        BucketMOOState(["en", "de"]).load_state_dict({**saved, "ledger_link_totals": {"x": 1}})


def test_malformed_state_dicts_are_refused() -> None:
    state = BucketMOOState()
    good = state.state_dict()
    with pytest.raises(TypeError, match="state_dict must be a dict"):
        state.load_state_dict([("iter", 3)])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"missing keys \['iter'\], unknown keys \['step'\]"):
        state.load_state_dict({**{k: v for k, v in good.items() if k != "iter"}, "step": 3})
    with pytest.raises(ValueError, match="version 99 is not 1"):
        state.load_state_dict({**good, "version": 99})
    for bad in (-1, 2.0, "3", True):
        with pytest.raises(TypeError, match=r"state_dict\['iter'\] must be a non-negative int"):
            state.load_state_dict({**good, "iter": bad})
    with pytest.raises(ValueError, match="MGDA is stateless but the checkpoint holds"):
        state.load_state_dict({**good, "weighting_state": {"ema": torch.zeros(2)}})


def test_pickling_keeps_the_overlap_choice_but_not_the_worker() -> None:
    state = BucketMOOState(overlap=False)
    assert BucketMOOState().overlap
    restored = pickle.loads(pickle.dumps(state))
    assert restored.overlap is False
    assert restored._runtime._worker is None
    assert restored._runtime._side_streams == {}
    assert "overlap" not in state.state_dict()  # a runtime choice, like kernels


def test_a_state_pickled_by_an_earlier_version_unpickles() -> None:
    """Before the per-step agreement and the runtime had objects of their own, set_objective's
    value was the ``_objective`` slot, and ``absent``/``protocol`` did not exist."""
    fresh = BucketMOOState(["en", "de"], "mean")
    earlier = {
        "objective_of_rank": ("en", "de"),
        "weighting": fresh.weighting,
        "granularity": "bucket",
        "diagnostics": None,
        "kernels": "auto",
        "overlap": True,
        "nonfinite": "propagate",
        "iter": 3,
        "held_bytes": 0,
        "ledger": fresh.ledger,
        "_objective": ("ja", objective_key("ja")),
    }
    restored = BucketMOOState.__new__(BucketMOOState)
    restored.__setstate__(earlier)
    assert (restored.iter, restored.absent, restored.protocol) == (3, "exclude", "shard")
    assert restored.ranks_per_node is None
    assert restored._steps.own_key(restored, rank=0) == objective_key("ja")
    assert restored.process_group is None and restored.objective_map is None
