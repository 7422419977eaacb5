"""The diagnostics recorder on its own (the multi-process checks are in ddp/test_ddp_hook.py)."""

import json
import math
import pickle
from pathlib import Path

import pytest
import torch

from bucketmoo_hooks import Diagnostics, objective_key


def record_two_objectives(diagnostics: Diagnostics, step: int) -> None:
    # ḡ_en = (1, 0), ḡ_de = (1, 1): cosine 1/√2, norms 1 and √2.
    gramian = torch.tensor([[[1.0, 1.0], [1.0, 2.0]]])
    weights = torch.tensor([[1.0, 0.0]])
    keys = (objective_key("en"), objective_key("de"))
    diagnostics.record(
        step, bucket=3, objectives=keys, gramians=gramian, weights=weights, segmented=False
    )


def test_records_are_pulled_every_log_every_steps_and_written_as_json_lines(
    tmp_path: Path,
) -> None:
    path = tmp_path / "diagnostics.jsonl"
    diagnostics = Diagnostics(log_every=2, path=path, objectives=["en", "de"])
    record_two_objectives(diagnostics, step=0)
    diagnostics.end_step(0)
    assert diagnostics.records == [] and not path.exists()  # nothing left the device yet
    record_two_objectives(diagnostics, step=1)
    diagnostics.end_step(1)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == diagnostics.records
    bucket = lines[0]
    assert bucket["objectives"] == ["en", "de"]
    assert bucket["cosine"][0][1] == pytest.approx(1 / math.sqrt(2))
    assert bucket["norms"] == pytest.approx([1.0, math.sqrt(2)])
    assert bucket["weights"] == [1.0, 0.0]
    assert bucket["update_norm"] == pytest.approx(1.0)
    # min over the simplex of ‖w_en (1,0) + w_de (1,1)‖ is at w = (1, 0): norm 1.
    assert lines[1] == {"step": 0, "global_min_norm": pytest.approx(1.0)}
    assert [line["step"] for line in lines] == [0, 0, 1, 1]


def test_unknown_objectives_show_their_key_and_keep_false_bounds_memory() -> None:
    diagnostics = Diagnostics(log_every=1, keep=False)
    record_two_objectives(diagnostics, step=0)
    [bucket] = diagnostics.pull()  # no end_step yet: no global record
    assert bucket["objectives"] == [str(objective_key("en")), str(objective_key("de"))]
    assert diagnostics.records == []


def test_pickling_keeps_records_and_drops_device_state() -> None:
    diagnostics = Diagnostics(log_every=10, objectives=["en"])
    record_two_objectives(diagnostics, step=0)
    restored = pickle.loads(pickle.dumps(diagnostics))
    assert restored.pull() == []
    assert restored.labels == {objective_key("en"): "en"}


@pytest.mark.parametrize("bad", [0, -3, 1.5, True])
def test_log_every_is_validated(bad: object) -> None:
    with pytest.raises(ValueError, match="log_every must be a positive int"):
        Diagnostics(log_every=bad)  # type: ignore[arg-type]


class FakeWriter:
    def __init__(self) -> None:
        self.scalars: list[tuple[str, float, int]] = []

    def add_scalar(self, tag: str, scalar_value: float, global_step: int) -> None:
        self.scalars.append((tag, scalar_value, global_step))


def test_pulled_records_become_tensorboard_scalars() -> None:
    writer = FakeWriter()
    diagnostics = Diagnostics(log_every=1, objectives=["en", "de"], tensorboard=writer)
    record_two_objectives(diagnostics, step=4)
    diagnostics.end_step(4)
    tags = {tag: (value, step) for tag, value, step in writer.scalars}
    assert tags["cosine/b3/en~de"] == (pytest.approx(1 / math.sqrt(2)), 4)
    assert tags["weight/b3/en"] == (1.0, 4)
    assert tags["weight/b3/de"] == (0.0, 4)
    assert tags["update_norm/b3"] == (pytest.approx(1.0), 4)
    assert tags["global_min_norm"] == (pytest.approx(1.0), 4)
    assert len(writer.scalars) == 5
    assert pickle.loads(pickle.dumps(diagnostics)).tensorboard is None


def test_real_summary_writer(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tmp_path))
    diagnostics = Diagnostics(log_every=1, tensorboard=writer)
    record_two_objectives(diagnostics, step=0)
    diagnostics.end_step(0)
    writer.close()
    assert list(tmp_path.glob("events.out.tfevents.*"))


def test_a_writer_without_add_scalar_is_refused() -> None:
    with pytest.raises(TypeError, match="tensorboard must have add_scalar"):
        Diagnostics(tensorboard=object())  # type: ignore[arg-type]
