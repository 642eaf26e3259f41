"""The stage registry and the composable call: one shape for every stage, one call for any composition."""

from __future__ import annotations

import inspect
import json
from typing import ClassVar

import pytest
import torch

import moe_compress as mc
from helpers import token_batches
from moe_compress.errors import MoECompressError
from moe_compress.source import load_model
from moe_compress.pipeline import Result
from moe_compress.stages import Stage, StageContext, StageOutcome, build_stage, register_stage, stages
from moe_compress.stages.footprint import Footprint
from moe_compress.stages.sizes import checkpoint_sizes
from tiny_checkpoints import save_tiny_checkpoint, write_calibration
from tiny_models import VOCAB, tiny_model


class Identity(Stage):
    """A stage that changes nothing: the whole of adding a stage is this class and its registration."""

    kind: ClassVar[str] = "identity_for_tests"
    note: str = ""

    def run(self, context: StageContext) -> StageOutcome:
        return StageOutcome(context.model, None, {"note": self.note})


register_stage(Identity)


def _verb(kind: str):
    from moe_compress.finetuning import finetune
    from moe_compress.slimming import slim
    from moe_compress.slimming.quantize import quantize
    from moe_compress.stages.condense import condense
    from moe_compress.stages.drop import drop
    from moe_compress.stages.prune import prune

    return {"prune": prune, "drop": drop, "condense": condense, "finetune": finetune, "slim": slim, "quantize": quantize}[kind]


@pytest.mark.parametrize("kind", ["prune", "drop", "condense", "finetune", "slim", "quantize"])
def test_a_stage_defaults_to_what_its_single_call_defaults_to(kind):
    """The stage is the typed form of its call's options: the same names and the same defaults, so a
    recipe, `mc.compress([...])` and the CLI run what the single call would."""
    parameters = inspect.signature(_verb(kind)).parameters
    for name, field in stages()[kind].model_fields.items():
        if name == "options":  # prune's method options: the method's own defaults
            continue
        default = parameters[name].default
        assert field.default == (list(default) if isinstance(default, tuple) else default), (kind, name)


def test_options_are_checked_strictly_with_one_line_errors():
    assert mc.Prune("reap", ratio=0.5).settings()["ratio"] == 0.5
    assert mc.Prune(ratio=1).ratio == 1.0  # an integer is a number
    for options, message in [
        ({"ratio": "0.25"}, r"^prune: option 'ratio' must be a finite number; got '0.25' \(str\)\.$"),
        ({"ratio": float("nan")}, r"^prune: option 'ratio' must be a finite number"),
        ({"budget": "everywhere"}, r"^prune: option 'budget' must be one of 'layer', 'global', 'explicit'; got 'everywhere'"),
        ({"rati0": 0.25}, r"^prune: unknown option 'rati0'; known: budget, keep, method, min_keep, protect_super_experts, ratio"),
        ({"method": "reap", "renormalize": 3}, r"^prune: option 'renormalize' must be"),
    ]:
        with pytest.raises(MoECompressError, match=message):
            mc.Prune(**options)
    with pytest.raises(MoECompressError, match=r"^stage 2 \(slim\): unknown option 'sparsty'; known: blocksize, calibrate_all_experts, damp, method, nm"):
        build_stage("slim", {"sparsty": 0.5}, "stage 2 (slim)")
    with pytest.raises(MoECompressError, match=r"unknown stage kind 'sharpen'; available: condense, drop, finetune, .*prune, quantize, slim\b"):
        build_stage("sharpen", {})


def test_describe_names_the_options_given_in_their_order():
    assert mc.Prune("mone", ratio=0.5, budget="global").describe() == "prune: method=mone, ratio=0.5, budget=global"
    assert build_stage("prune", {"ratio": 0.5, "method": "reap", "protect_super_experts": False}).describe() == (
        "prune: ratio=0.5, method=reap, protect_super_experts=False")
    assert mc.Quantize().describe() == "quantize: defaults"
    assert mc.Slim("wanda", sparsity=0.5, targets=("experts", "shared")).describe() == "slim: method=wanda, sparsity=0.5, targets=['experts', 'shared']"


def test_a_registered_stage_runs_in_a_composition_and_changes_nothing(tmp_path):
    model = tiny_model("qwen3_moe")
    tokens = torch.randint(3, VOCAB, (2, 16))
    with torch.no_grad():
        before = model(tokens).logits
    result = mc.compress(model, [Identity(note="hello")], calib=token_batches(count=1), out=tmp_path / "out")
    assert isinstance(result, Result) and result.plans == []
    assert result.report["rows"][1]["stage"] == "1: identity_for_tests" and result.report["rows"][1]["note"] == "hello"
    assert result.report["recipe"]["stages"] == [{"identity_for_tests": {"note": "hello"}}]
    reloaded, _ = load_model(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, before)
    with pytest.raises(ValueError, match="'identity_for_tests' is already registered"):
        register_stage(Identity)


def test_prune_slim_quantize_in_one_call_reloads_to_what_was_measured(tmp_path):
    """The README's composable call, end to end: prune -> slim -> quantize, one Result, a checkpoint that reloads."""
    checkpoint = save_tiny_checkpoint(tmp_path / "tiny", "qwen2_moe")
    calib = write_calibration(tmp_path / "calib.jsonl", documents=60)
    result = mc.compress(
        str(checkpoint),
        [mc.Prune("reap", ratio=0.25), mc.Slim("wanda", sparsity=0.5), mc.Quantize(bits=4, scope="experts")],
        calib=mc.CalibrationSpec(str(calib), samples=8, seq_len=32),
        evaluate={"ppl": str(calib), "windows": 4, "seq_len": 32},
        out=tmp_path / "out",
    )
    rows = result.report["rows"]
    assert [row["stage"] for row in rows] == ["original", "1: prune", "2: slim", "3: quantize"]
    assert all(row["guard"]["passed"] and row["guard"]["windows"] == 32 for row in rows[1:])  # held-out text checked every stage
    assert rows[2]["sparsity_reached"] == {"experts": 0.5}
    assert rows[3]["bits"] == 4 and rows[3]["bytes"] == result.report["checkpoint_bytes"] < rows[2]["bytes"]
    assert [name for name, _ in result.plans] == ["01-prune"]
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["recipe"]["stages"] == [{"prune": {"method": "reap", "ratio": 0.25}}, {"slim": {"method": "wanda", "sparsity": 0.5}},
                                         {"quantize": {"bits": 4, "scope": "experts"}}]
    reloaded, _ = load_model(tmp_path / "out")
    assert reloaded.model.layers[1].mlp.experts.gate_up_proj.shape[0] == 6
    from moe_compress.evaluate.lm_perplexity import perplexity
    from moe_compress.pipeline import eval_sets

    data = eval_sets(reloaded_tokenizer := load_model(tmp_path / "out")[1], {"ppl": str(calib), "windows": 4, "seq_len": 32})[str(calib)]
    assert reloaded_tokenizer is not None
    assert perplexity(reloaded, data).perplexity == pytest.approx(rows[3]["perplexity"][str(calib)], rel=1e-6)


class Vandal(Stage):
    """Multiplies one decoder layer's attention output projection by 100: a broken stage that still loads."""

    kind: ClassVar[str] = "vandal_for_tests"
    layer: int = 1

    def run(self, context: StageContext) -> StageOutcome:
        with torch.no_grad():
            context.model.model.layers[self.layer].self_attn.o_proj.weight.mul_(100)
        return StageOutcome(context.model)


register_stage(Vandal)


def test_the_guard_stops_a_composition_whose_stage_broke_the_model_and_names_the_layer(tmp_path):
    checkpoint = save_tiny_checkpoint(tmp_path / "tiny", "qwen2_moe")
    calib = write_calibration(tmp_path / "calib.jsonl", documents=60)
    spec = mc.CalibrationSpec(str(calib), samples=8, seq_len=32)
    with pytest.raises(mc.MoECompressError, match=r"^quality guard failed after vandal_for_tests: top-1 agreement 0\.\d+ < 0\.25 .*worst layer 1 "):
        mc.compress(str(checkpoint), [mc.Prune("reap", ratio=0.25), Vandal(layer=1)], calib=spec, out=tmp_path / "out")
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    result = mc.compress(str(checkpoint), [Vandal(layer=1)], calib=spec, out=tmp_path / "off", guard=False)
    assert "guard" not in result.report["rows"][1]
    batches = mc.compress(str(checkpoint), [Identity()], calib=token_batches(count=1)).report["rows"][1]["guard"]
    assert batches == {"stage": "identity_for_tests", "skipped": "no held-out text: calibration was given as token batches"}


def test_a_composition_is_checked_before_anything_runs(tmp_path):
    model = tiny_model("qwen3_moe")
    with pytest.raises(MoECompressError, match=r"^stage 1 \(quantize\) writes the final checkpoint, so it must be the last stage"):
        mc.compress(model, [mc.Quantize(), mc.Prune()], calib=token_batches(count=1), out=tmp_path / "a")
    with pytest.raises(MoECompressError, match=r"^stage 2 \(drop\): can drop 1\.\.2 blocks; asked for 9"):
        mc.compress(model, [mc.Prune(ratio=0.25), mc.Drop(unit="block", n=9)], calib=token_batches(count=1))
    with pytest.raises(MoECompressError, match="give an output directory"):
        mc.compress(model, [mc.Quantize()], calib=token_batches(count=1))
    assert not (tmp_path / "a").exists()


def test_the_old_single_prune_call_is_still_a_prune():
    result = mc.compress(tiny_model("mixtral"), "reap", 0.5, "layer", token_batches(), cache_dir=False)
    assert result.plan.method == "reap" and set(result.summary["experts_per_layer"].values()) == {4}


def test_predicted_footprint_is_the_saved_bytes_of_prune_then_quantize(tmp_path):
    """`predict` chained over a composition gives exactly the tensor bytes the composition saves (a
    layer budget and experts-only quantisation depend on no calibration; file headers aside)."""
    from moe_compress.source.checkpoint import Checkpoint

    checkpoint = save_tiny_checkpoint(tmp_path / "tiny", "qwen2_moe")
    composition = [mc.Prune("frequency", ratio=0.25), mc.Quantize(bits=4, scope="experts")]
    footprint = Footprint.of(checkpoint_sizes(str(checkpoint)))
    assert footprint.bytes == checkpoint_sizes(str(checkpoint)).total
    for stage in composition:
        footprint = stage.predict(footprint)
    result = mc.compress(str(checkpoint), composition, calib=token_batches(count=1), out=tmp_path / "out")
    assert footprint.exact and footprint.bytes == Checkpoint(result.output_dir).total_bytes()


def test_a_recipe_dry_run_predicts_the_bytes_each_stage_leaves(tmp_path):
    """The dry run chains every stage's `predict`: a layer-budget prune then experts-only 4 bits is
    exact, and what it prints is what the run then saves."""
    from moe_compress.recipes import describe_recipe
    from moe_compress.source.checkpoint import Checkpoint

    checkpoint = save_tiny_checkpoint(tmp_path / "tiny", "qwen2_moe")
    calib = write_calibration(tmp_path / "calib.jsonl", documents=60)
    recipe = {"model": str(checkpoint), "calibration": {"source": str(calib), "samples": 8, "seq_len": 32}, "evaluate": {"ppl": False},
              "guard": False, "stages": [{"prune": {"method": "frequency", "ratio": 0.25}}, {"quantize": {"bits": 4, "scope": "experts"}}]}
    lines = describe_recipe(recipe, out=tmp_path / "out")
    assert "stages: (the weights now: " in "\n".join(lines) and not (tmp_path / "out").exists()
    report = mc.run_recipe(recipe, out=tmp_path / "out")
    saved = Checkpoint(tmp_path / "out").total_bytes()
    assert any(line.startswith("  2. quantize: bits=4, scope=experts -> weights") and f"({saved:,} bytes)" in line for line in lines), lines
    assert report["rows"][-1]["bits"] == 4


def test_the_prune_and_quantize_dry_runs_predict_the_bytes_they_then_save(tmp_path):
    import re

    from typer.testing import CliRunner

    from moe_compress.cli import app
    from moe_compress.source.checkpoint import Checkpoint

    checkpoint = save_tiny_checkpoint(tmp_path / "tiny", "qwen2_moe")
    calib = write_calibration(tmp_path / "calib.jsonl", documents=60)
    runner = CliRunner()
    for name, args in {"prune": ["prune", str(checkpoint), "--method", "frequency", "--ratio", "0.5", "--calib", str(calib), "--samples", "8",
                                 "--seq-len", "32", "--no-guard"],
                       "quantize": ["quantize", str(checkpoint), "--bits", "4", "--scope", "experts", "--no-guard"]}.items():
        dry = runner.invoke(app, [*args, "--out", str(tmp_path / name), "--dry-run"])
        assert dry.exit_code == 0, dry.output
        predicted = int(re.search(r"predicted weights: .* -> .* \(([\d,]+) bytes\)", dry.output).group(1).replace(",", ""))
        done = runner.invoke(app, [*args, "--out", str(tmp_path / name)])
        assert done.exit_code == 0, done.output
        assert predicted == Checkpoint(tmp_path / name).total_bytes(), name


@pytest.mark.parametrize("family, stage", [
    ("qwen2_moe", mc.Prune("frequency", ratio=0.5)),
    ("mixtral", mc.Drop(unit="moe", n=1)),
    ("mixtral", mc.Drop(unit="block", n=1)),
    ("qwen2_moe", mc.Drop(unit="moe", n=1)),
])
def test_the_predicted_parameters_are_those_of_the_model_the_run_saves(family, stage, tmp_path):
    """`Footprint.params` and `active_params` (from the config and shard headers) equal the saved model's counts,
    and `bytes` its checkpoint's, for a layer-budget prune and a drop of a given number of units (exact predictions);
    a MoE sub-layer dropped takes its shared experts with it (qwen2_moe)."""
    from moe_compress.arch import get_adapter
    from moe_compress.arch.size import model_size
    from moe_compress.stages.drop import drop
    from moe_compress.stages.footprint import footprints
    from moe_compress.stages.prune import prune
    from moe_compress.source.checkpoint import Checkpoint

    checkpoint = save_tiny_checkpoint(tmp_path / "tiny", family)
    before, after = footprints(str(checkpoint), [stage])
    original, _ = load_model(checkpoint)
    assert (before.params, before.active_params) == (model_size(original, get_adapter(original)).total, model_size(original, get_adapter(original)).active_per_token)
    run = prune if stage.kind == "prune" else drop
    run(str(checkpoint), calib=token_batches(2), out=tmp_path / "out", **stage.settings())
    saved, _ = load_model(tmp_path / "out")
    size = model_size(saved, get_adapter(saved))
    assert after.exact and (after.params, after.active_params) == (size.total, size.active_per_token)
    assert after.params < before.params and after.bytes == Checkpoint(tmp_path / "out").total_bytes()
