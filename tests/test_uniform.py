"""`--uniform` (issue 23): a global budget's plan rounded to the same count in every MoE layer.

What must hold: every layer keeps the same count, the global plan's total shared equally (in
whole routing-group units for group-limited routers); which experts is the method's own layer
rule at that count (for score criteria: the top count of each layer's scores); the output is a
stock checkpoint that reloads exactly; and the summary carries both plans' qualities, each the
figure a separate measurement of that plan gives.
"""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from helpers import assert_reloads_exactly, load_in_fresh_process, save_expected, token_batches
from moe_compress import compress
from moe_compress.cli import app
from moe_compress.methods.uniform import kept_per_layer
from tiny_checkpoints import save_tiny_checkpoint, write_calibration
from tiny_models import tiny_model

runner = CliRunner()


def _uniform(model_type: str, method: str, ratio: float, **kwargs):
    return compress(tiny_model(model_type, num_layers=4), method=method, ratio=ratio, budget="global", calib=token_batches(count=2),
                    cache_dir=False, uniform=True, **kwargs)


@pytest.mark.parametrize(("model_type", "method"), [("mixtral", "reap"), ("mixtral", "hc-smoe"), ("deepseek_v3", "frequency"), ("deepseek_v3", "reap")])
def test_uniform_plan_shares_the_global_total_equally(model_type, method):
    result = _uniform(model_type, method, 0.4)
    glob, plan = kept_per_layer(result.global_plan), kept_per_layer(result.plan)
    groups = result.global_plan.routing_groups
    assert groups == (2 if model_type == "deepseek_v3" else 1)
    assert len(set(glob.values())) > 1, "the global plan must be non-uniform for this test to mean anything"
    assert glob.keys() == plan.keys()
    assert set(plan.values()) == {groups * math.floor(sum(glob.values()) / groups / len(glob) + 0.5)}
    assert abs(sum(plan.values()) - sum(glob.values())) <= groups * len(glob) / 2
    for lp in result.plan.layers:  # group-limited routing: every group keeps the same share
        per_group = lp.num_experts // groups
        assert [sum(e // per_group == g for e in lp.keep) for g in range(groups)] == [len(lp.keep) // groups] * groups
        assert len(lp.keep) // groups >= result.plan.min_per_group and len(lp.keep) >= result.plan.top_k
    summary = result.summary["uniform"]
    assert summary["global"]["kept_per_layer"] == {str(k): v for k, v in glob.items()}
    assert summary["uniform"]["kept_per_layer"] == {str(k): v for k, v in plan.items()}
    assert summary["uniform"]["params_after"] == result.summary["params_after"]


@pytest.mark.parametrize("model_type", ["mixtral", "deepseek_v3"])
def test_uniform_keeps_each_layers_top_scores_as_the_layer_budget_does(model_type):
    """Global scores are each layer's scores over a positive per-layer factor: the best `count` of a
    layer are its best `count` under its own scores, which is the layer budget at that count."""
    options = {"protect_super_experts": False}
    result = _uniform(model_type, "reap", 0.4, options=options)
    count = next(iter(kept_per_layer(result.plan).values()))
    groups, experts = result.plan.routing_groups, result.plan.layers[0].num_experts
    for lp, global_lp in zip(result.plan.layers, result.global_plan.layers):
        assert lp.scores == global_lp.scores
        per_group = experts // groups
        best = [sorted(range(g * per_group, (g + 1) * per_group), key=lambda e: (-lp.scores[e], -e))[: count // groups] for g in range(groups)]
        assert lp.keep == sorted(e for group in best for e in group)
    layer = compress(tiny_model(model_type, num_layers=4), method="reap", ratio=(experts - count) / experts, budget="layer",
                     calib=token_batches(count=2), cache_dir=False, options=options)
    assert [lp.keep for lp in layer.plan.layers] == [lp.keep for lp in result.plan.layers]


def test_uniform_output_is_stock_and_reloads_exactly(tmp_path):
    model = tiny_model("mixtral", num_layers=4)
    result = compress(model, method="reap", ratio=0.4, budget="global", calib=token_batches(count=2), cache_dir=False, uniform=True,
                      out=tmp_path / "uniform")
    glob = compress(tiny_model("mixtral", num_layers=4), method="reap", ratio=0.4, budget="global", calib=token_batches(count=2),
                    cache_dir=False, out=tmp_path / "global")
    assert json.loads((glob.output_dir / "config.json").read_text()).get("auto_map"), "the global plan alone needs remote code"
    config = json.loads((result.output_dir / "config.json").read_text())
    assert "auto_map" not in config and not list(result.output_dir.glob("*.py"))
    save_expected(result.output_dir, token_batches(count=1, seq_len=12)[0], result.model)
    assert_reloads_exactly(load_in_fresh_process([{"path": str(result.output_dir), "remote": False}])[str(result.output_dir)])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("uniform")
    return save_tiny_checkpoint(root / "tiny"), write_calibration(root / "calib.jsonl")


def _run(*args) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.stdout + result.stderr
    return result.stdout


def _summary(path) -> dict:
    return json.loads((path / "moe_compress_summary.json").read_text())


def test_summary_carries_both_plans_qualities(files, tmp_path):
    checkpoint, calib = files
    common = ["--method", "reap", "--ratio", "0.4", "--budget", "global", "--calib", calib, "--samples", "8", "--seq-len", "32", "--no-cache"]
    evaluation = ["--eval", calib, "--eval-windows", "2", "--eval-seq-len", "16"]
    text = _run("prune", checkpoint, "--out", tmp_path / "u", "--uniform", *common, *evaluation)
    assert "global plan -> uniform" in text
    plans = _summary(tmp_path / "u")["uniform"]
    source = str(calib)
    assert len(set(plans["global"]["kept_per_layer"].values())) > 1 and len(set(plans["uniform"]["kept_per_layer"].values())) == 1
    # Each plan's figures are what measuring that plan on its own gives: the global plan pruned without
    # --uniform, and the uniform output, each evaluated against the original with `eval --compare`.
    _run("prune", checkpoint, "--out", tmp_path / "g", *common, *evaluation)
    for name, out in (("global", tmp_path / "g"), ("uniform", tmp_path / "u")):
        _run("eval", out, "--compare", checkpoint, "--ppl", calib, "--max-windows", "2", "--seq-len", "16", "--no-speed", "--json", tmp_path / f"{name}.json")
        report = json.loads((tmp_path / f"{name}.json").read_text())
        assert plans[name]["perplexity"][source] == pytest.approx(report["perplexity"][source]["perplexity"], rel=1e-6)
        assert plans[name]["kl"][source] == pytest.approx(report["fidelity"][source]["kl"], rel=1e-5, abs=1e-9)
        assert plans[name]["top1_agreement"][source] == report["fidelity"][source]["top1_agreement"]
        assert plans[name]["params_after"] == _summary(out)["params_after"]
    assert plans["global"]["kl"][source] != plans["uniform"]["kl"][source]
    card = (tmp_path / "u" / "README.md").read_text()
    assert f"| global budget | {min(plans['global']['kept_per_layer'].values())}-" in card
    assert f"| {plans['uniform']['perplexity'][source]:.3f} | {plans['uniform']['kl'][source]:.4f} |" in card

    # Streamed, the saved model is measured the same way; the global plan is not (no model in memory), and says so.
    _run("prune", checkpoint, "--out", tmp_path / "s", "--uniform", "--streaming", "on", *common, *evaluation)
    streamed = _summary(tmp_path / "s")["uniform"]
    assert streamed["uniform"]["kl"][source] == pytest.approx(plans["uniform"]["kl"][source], rel=1e-5)
    assert "perplexity" not in streamed["global"] and "not measured in a streamed run" in streamed["global"]["note"]


def test_without_eval_both_plans_are_summarised_and_the_measurement_named(files, tmp_path):
    checkpoint, calib = files
    text = _run("prune", checkpoint, "--out", tmp_path / "u", "--uniform", "--budget", "global", "--ratio", "0.4", "--calib", calib,
                "--samples", "8", "--seq-len", "32", "--no-cache")
    plans = _summary(tmp_path / "u")["uniform"]
    assert set(plans) == {"global", "uniform"} and "perplexity" not in plans["uniform"]
    assert plans["global"]["kept_total"] == sum(plans["global"]["kept_per_layer"].values())
    assert "quality of both plans not measured: add --eval bundled" in text and "--compare" in text


def test_recipe_prune_stage_takes_uniform(files, tmp_path):
    checkpoint, calib = files
    recipe = {"model": str(checkpoint), "calibration": {"source": str(calib), "samples": 8, "seq_len": 32}, "evaluate": {"ppl": False},
              "stages": [{"prune": {"ratio": 0.4, "budget": "global", "uniform": True}}]}
    (tmp_path / "recipe.yaml").write_text(json.dumps(recipe))
    _run("run", tmp_path / "recipe.yaml", "--out", tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "auto_map" not in config and config["num_local_experts"] == 5  # 24 - floor(0.4 * 24) = 15 kept, 5 in each of 3 layers


def test_dry_run_says_every_layer_keeps_the_same_count(files, tmp_path):
    checkpoint, _ = files
    text = _run("prune", checkpoint, "--out", tmp_path / "x", "--budget", "global", "--uniform", "--dry-run")
    assert "every MoE layer would keep the same count" in text and not (tmp_path / "x").exists()
