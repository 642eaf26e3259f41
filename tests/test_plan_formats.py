"""Every plan format moe-compress ever wrote still reads, as the plan it meant; the writer is deterministic.

The format-1 fixtures under tests/data/plans/ were saved by the writers of the commits they
name (`make_format1.py`); `format2-all-actions` is the current writer's, one entry per action.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moe_compress import CondenseLayer, DropMoeLayer, KeepLayer, MergeLayer, MoECompressError, NoviceLayer, Plan
from moe_compress.plan import ACTIONS, PLAN_FORMAT, ModelIdentity
from moe_compress.surgery.experts import SURGERY

ROOT = Path(__file__).parent.parent
FIXTURES = Path(__file__).parent / "data" / "plans"


def _format2() -> Plan:
    plan = Plan(
        model_type="deepseek_v3", top_k=2, method="manual", num_layers=6, dropped_blocks=[0],
        layers=[
            KeepLayer(layer=1, num_experts=4, keep=[0, 2, 3], scores=[0.5, 0.25, 1.0, 2.0], clusters=[0, 1, 1, 2]),
            NoviceLayer(layer=2, num_experts=4, keep=[1], scores=[0.125, 4.0, 0.25, 0.5]),
            MergeLayer(layer=3, num_experts=4, keep=[0, 1], merges=[[0, 2], [1, 3]], merge_weights=[[0.5, 0.5], [0.25, 0.75]]),
            CondenseLayer(layer=4, num_experts=4, keep=[2], scores=[0.03, 0.02, 0.01, 0.04], condensed_weights=[0.5]),
            DropMoeLayer(layer=5, num_experts=4),
        ],
        identity=ModelIdentity(model_type="deepseek_v3", num_layers=6, experts_per_layer={i: 4 for i in range(1, 6)}, top_k=2,
                               hidden_size=8, fingerprints={"content": "c0" * 8}, dtype="float32"),
    )
    plan.novice_vectors = {2: torch.linspace(-1, 1, 24).reshape(3, 8)}
    plan.merge_permutations = {3: torch.tensor([[2, 0, 1], [0, 2, 1]])}
    return plan


def _format1_ab3a65c() -> Plan:
    plan = Plan(model_type="mixtral", top_k=2, method="mone", ratio=0.5, budget="layer", layers=[
        KeepLayer(layer=0, num_experts=4, keep=[0, 1], scores=[4.0, 3.0, 2.0, 1.0], clusters=[0, 1, 0, 1]),
        NoviceLayer(layer=1, num_experts=4, keep=[3], scores=[0.25, 0.5, 0.75, 1.0]),
    ])
    plan.novice_vectors = {1: torch.arange(12, dtype=torch.float32).reshape(3, 4) / 8}
    return plan


def _format1_e0f0d6c() -> Plan:
    plan = Plan(model_type="mixtral", top_k=2, method="ream", ratio=0.5, budget="layer", meta={"align": "weights"}, layers=[
        MergeLayer(layer=0, num_experts=4, keep=[0, 2], scores=[0.4, 0.1, 0.3, 0.2], merges=[[0, 1], [2, 3]],
                   merge_weights=[[0.75, 0.25], [0.5, 0.5]], merge_router="centroid"),
    ])
    plan.merge_permutations = {0: torch.tensor([[1, 0, 2], [2, 0, 1]])}
    return plan


#: fixture stem -> the current plan it must read as
EXPECTED = {
    "format1-44ad5a9-pruning": lambda: Plan(
        model_type="mixtral", top_k=2, method="reap", ratio=0.375, budget="global", meta={"renormalised": True}, layers=[
            KeepLayer(layer=0, num_experts=4, keep=[0, 2], scores=[0.5, 0.125, 0.25, 0.0625]),
            KeepLayer(layer=1, num_experts=4, keep=[1, 2, 3], scores=[0.1, 0.4, 0.3, 0.2]),
        ]),
    "format1-ab3a65c-novices-clusters": _format1_ab3a65c,
    "format1-cdeeace-condense-drop": lambda: Plan(
        model_type="deepseek_v3", top_k=2, method="cd-moe", num_layers=5, dropped_blocks=[4], layers=[
            CondenseLayer(layer=1, num_experts=4, keep=[0, 3], scores=[0.01, 0.03, 0.02, 0.04], condensed_weights=[0.75, 0.25]),
            DropMoeLayer(layer=2, num_experts=4),
        ]),
    "format1-e0f0d6c-merges": _format1_e0f0d6c,
    "format1-f3986c4-identity-fingerprint": lambda: Plan(
        model_type="qwen2_moe", top_k=2, method="reap", ratio=0.25, budget="layer", layers=[
            KeepLayer(layer=0, num_experts=4, keep=[1, 2, 3], scores=[0.1, 0.2, 0.3, 0.4]),
            KeepLayer(layer=1, num_experts=4, keep=[0, 1, 3], scores=[0.4, 0.3, 0.1, 0.2]),
        ], identity=ModelIdentity(model_type="qwen2_moe", num_layers=2, experts_per_layer={0: 4, 1: 4}, top_k=2, hidden_size=8,
                                  fingerprints={"checkpoint": "0123456789abcdef0123456789abcdef"}, dtype="bfloat16")),
    "format1-145004d-merges-identity-fingerprint": lambda: Plan(
        model_type="mixtral", top_k=2, method="hc-smoe", ratio=0.5, budget="layer", layers=[
            MergeLayer(layer=0, num_experts=4, keep=[0, 1], scores=[0.4, 0.3, 0.2, 0.1], merges=[[0, 3], [1, 2]],
                       merge_weights=[[2.0, 1.0], [1.0, 1.0]]),
        ], identity=ModelIdentity(model_type="mixtral", num_layers=1, experts_per_layer={0: 4}, top_k=2, hidden_size=8,
                                  fingerprints={"content": "fedcba9876543210fedcba9876543210"}, dtype="float32")),
    "format1-6f739ba-identity-fingerprints": lambda: Plan(
        model_type="deepseek_v3", top_k=2, method="reap", ratio=0.25, budget="global", routing_groups=2, groups_per_token=1,
        min_per_group=2, layers=[
            KeepLayer(layer=1, num_experts=8, keep=[0, 1, 4, 5], scores=[8.0, 7.0, 1.0, 2.0, 6.0, 5.0, 3.0, 4.0]),
            KeepLayer(layer=2, num_experts=8, keep=list(range(8))),
        ], identity=ModelIdentity(model_type="deepseek_v3", num_layers=3, experts_per_layer={1: 8, 2: 8}, top_k=2, hidden_size=16,
                                  routing_groups=2, groups_per_token=1, fingerprints={"content": "aa" * 8, "checkpoint": "bb" * 16},
                                  dtype="float32")),
    "format2-all-actions": _format2,
}


def test_there_is_one_fixture_per_format_and_each_is_what_its_writer_wrote():
    assert sorted(p.stem for p in FIXTURES.glob("*.json")) == sorted(EXPECTED)
    formats = {stem: json.loads((FIXTURES / f"{stem}.json").read_text())["format"] for stem in EXPECTED}
    assert formats == {stem: "moe-compress/plan@2" if stem.startswith("format2") else "moe-compress/plan@1" for stem in EXPECTED}
    assert PLAN_FORMAT == "moe-compress/plan@2"


@pytest.mark.parametrize("stem", sorted(EXPECTED))
def test_every_format_reads_as_the_plan_it_meant(stem):
    assert Plan.load(FIXTURES / f"{stem}.json") == EXPECTED[stem]()


@pytest.mark.parametrize("stem", sorted(EXPECTED))
def test_a_saved_plan_reloads_equal_and_saves_the_same_bytes(stem, tmp_path):
    loaded = Plan.load(FIXTURES / f"{stem}.json")
    loaded.save(tmp_path / "a.json")
    again = Plan.load(tmp_path / "a.json")
    assert again == loaded
    again.save(tmp_path / "b.json")
    for suffix in (".json", ".novices.safetensors", ".permutations.safetensors"):
        first, second = tmp_path / f"a{suffix}", tmp_path / f"b{suffix}"
        assert first.is_file() == second.is_file()
        assert not first.is_file() or first.read_bytes() == second.read_bytes(), suffix


def test_the_current_writer_writes_the_current_fixture_byte_for_byte(tmp_path):
    _format2().save(tmp_path / "plan.json")
    for suffix in (".json", ".novices.safetensors", ".permutations.safetensors"):
        assert (tmp_path / f"plan{suffix}").read_bytes() == (FIXTURES / f"format2-all-actions{suffix}").read_bytes(), suffix
    layers = json.loads((tmp_path / "plan.json").read_text())["layers"]
    assert [sorted(lp) for lp in layers] == [
        ["action", "clusters", "keep", "layer", "num_experts", "scores"],
        ["action", "clusters", "keep", "layer", "num_experts", "scores"],
        ["action", "clusters", "keep", "layer", "merge_router", "merge_weights", "merges", "num_experts", "scores"],
        ["action", "clusters", "condensed_weights", "keep", "layer", "num_experts", "scores"],
        ["action", "layer", "num_experts"],
    ]


def _is_plan(path: Path) -> bool:
    data = json.loads(path.read_text())
    return isinstance(data, dict) and str(data.get("format")).startswith("moe-compress/plan@")


def test_every_plan_file_in_the_repository_loads():
    found = [path for folder in (ROOT / "tests", ROOT / "bench" / "results") for path in sorted(folder.rglob("*.json")) if _is_plan(path)]
    assert len(found) >= len(EXPECTED) + 5  # the fixtures and bench/results' five CD-MoE searches
    for path in found:
        assert Plan.load(path).layers, path


def _format1(**layer) -> dict:
    return {"format": "moe-compress/plan@1", "model_type": "mixtral", "top_k": 2, "layers": [{"layer": 0, "num_experts": 4, **layer}]}


@pytest.mark.parametrize(
    "data, message",
    [
        (_format1(keep=[0, 1], novices="yes"), r"plan layer entry 0: field 'novices' must be true or false; got \"yes\""),
        (_format1(keep=[0, 1], novices=True, condensed_weights=[1.0, 1.0]), "combines condensed_weights and novices; a layer takes one action"),
        (_format1(keep=[], drop=True, merges=[[0]], merge_weights=[[1.0]]), "combines drop and merges"),
        (_format1(keep=[0, 1], merge_weights=[[1.0], [1.0]]), r"unknown field\(s\) \['merge_weights'\]"),
        (_format1(keep=[0, 1], action="keep"), "names an action, which format 'moe-compress/plan@1' has not"),
        ({**_format1(keep=[0, 1]), "identity": {"fingerprint": "ab", "fingerprints": {}}}, "both 'fingerprints' and the older"),
        ({**_format1(keep=[0, 1]), "identity": {"fingerprint": "ab", "fingerprint_kind": "disk"}}, "'fingerprint_kind' must be 'content' or 'checkpoint'"),
        ({**_format1(keep=[0, 1]), "format": "moe-compress/plan@3"}, r"plan format 'moe-compress/plan@3' is newer than this moe-compress reads"),
        ({**_format1(keep=[0, 1]), "format": "something"}, "not a moe-compress plan"),
    ],
)
def test_format1_records_no_writer_wrote_are_refused_by_name(data, message):
    with pytest.raises(MoECompressError, match=message):
        Plan.from_dict(data)


def test_a_format1_record_reads_as_the_action_its_surgery_took():
    """Format 1's unused fields (false, null, the default merge router) go; a dropped layer's empty keep too."""
    read = Plan.from_dict({**_format1(keep=[], scores=None, novices=False, clusters=None, condensed_weights=None, drop=True,
                                      merges=None, merge_weights=None, merge_router="weighted")})
    assert read.layers == [DropMoeLayer(layer=0, num_experts=4)] and read.layers[0].removed == [0, 1, 2, 3]


def test_every_action_has_its_surgery_and_only_its_own_fields():
    assert set(SURGERY) == set(ACTIONS) == {"keep", "novices", "merge", "condense", "drop_moe"}
    with pytest.raises(MoECompressError, match=r"plan layer 3 has unknown field\(s\) \['condensed_weights'\]"):
        NoviceLayer(layer=3, num_experts=4, keep=[1], condensed_weights=[1.0])
    with pytest.raises(MoECompressError, match="plan layer 3: a condensed layer needs one weight per kept expert"):
        CondenseLayer(layer=3, num_experts=4, keep=[2, 1], condensed_weights=[1.0, 1.0])
    with pytest.raises(MoECompressError, match="plan layer 3: merges need one group per kept expert"):
        MergeLayer(layer=3, num_experts=4, keep=[0, 1], merges=[[0, 2]], merge_weights=[[1.0, 1.0]])
