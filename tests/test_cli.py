"""The command line end to end on tiny checkpoints, and its errors for bad input."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from typer.testing import CliRunner

from moe_compress.cli import app
from moe_compress.source import load_model
from tiny_checkpoints import save_dense_checkpoint, save_tiny_checkpoint, write_calibration

runner = CliRunner()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-mixtral")


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    return write_calibration(tmp_path_factory.mktemp("calib") / "calib.jsonl")


def run(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    return result, result.stdout + result.stderr


def test_inspect_reports_structure_and_parameters(checkpoint):
    result, text = run("inspect", checkpoint, "--json")
    assert result.exit_code == 0, text
    report = json.loads(result.stdout)
    assert report["model_type"] == "mixtral" and report["top_k"] == 2
    assert [row["experts"] for row in report["layers"]] == [8, 8, 8]
    size = report["size"]
    assert size["total"] == sum(size[k] for k in ("attention", "routed_experts", "shared_experts", "router", "other"))
    model, _ = load_model(checkpoint)
    assert size["total"] == sum(p.numel() for p in model.parameters())
    result, text = run("inspect", checkpoint)
    assert result.exit_code == 0 and "routed experts" in text and "active per token" in text


def test_prune_saves_plan_and_checkpoint_and_reuses_statistics(checkpoint, calib, tmp_path):
    args = ["prune", checkpoint, "--method", "reap", "--ratio", "0.25", "--budget", "global", "--calib", calib,
            "--samples", "8", "--seq-len", "32", "--cache-dir", tmp_path / "cache"]
    result, text = run(*args, "--out", tmp_path / "out", "--plan-out", tmp_path / "plan.json", "--eval", calib, "--eval-seq-len", "32")
    assert result.exit_code == 0, text
    assert "parameters" in text and "perplexity" in text and "peak memory" in text
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert sum(len(layer["keep"]) for layer in plan["layers"]) == 18  # round(24 * 0.75)
    summary = json.loads((tmp_path / "out" / "moe_compress_summary.json").read_text())
    assert not summary["statistics_from_cache"] and summary["params_after"] < summary["params_before"]
    result, text = run(*args, "--out", tmp_path / "out2")
    assert result.exit_code == 0, text
    assert "statistics from cache" in text
    # The same plan applied again gives the same model.
    result, text = run("prune", checkpoint, "--plan-in", tmp_path / "plan.json", "--out", tmp_path / "out3")
    assert result.exit_code == 0, text
    a, _ = load_model(tmp_path / "out")
    b, _ = load_model(tmp_path / "out3")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_eval_reports_perplexity_json(checkpoint, calib, tmp_path):
    result, text = run("eval", checkpoint, "--ppl", calib, "--seq-len", "32", "--json", tmp_path / "ppl.json")
    assert result.exit_code == 0, text
    ppl = json.loads((tmp_path / "ppl.json").read_text())["perplexity"][str(calib)]
    assert ppl["perplexity"] > 1 and ppl["tokens"] == ppl["windows"] * 31


def test_help_explains_every_option():
    for command in ("inspect", "prune", "eval"):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0
    text = runner.invoke(app, ["prune", "--help"], terminal_width=200).stdout
    for option in ("--method", "--ratio", "--budget", "--calib", "--samples", "--seq-len", "--seed", "--plan-in", "--plan-out", "--out"):
        assert option in text


def _corrupt(checkpoint, tmp_path):
    broken = shutil.copytree(checkpoint, tmp_path / "broken")
    weights = next(broken.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-100])
    return broken


def _unknown_type(checkpoint, tmp_path):
    odd = shutil.copytree(checkpoint, tmp_path / "odd")
    config = json.loads((odd / "config.json").read_text())
    config["model_type"] = "frobnicator_moe"
    (odd / "config.json").write_text(json.dumps(config))
    return odd


def _fewer_than_top_k_plan(checkpoint, tmp_path):
    plan = {"format": "moe-compress/plan@1", "model_type": "mixtral", "top_k": 2,
            "layers": [{"layer": 0, "num_experts": 8, "keep": [3]}]}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    return tmp_path / "plan.json"


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "not found"),
        ("dense", "'llama' is not supported"),
        ("unknown", "frobnicator_moe"),
        ("ratio-high", r"ratio must be in \[0, 1\)"),
        ("ratio-negative", r"ratio must be in \[0, 1\)"),
        ("plan-below-top-k", "fewer than top_k=2"),
        ("corrupt", "corrupt or truncated"),
        ("empty-calib", "contains no text"),
        ("short-calib", "fewer than one sequence"),
        ("bad-method", "unknown method"),
    ],
)
def test_bad_input_gives_a_clear_error_and_no_output(case, message, checkpoint, calib, tmp_path):
    model, extra = checkpoint, ["--calib", calib, "--seq-len", "32"]
    if case == "missing":
        model = tmp_path / "no-such-model"
    elif case == "dense":
        model = save_dense_checkpoint(tmp_path / "dense")
    elif case == "unknown":
        model = _unknown_type(checkpoint, tmp_path)
    elif case == "ratio-high":
        extra += ["--ratio", "1.2"]
    elif case == "ratio-negative":
        extra += ["--ratio", "-0.1"]
    elif case == "plan-below-top-k":
        extra += ["--plan-in", _fewer_than_top_k_plan(checkpoint, tmp_path)]
    elif case == "corrupt":
        model = _corrupt(checkpoint, tmp_path)
    elif case == "empty-calib":
        (tmp_path / "empty.jsonl").write_text("")
        extra = ["--calib", tmp_path / "empty.jsonl", "--seq-len", "32"]
    elif case == "short-calib":
        (tmp_path / "short.txt").write_text("just a few words")
        extra = ["--calib", tmp_path / "short.txt", "--seq-len", "32"]
    elif case == "bad-method":
        extra += ["--method", "astrology"]
    out = tmp_path / "out"
    result, text = run("prune", model, "--out", out, "--no-cache", *extra)
    assert result.exit_code == 2, text
    assert "error:" in text and "Traceback" not in text
    assert re.search(message, text), text
    assert not out.exists()
    assert not list(tmp_path.glob(".out.partial-*")), "no half-written output may remain"


def test_existing_output_is_not_clobbered(checkpoint, calib, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result, text = run("prune", checkpoint, "--out", out, "--calib", calib, "--seq-len", "32")
    assert result.exit_code == 2 and "--overwrite" in text
    assert (out / "keep.txt").read_text() == "mine"


def test_prune_with_method_options(checkpoint, calib, tmp_path):
    common = ["--calib", calib, "--samples", "8", "--seq-len", "32", "--no-cache"]
    result, text = run("prune", checkpoint, "--method", "mone", "--ratio", "0.5", "--fusion", "weighted_sum", "--fusion-weight", "0.3",
                       "--batch-size", "4", "--out", tmp_path / "mone", *common)
    assert result.exit_code == 0, text
    plan = json.loads((tmp_path / "mone" / "moe_compress_plan.json").read_text())
    assert plan["method"] == "mone" and plan["meta"]["fusion"] == "weighted_sum" and all(layer["action"] == "novices" for layer in plan["layers"])
    assert (tmp_path / "mone" / "moe_compress_runtime.py").is_file()
    result, text = run("prune", checkpoint, "--method", "reap", "--fusion", "product", "--out", tmp_path / "bad", *common)
    assert result.exit_code == 2 and "has no option" in text and not (tmp_path / "bad").exists()


def test_reference_mode_options_reach_the_methods(checkpoint, calib, tmp_path):
    common = ["--calib", calib, "--samples", "8", "--seq-len", "32", "--no-cache"]
    result, text = run("prune", checkpoint, "--method", "reap", "--ratio", "0.25", "--renormalize", "false", "--out", tmp_path / "r", *common)
    assert result.exit_code == 0, text
    plan = json.loads((tmp_path / "r" / "moe_compress_plan.json").read_text())
    assert plan["meta"]["renormalize"] is False and plan["meta"]["renormalised"] is False
    result, text = run("prune", checkpoint, "--method", "reap", "--renormalize", "sometimes", "--out", tmp_path / "bad", *common)
    assert result.exit_code == 2 and "--renormalize must be" in text
    result, text = run("prune", checkpoint, "--method", "mone", "--out", tmp_path / "one-batch", *common)
    assert result.exit_code == 2 and "variance=exact" in text and not (tmp_path / "one-batch").exists()
    result, text = run("prune", checkpoint, "--method", "cprune", "--ratio", "0.25", "--clusters", "3", "--out", tmp_path / "c", *common)
    assert result.exit_code == 0, text
    assert json.loads((tmp_path / "c" / "moe_compress_plan.json").read_text())["meta"]["clusters"] == 3
    result, text = run("condense", checkpoint, "--layers", "1", "--experts", "1", "--calib", calib, "--samples", "2", "--seq-len", "16",
                       "--state-file", tmp_path / "state.json", "--out", tmp_path / "cd")
    assert result.exit_code == 0, text
    plan = json.loads((tmp_path / "cd" / "moe_compress_plan.json").read_text())
    assert plan["meta"]["experts"] == 1 and len(plan["layers"][0]["keep"]) == 1 and (tmp_path / "state.json").is_file()
    result, text = run("condense", checkpoint, "--layers", "1", "--experts", "1", "--calib", calib, "--samples", "2", "--seq-len", "16",
                       "--state-file", tmp_path / "state.json", "--out", tmp_path / "cd2")
    assert result.exit_code == 0 and "resumed from a saved state" in text


def test_analyze_writes_tables_and_heatmaps(checkpoint, calib, tmp_path):
    result, text = run("analyze", checkpoint, "--calib", calib, "--samples", "8", "--seq-len", "32", "--probe-tokens", "16",
                       "--clusters", "3", "--out", tmp_path / "analysis", "--cache-dir", tmp_path / "cache")
    assert result.exit_code == 0, text
    report = json.loads((tmp_path / "analysis" / "analysis.json").read_text())
    assert sorted(report["layers"]) == ["0", "1", "2"]
    layer = report["layers"]["0"]
    assert set(layer) == {"frequency", "gate_mass", "output_variance", "reap", "cluster"}
    assert abs(sum(layer["frequency"]) - 2.0) < 1e-6, "top-2: frequencies sum to k"
    assert len(set(layer["cluster"])) == 3
    rows = (tmp_path / "analysis" / "analysis.csv").read_text().splitlines()
    assert rows[0] == "layer,expert,frequency,gate_mass,output_variance,reap,cluster" and len(rows) == 1 + 3 * 8
    assert len(list((tmp_path / "analysis").glob("heatmap_*.png"))) == 4
    assert len(list((tmp_path / "analysis").glob("similarity_layer*.png"))) == 1


def test_every_subpackage_imports_first_in_a_fresh_process():
    """A circular import shows only when its module is the first one loaded (as `moe-compress slim` loads preflight)."""
    import subprocess
    import sys

    modules = ["moe_compress.preflight", "moe_compress.recipes", "moe_compress.surgery", "moe_compress.methods",
               "moe_compress.slimming", "moe_compress.api", "moe_compress.sink.export", "moe_compress.dry_run",
               "moe_compress.stages", "moe_compress.engine.finish", "moe_compress.pipeline"]
    runs = [subprocess.Popen([sys.executable, "-c", f"import {m}"], stderr=subprocess.PIPE, text=True) for m in modules]
    failed = {m: run.communicate()[1].strip().splitlines()[-1:] for m, run in zip(modules, runs) if run.wait() != 0}
    assert not failed, failed
