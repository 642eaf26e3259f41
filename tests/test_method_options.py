"""Method options as data: `prune --option KEY=VALUE` read by the method's own option types, the old
per-method flags as aliases of the same options, and `moe-compress methods NAME`."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from moe_compress.cli import app
from moe_compress.errors import MoECompressError
from moe_compress.methods import get_method
from moe_compress.methods.options import describe_options, read_option
from tiny_checkpoints import save_tiny_checkpoint, write_calibration

runner = CliRunner()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("options")
    return save_tiny_checkpoint(root / "tiny"), write_calibration(root / "calib.jsonl")


def prune(inputs, out, *args: str):
    checkpoint, calib = inputs
    common = ["--calib", calib, "--samples", "8", "--seq-len", "32", "--batch-size", "4", "--no-cache", "--ratio", "0.5"]
    result = runner.invoke(app, ["prune", str(checkpoint), "--out", str(out), *map(str, common), *args])
    return result, [line for line in result.stderr.splitlines() if line.strip()]


def plan_of(out) -> dict:
    plan = json.loads((out / "moe_compress_plan.json").read_text())
    return {"layers": plan["layers"], "meta": plan["meta"], "method": plan["method"]}


@pytest.mark.parametrize("method, old, new", [
    ("mone", ["--fusion", "weighted_sum", "--fusion-weight", "0.3", "--no-novice"],
     ["--option", "fusion=weighted_sum", "--option", "fusion_weight=0.3", "--option", "novices=false"]),
    ("reap", ["--renormalize", "false", "--no-protect-super-experts"], ["--option", "renormalize=false", "--option", "protect_super_experts=false"]),
])
def test_an_option_changes_the_plan_exactly_as_its_old_flag_did(inputs, tmp_path, method, old, new):
    runs = {}
    for name, args in (("default", []), ("old", old), ("new", new)):
        result, _ = prune(inputs, tmp_path / name, "--method", method, *args)
        assert result.exit_code == 0, result.output
        runs[name] = plan_of(tmp_path / name)
    assert runs["new"] == runs["old"]
    assert runs["new"]["meta"] != runs["default"]["meta"]
    if method == "mone":
        assert runs["new"]["meta"]["fusion"] == "weighted_sum" and runs["new"]["meta"]["fusion_weight"] == 0.3
        assert runs["new"]["meta"]["novices"] is False
    else:
        assert runs["new"]["meta"]["renormalize"] is False and runs["new"]["meta"]["protect_super_experts"] is False


@pytest.mark.parametrize("args, message", [
    (["--option", "bogus=1"], "error: method 'reap' has no option 'bogus'; its options: protect_super_experts, renormalize."),
    (["--method", "cprune", "--option", "clusters=many"], "error: --option clusters must be an integer; got 'many'."),
    (["--method", "cprune", "--option", "stage1_rate=fast"], "error: --option stage1_rate must be a finite number or none; got 'fast'."),
    (["--method", "cprune", "--option", "clusters=0"], "error: --option clusters must be a positive integer; got 0."),
    (["--option", "renormalize=sometimes"], "error: --option renormalize must be true or false or 'model'; got 'sometimes'."),
    # a choice is refused when read, before the model is opened (MoNE checked these only when planning, after calibration)
    (["--method", "mone", "--option", "output_format=bogus"], "error: --option output_format must be 'pruned' or 'expert-substitution'; got 'bogus'."),
    (["--method", "mone", "--option", "fusion=sum"], "error: --option fusion must be 'product' or 'minmax_product' or 'weighted_sum'; got 'sum'."),
    (["--option", "renormalize"], "error: --option renormalize: give each option once, as KEY=VALUE (`moe-compress methods reap` lists them)."),
    (["--renormalize", "false", "--option", "renormalize=true"],
     "error: --option renormalize=true: give each option once, as KEY=VALUE (`moe-compress methods reap` lists them)."),
])
def test_a_bad_option_is_one_line_and_exit_2_before_anything_is_written(inputs, tmp_path, args, message):
    result, lines = prune(inputs, tmp_path / "out", *args)
    assert result.exit_code == 2 and lines == [message]
    assert not (tmp_path / "out").exists()


def test_option_text_is_read_by_the_plan_parameters_types():
    cprune, reap, ream = get_method("cprune"), get_method("reap"), get_method("ream")
    assert read_option(cprune, "stage1_rate", "none") is None and read_option(cprune, "stage1_rate", "0.3") == 0.3
    assert read_option(cprune, "clusters", "3") == 3 and read_option(ream, "use_gate", "False") is False
    assert [read_option(reap, "renormalize", text) for text in ("true", "false", "model")] == [True, False, "model"]
    with pytest.raises(MoECompressError, match=r"^stage1_rate must be a finite number or none; got 'nan'\.$"):
        read_option(cprune, "stage1_rate", "nan")


def test_methods_name_lists_its_options_with_types_defaults_and_help():
    rows = {row["name"]: row for row in describe_options(get_method("cprune"))}
    assert list(rows) == ["clusters", "global_clusters", "batch", "small", "stage1_rate", "stage2_rate", "protect_super_experts"]
    assert rows["clusters"] == {"name": "clusters", "type": "an integer", "default": "12", "help": "clusters per layer in stage 1 (reference 12)"}
    assert rows["stage1_rate"]["type"] == "a finite number or none" and rows["stage1_rate"]["default"] == "none"
    assert rows["protect_super_experts"]["default"] == "true"
    result = runner.invoke(app, ["methods", "mone"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "moe-compress prune --method mone --option KEY=VALUE" in result.stdout
    for name in ("fusion", "fusion_weight", "novices", "global_scores", "variance", "protect_super_experts", "weighted_sum", "running"):
        assert name in result.stdout, name
    result = runner.invoke(app, ["methods", "bogus"])
    assert result.exit_code == 2 and result.stderr.startswith("error: unknown method 'bogus'; available: cprune, cprune-cosine, ean,")


def test_prune_help_explains_the_option_and_hides_the_old_flags():
    text = runner.invoke(app, ["prune", "--help"], env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"}).stdout
    assert "--option" in text and "moe-compress methods NAME" in text
    assert "--fusion-weight" not in text and "--cluster-batch" not in text
