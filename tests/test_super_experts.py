"""The super-expert guard: detection rule, and pruning/merging plans that keep super experts intact."""

from __future__ import annotations

import torch
from typer.testing import CliRunner

from helpers import token_batches
from moe_compress import Plan, compress
from moe_compress.engine.statistics import collect_statistics
from moe_compress.cli import app
from moe_compress.methods.super_experts import find_super_experts
from moe_compress.walk.moments import split_moments
from tiny_checkpoints import save_tiny_checkpoint, write_calibration
from tiny_models import tiny_model


def test_detection_follows_the_papers_rule():
    values = {layer: torch.ones(64) for layer in range(8)}
    values[1][5], values[2][3] = 40.0, 39.0  # extreme, in the first 75 % of layers
    values[3][0] = 5.0  # large, but under the 99.5th percentile of the 384 considered values (7.9)
    values[7][0] = 500.0  # the last quarter of layers is not considered (include_layers = 0.75)
    stats = {layer: {"max_output_abs": v} for layer, v in values.items()}
    assert find_super_experts(stats, num_layers=8) == {1: [5], 2: [3]}
    one_layer = torch.ones(1000)
    one_layer[:3], one_layer[999] = 5.0, 100.0  # 5 is above the percentile (1.0) but under a tenth of the maximum
    assert find_super_experts({0: {"max_output_abs": one_layer}}, num_layers=1) == {0: [999]}


def _model_with_a_super_expert():
    """Tiny Mixtral whose least used expert in layer 0 has huge down-projection weights."""
    model = tiny_model("mixtral")
    stats, _ = collect_statistics(model, token_batches(), ("selected",), cache_dir=False)
    rare = int(torch.argmin(stats[0]["selected"]))
    with torch.no_grad():
        model.model.layers[0].mlp.experts.down_proj[rare] *= 1000
    return model, rare


def test_pruning_keeps_a_rarely_used_super_expert_only_with_the_guard():
    model, rare = _model_with_a_super_expert()
    unguarded = compress(model, method="frequency", ratio=0.5, calib=token_batches(), cache_dir=False,
                         options={"protect_super_experts": False}).plan
    assert rare not in unguarded.layers[0].keep
    model, rare = _model_with_a_super_expert()
    guarded = compress(model, method="frequency", ratio=0.5, calib=token_batches(), cache_dir=False).plan
    assert rare in guarded.layers[0].keep and len(guarded.layers[0].keep) == 4
    assert guarded.meta["super_experts"] == {"0": [rare]} and len(guarded.meta["super_expert_swaps"]) == 1
    assert [lp.keep for lp in guarded.layers[1:]] == [lp.keep for lp in unguarded.layers[1:]]


def test_mone_repair_gives_the_swapped_out_expert_its_novice_vector():
    model, rare = _model_with_a_super_expert()
    result = compress(model, method="mone", ratio=0.5, calib=token_batches(), cache_dir=False)
    plan: Plan = result.plan
    assert rare in plan.layers[0].keep
    model, _ = _model_with_a_super_expert()
    stats, _ = collect_statistics(model, token_batches(), ("output_moments",), cache_dir=False)
    _, mean, _ = split_moments(stats[0]["output_moments"])
    assert torch.allclose(plan.novice_vectors[0], mean[plan.layers[0].removed].float())


def test_merging_keeps_a_super_expert_as_a_singleton():
    for method in ("hc-smoe", "m-smoe", "ream"):
        model, rare = _model_with_a_super_expert()
        plan = compress(model, method=method, ratio=0.5, calib=token_batches(), cache_dir=False).plan
        assert [rare] in plan.layers[0].merges, (method, plan.layers[0].merges)
        assert sorted(e for g in plan.layers[0].merges for e in g) == list(range(8))


def test_cli_merges_with_the_guard_switched_off(tmp_path):
    checkpoint = save_tiny_checkpoint(tmp_path / "tiny")
    calib = write_calibration(tmp_path / "calib.jsonl")
    result = CliRunner().invoke(app, [
        "prune", str(checkpoint), "--method", "ream", "--ratio", "0.25", "--calib", str(calib), "--samples", "4", "--seq-len", "32",
        "--no-protect-super-experts", "--align", "weights", "--group-size", "2", "--no-cache", "--out", str(tmp_path / "out"),
    ])
    assert result.exit_code == 0, result.output
    plan = Plan.load(tmp_path / "out" / "moe_compress_plan.json")
    assert plan.meta["protect_super_experts"] is False and plan.meta["align"] == "weights"
    assert all(len(group) <= 2 for lp in plan.layers for group in lp.merges)
    assert set(plan.merge_permutations) == {lp.layer for lp in plan.layers}
    bad = CliRunner().invoke(app, ["prune", str(checkpoint), "--method", "ream", "--align", "sideways", "--calib", str(calib),
                                   "--samples", "4", "--seq-len", "32", "--no-cache", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "align must be one of" in bad.output and not (tmp_path / "bad").exists()
