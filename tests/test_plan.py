"""Plans: JSON round trip, validation, and a readable table."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from moe_compress import KeepLayer, MoECompressError, Plan


def _plan(**changes) -> Plan:
    fields = dict(model_type="mixtral", top_k=2, layers=[KeepLayer(layer=0, num_experts=8, keep=[0, 2, 3, 5]), KeepLayer(layer=1, num_experts=8, keep=list(range(6)))], method="reap", ratio=0.4, budget="global")
    fields.update(changes)
    return Plan(**fields)


def test_round_trip(tmp_path):
    plan = _plan()
    plan.save(tmp_path / "plan.json")
    assert json.loads((tmp_path / "plan.json").read_text())["format"] == "moe-compress/plan@2"
    assert Plan.load(tmp_path / "plan.json") == plan
    assert not plan.is_uniform() and plan.kept_counts() == {0: 4, 1: 6}
    assert plan.layers[0].removed == [1, 4, 6, 7]


@pytest.mark.parametrize(
    "layers, message",
    [
        ([{"keep": [0]}], "fewer than top_k=2"),
        ([{"keep": [0, 9]}], "out of range"),
        ([{"keep": [1, 1, 2]}], "duplicates"),
        ([{"keep": [1, 2]}, {"keep": [1, 2]}], "appears twice"),
    ],
)
def test_invalid_plans_are_refused(layers, message):
    """Built in code (an entry refuses what it can tell alone when built, the plan the rest) and read from a file alike."""
    with pytest.raises(MoECompressError, match=message):
        _plan(layers=[KeepLayer(layer=0, num_experts=8, **fields) for fields in layers]).validate()
    body = {**_plan().to_dict(), "layers": [{"action": "keep", "layer": 0, "num_experts": 8, **fields} for fields in layers]}
    with pytest.raises(MoECompressError, match=message):
        Plan.from_dict(body).validate()


def test_group_constraints():
    grouped = dict(model_type="deepseek_v3", routing_groups=2, groups_per_token=1, min_per_group=2)
    _plan(layers=[KeepLayer(layer=1, num_experts=8, keep=[0, 1, 4, 5])], **grouped).validate()
    with pytest.raises(MoECompressError, match="same number of kept experts in each"):
        _plan(layers=[KeepLayer(layer=1, num_experts=8, keep=[0, 1, 2, 4])], **grouped).validate()


def test_plan_must_match_the_model():
    with pytest.raises(MoECompressError, match="not an MoE layer"):
        _plan().check_model("mixtral", {1: 8, 2: 8})
    with pytest.raises(MoECompressError, match="made for a 'mixtral' model"):
        _plan().check_model("olmoe", {0: 8, 1: 8})


def test_load_errors(tmp_path):
    with pytest.raises(MoECompressError, match="does not exist"):
        Plan.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(MoECompressError, match="not valid JSON"):
        Plan.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"format": "something-else"}')
    with pytest.raises(MoECompressError, match="not a moe-compress plan"):
        Plan.load(tmp_path / "other.json")


def test_table_lists_removed_experts():
    console = Console(record=True, width=120)
    console.print(_plan().table())
    text = console.export_text()
    assert "1, 4, 6, 7" in text and "6, 7" in text
