"""Plans record the model they were made for, are checked against it, and are type-checked on load."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from helpers import as_format_1, token_batches
from moe_compress import CondenseLayer, MoECompressError, Plan, compress
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
    from moe_compress.walk.cache import content_fingerprint

    assert identity["fingerprints"] == {"content": content_fingerprint(model)}, "a model handed over in memory has no checkpoint to name"


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


def test_an_old_plan_without_identity_is_refused_unless_told_to_ignore_it(made, tmp_path, capsys):
    """Deleting the identity must not be a way round the weights check."""
    data = json.loads((made / "reap.json").read_text())
    del data["identity"]
    (tmp_path / "old.json").write_text(json.dumps(data))
    with pytest.raises(MoECompressError, match=r"this plan records no model identity .* pass ignore_plan_identity to apply it unchecked\.$"):
        compress(tiny_model("mixtral"), plan=tmp_path / "old.json")
    result = compress(tiny_model("mixtral"), plan=tmp_path / "old.json", ignore_plan_identity=True)
    assert result.plan.kept_counts() == {0: 6, 1: 6, 2: 6}
    warning = capsys.readouterr().err.strip().splitlines()
    assert warning == ["warning: this plan records no model identity (an older moe-compress wrote it, or it was built in code): applied with "
                       "ignore_plan_identity, checked against the model's layers and experts, not its weights."]


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"layer0_keep": 1.5}, "plan layer entry 0: field 'keep' must be a list of expert indices"),
        ({"layer0_keep": [0, 1.5, 2]}, "field 'keep' must be a list of expert indices"),
        ({"layer0_keep": [0, True]}, "field 'keep'"),
        ({"top_k": "2"}, "field 'top_k' must be a positive integer"),
        ({"top_k": 2.0}, "field 'top_k' must be a positive integer"),
        ({"layer0_action": "yes"}, "field 'action' must be one of 'keep', 'novices', 'merge', 'condense', 'drop_moe'; got 'yes'"),
        ({"layer0_novices": True}, r"plan layer entry 0 has unknown field\(s\) \['novices'\]; known: action, layer, num_experts, keep, scores, clusters"),
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
    with pytest.raises(MoECompressError, match="condensed_weights contain NaN"):
        CondenseLayer(layer=0, num_experts=8, keep=[0, 1], condensed_weights=[0.5, float("nan")])


# ---- issue 20 item 3: fingerprints of both kinds, compared in memory and streamed --------------
@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """The tiny Mixtral of `made`, saved as a checkpoint."""
    directory = tmp_path_factory.mktemp("source") / "mixtral"
    tiny_model("mixtral").save_pretrained(directory)
    return directory


def _run(source, tmp_path, streaming, plan=None, **kwargs):
    out = tmp_path / f"out-{streaming}-{len(list(tmp_path.iterdir()))}"
    return compress(source, ratio=0.25, calib=token_batches(), plan=plan, out=out, streaming=streaming, cache_dir=False, **kwargs)


@pytest.fixture(scope="module")
def residency_plans(source, tmp_path_factory):
    """{streamed: the plan a REAP run on `source` saved}, made in memory (False) and streamed (True)."""
    root = tmp_path_factory.mktemp("residency")
    return {streaming: _run(source, root, streaming).output_dir / "moe_compress_plan.json" for streaming in (False, True)}


def _identity(path):
    return json.loads(path.read_text())["identity"]


def test_a_run_records_every_fingerprint_it_can_compute_cheaply(source, residency_plans, made):
    from moe_compress.walk.cache import checkpoint_fingerprint, content_fingerprint

    in_memory, streamed = (_identity(residency_plans[s])["fingerprints"] for s in (False, True))
    assert in_memory == {"content": content_fingerprint(tiny_model("mixtral")), "checkpoint": checkpoint_fingerprint(source)}
    assert streamed == {"checkpoint": checkpoint_fingerprint(source)}, "a streamed run never holds every byte to hash"


@pytest.mark.parametrize("made_streamed", [False, True])
def test_a_plan_replays_in_the_other_residency_when_the_checkpoint_is_unchanged(source, residency_plans, tmp_path, capsys, made_streamed):
    plan = residency_plans[made_streamed]
    made = json.loads(plan.read_text())
    result = _run(source, tmp_path, not made_streamed, plan=plan)
    assert result.summary["streamed"] is (not made_streamed)
    assert [lp.keep for lp in result.plan.layers] == [lp["keep"] for lp in made["layers"]]
    assert "warning" not in capsys.readouterr().err


def _edited_identity(plan, tmp_path, edit) -> object:
    """`plan` with its identity edited; one edited back to the single fingerprint of format 1 is
    written in format 1 (the only format that held it), its REAP layers as format 1 wrote them."""
    data = json.loads(plan.read_text())
    data["identity"] = edit(dict(data["identity"]))
    if "fingerprint" in data["identity"]:
        data = as_format_1(data)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    return path


def _zeroed(identity):
    return {**identity, "fingerprints": {kind: "0" * len(value) for kind, value in identity["fingerprints"].items()}}


def _legacy(fingerprint, kind="content"):
    """The identity as plans wrote it before both kinds were recorded: one fingerprint, one kind."""
    def edit(identity):
        identity.pop("fingerprints", None)
        return {**identity, "fingerprint": fingerprint, "fingerprint_kind": kind}
    return edit


@pytest.mark.parametrize("streaming", [False, True])
def test_a_zeroed_fingerprint_is_refused_in_memory_and_streamed(source, residency_plans, tmp_path, streaming):
    plan = _edited_identity(residency_plans[False], tmp_path, _zeroed)
    with pytest.raises(MoECompressError, match=r"plan was made for other weights of this architecture \((content|checkpoint) fingerprint 0{16}"):
        _run(source, tmp_path, streaming, plan=plan)
    assert not any(tmp_path.glob("out-*/*")), "nothing written"


def test_a_zeroed_fingerprint_of_the_older_single_kind_is_refused_streamed(source, residency_plans, tmp_path):
    """An older plan's zeroed content fingerprint cannot be compared by a streamed run: refused, not skipped."""
    plan = _edited_identity(residency_plans[False], tmp_path, _legacy("0" * 32))
    with pytest.raises(MoECompressError, match=r"plan was made for other weights .*fingerprint 0{32}"):
        _run(source, tmp_path, False, plan=plan)
    with pytest.raises(MoECompressError, match=r"records only a content fingerprint, which this run cannot compute \(that needs the model loaded in memory: streaming off\)"):
        _run(source, tmp_path, True, plan=plan)


def _swapped(identity):
    prints = identity["fingerprints"]
    return {**identity, "fingerprints": {"content": prints["checkpoint"], "checkpoint": prints["content"]}}


UNCHECKABLE = {
    "null": (_legacy(None), "this plan records no weights fingerprint"),
    "none-recorded": (lambda identity: {**identity, "fingerprints": {}}, "this plan records no weights fingerprint"),
    "kind-switched": (lambda identity: _legacy(identity["fingerprints"]["content"], "checkpoint")(identity), "other weights of this architecture"),
    "kinds-swapped": (_swapped, "other weights of this architecture"),
}


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("case", list(UNCHECKABLE))
def test_a_null_or_switched_fingerprint_is_refused_unless_ignored_with_a_warning(source, residency_plans, tmp_path, capsys, case, streaming):
    edit, message = UNCHECKABLE[case]
    plan = _edited_identity(residency_plans[False], tmp_path, edit)
    with pytest.raises(MoECompressError, match=rf"{message}.*pass ignore_plan_identity to apply it"):
        _run(source, tmp_path, streaming, plan=plan)
    capsys.readouterr()
    result = _run(source, tmp_path, streaming, plan=plan, ignore_plan_identity=True)
    assert result.plan.kept_counts() == {0: 6, 1: 6, 2: 6}
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and message in warnings[0] and "ignore_plan_identity" in warnings[0] and "--" not in warnings[0], warnings


def test_a_model_handed_over_in_memory_cannot_check_a_streamed_plan(source, residency_plans, capsys):
    """It may differ from any file, so it has no checkpoint fingerprint: refused, or applied with a warning."""
    from moe_compress.source.load import load_model

    model, _ = load_model(source)
    with pytest.raises(MoECompressError, match=r"records only a checkpoint fingerprint, which this run cannot compute \(that needs the model opened from its checkpoint directory\)"):
        compress(model, plan=residency_plans[True])
    result = compress(model, plan=residency_plans[True], ignore_plan_identity=True)
    assert result.plan.kept_counts() == {0: 6, 1: 6, 2: 6}
    assert "warning: this plan records only a checkpoint fingerprint" in capsys.readouterr().err


def test_the_cli_takes_ignore_plan_identity_and_warns(source, residency_plans, tmp_path):
    from typer.testing import CliRunner

    from moe_compress.cli import app

    plan = _edited_identity(residency_plans[False], tmp_path, _legacy(None))
    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": "a b c d e f g " * 20}) + "\n" for _ in range(8)))
    command = ["prune", str(source), "--plan-in", str(plan), "--streaming", "on", "--no-cache", "--calib", str(calib), "--seq-len", "16"]
    refused = CliRunner().invoke(app, [*command, "--out", str(tmp_path / "refused")])
    assert refused.exit_code == 2 and "records no weights fingerprint" in refused.stderr and not (tmp_path / "refused").exists()
    applied = CliRunner().invoke(app, [*command, "--out", str(tmp_path / "applied"), "--ignore-plan-identity"])
    assert applied.exit_code == 0, applied.output
    assert "warning: this plan records no weights fingerprint: applied with --ignore-plan-identity, checked against the model's layers and experts" in applied.stderr
    for name in ("prune", "analyze"):
        assert "--ignore-plan-identity" in CliRunner().invoke(app, [name, "--help"], env={"COLUMNS": "300"}).output
