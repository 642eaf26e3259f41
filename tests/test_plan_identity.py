"""Plans record the model they were made for, are checked against it, and are type-checked on load."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from helpers import token_batches
from moe_compress import LayerPlan, MoECompressError, Plan, compress
from tiny_models import tiny_model


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A REAP plan and a MoNE plan (with novice vectors) of the tiny Mixtral, saved to disk."""
    root = tmp_path_factory.mktemp("plans")
    reap = compress(tiny_model("mixtral"), method="reap", ratio=0.25, calib=token_batches(), cache_dir=False).plan
    reap.save(root / "reap.json")
    mone = compress(tiny_model("mixtral"), method="mone", ratio=0.5, calib=token_batches(), cache_dir=False).plan
    mone.save(root / "mone.json")
    return root


def _edited(made, tmp_path, name="reap.json", **changes):
    data = json.loads((made / name).read_text())
    for key, value in changes.items():
        if key.startswith("layer0_"):
            data["layers"][0][key.removeprefix("layer0_")] = value
        else:
            data[key] = value
    (tmp_path / name).write_text(json.dumps(data))
    vectors = made / name.replace(".json", ".novices.safetensors")
    if vectors.is_file():
        (tmp_path / vectors.name).write_bytes(vectors.read_bytes())
    return tmp_path / name


def test_a_plan_records_its_model(made):
    identity = json.loads((made / "reap.json").read_text())["identity"]
    model = tiny_model("mixtral")
    assert identity["model_type"] == "mixtral" and identity["num_layers"] == 3 and identity["top_k"] == 2
    assert identity["experts_per_layer"] == {"0": 8, "1": 8, "2": 8} and identity["hidden_size"] == 32
    from moe_compress.observe.cache import content_fingerprint

    assert identity["fingerprint"] == content_fingerprint(model) and identity["fingerprint_kind"] == "content"


def test_the_same_plan_applies_to_the_same_model(made):
    result = compress(tiny_model("mixtral"), plan=made / "reap.json")
    assert result.plan.kept_counts() == {0: 6, 1: 6, 2: 6}


def test_an_edited_top_k_is_refused_by_the_models_own_top_k(made, tmp_path):
    """top_k edited to 1 and a layer cut to one expert: valid for the plan's claim, not for the model."""
    plan = _edited(made, tmp_path, top_k=1, layer0_keep=[3])
    with pytest.raises(MoECompressError, match="plan says top_k=1, but the model routes every token to 2"):
        compress(tiny_model("mixtral"), plan=plan)
    stripped = _edited(made, tmp_path, top_k=1, layer0_keep=[3], identity=None)  # also without an identity
    with pytest.raises(MoECompressError, match="routes every token to 2"):
        compress(tiny_model("mixtral"), plan=stripped)


def test_a_plan_for_three_layers_does_not_touch_six(made):
    with pytest.raises(MoECompressError, match="num_layers 3; this model has 6"):
        compress(tiny_model("mixtral", num_layers=6), plan=made / "reap.json")


def test_a_plan_for_other_weights_is_refused(made):
    with pytest.raises(MoECompressError, match="other weights of this architecture"):
        compress(tiny_model("mixtral", seed=1), plan=made / "reap.json")
    with pytest.raises(MoECompressError, match="made on float32 weights, these are bfloat16"):
        compress(tiny_model("mixtral").to(torch.bfloat16), plan=made / "reap.json")


def test_an_old_plan_without_identity_loads_with_a_warning(made, tmp_path, capsys):
    data = json.loads((made / "reap.json").read_text())
    del data["identity"]
    (tmp_path / "old.json").write_text(json.dumps(data))
    result = compress(tiny_model("mixtral"), plan=tmp_path / "old.json")
    assert result.plan.kept_counts() == {0: 6, 1: 6, 2: 6}
    assert "records no model identity" in capsys.readouterr().err


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"layer0_keep": 1.5}, "plan layer entry 0: field 'keep' must be a list of expert indices"),
        ({"layer0_keep": [0, 1.5, 2]}, "field 'keep' must be a list of expert indices"),
        ({"layer0_keep": [0, True]}, "field 'keep'"),
        ({"top_k": "2"}, "field 'top_k' must be a positive integer"),
        ({"top_k": 2.0}, "field 'top_k' must be a positive integer"),
        ({"layer0_novices": "yes"}, "field 'novices' must be true or false"),
        ({"layer0_scores": [float("nan")] * 8}, "field 'scores' must be null or a list of finite numbers"),
        ({"ratio": float("inf")}, "field 'ratio' must be null or a finite number"),
        ({"layers": {"0": []}}, "field 'layers' must be a list"),
        ({"dropped_blocks": [-1]}, "field 'dropped_blocks'"),
        ({"layer0_colour": "blue"}, "unknown field"),
        ({"identity": {"model_type": "mixtral"}}, "plan field 'identity' lacks the required field 'num_layers'"),
    ],
)
def test_every_field_is_type_checked_by_name(changes, message, made, tmp_path):
    with pytest.raises(MoECompressError, match=message):
        Plan.load(_edited(made, tmp_path, **changes))


def test_out_of_range_dropped_blocks_are_refused(made, tmp_path):
    with pytest.raises(MoECompressError, match=r"plan drops blocks \[7\]; the model's blocks are 0..2"):
        compress(tiny_model("mixtral"), plan=_edited(made, tmp_path, dropped_blocks=[7]))


def test_novice_vectors_must_fit(made, tmp_path):
    path = _edited(made, tmp_path, name="mone.json")
    vectors = tmp_path / "mone.novices.safetensors"
    save_file({"0": torch.zeros(3, 32), "1": torch.zeros(4, 32), "2": torch.zeros(4, 32)}, str(vectors))
    with pytest.raises(MoECompressError, match=r"novice vectors of layer 0 have shape \[3, 32\]; expected \[4 removed experts"):
        Plan.load(path)
    save_file({"0": torch.zeros(4, 16), "1": torch.zeros(4, 16), "2": torch.zeros(4, 16)}, str(vectors))
    with pytest.raises(MoECompressError, match="width 16; the model's hidden size is 32"):
        compress(tiny_model("mixtral"), plan=path)
    save_file({"0": torch.full((4, 32), float("nan")), "1": torch.zeros(4, 32), "2": torch.zeros(4, 32)}, str(vectors))
    with pytest.raises(MoECompressError, match="novice vectors of layer 0 contains 128 NaN/Inf"):
        Plan.load(path)


def test_nan_condensed_weights_are_refused():
    plan = Plan("mixtral", 2, [LayerPlan(0, 8, [0, 1], condensed_weights=[0.5, float("nan")])])
    with pytest.raises(MoECompressError, match="condensed_weights contain NaN"):
        plan.validate()
