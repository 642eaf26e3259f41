"""Recipes: stages compose, share calibration, and report after every stage."""

from __future__ import annotations

import json

import pytest
import yaml

from moe_compress import MoECompressError, load_model, run_recipe
from moe_compress.recipes import load_recipe
from tiny_checkpoints import save_tiny_checkpoint, write_calibration


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    return save_tiny_checkpoint(root / "tiny", "qwen2_moe"), write_calibration(root / "calib.jsonl", documents=60)


def _recipe(checkpoint, calib, stages):
    return {
        "model": str(checkpoint),
        "calibration": {"source": str(calib), "samples": 8, "seq_len": 32},
        "evaluate": {"ppl": str(calib), "windows": 4, "seq_len": 32},
        "stages": stages,
    }


def test_stages_run_in_order_and_report(setup, tmp_path):
    checkpoint, calib = setup
    recipe = _recipe(checkpoint, calib, [{"drop": {"unit": "block", "n": 1}}, {"prune": {"method": "reap", "ratio": 0.25}}])
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    report = run_recipe(tmp_path / "r.yaml", out=tmp_path / "out")
    stages = [row["stage"] for row in report["rows"]]
    assert stages == ["original", "1: drop", "2: prune"]
    params = [row["params"] for row in report["rows"]]
    assert params[0] > params[1] > params[2]
    assert sorted(p.name for p in (tmp_path / "out" / "plans").iterdir()) == ["01-drop.json", "02-prune.json"]
    model, _ = load_model(tmp_path / "out")
    assert model.config.num_hidden_layers == 2 and sum(p.numel() for p in model.parameters()) == params[-1]
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["rows"][-1]["perplexity"][str(calib)] > 1
    assert "| 2: prune |" in (tmp_path / "out" / "report.md").read_text()


def test_rerunning_a_recipe_reuses_cached_statistics(setup, tmp_path, monkeypatch):
    checkpoint, calib = setup
    monkeypatch.setenv("MOE_COMPRESS_CACHE", str(tmp_path))  # other tests calibrate the same tiny model on the same text
    recipe = _recipe(checkpoint, calib, [{"prune": {"method": "mone", "ratio": 0.5}}])
    recipe["calibration"]["batch_size"] = 4  # MoNE's running variance needs more than one calibration batch
    first = run_recipe(recipe, out=tmp_path / "a")
    second = run_recipe(recipe, out=tmp_path / "b")
    assert first["rows"][1]["statistics_from_cache"] is False and second["rows"][1]["statistics_from_cache"] is True
    assert first["rows"][1]["perplexity"] == second["rows"][1]["perplexity"]


@pytest.mark.parametrize(
    "stages, message",
    [([], "non-empty 'stages'"), ([{"sharpen": {}}], "unknown kind 'sharpen'"), ([{"prune": 3}], "options must be a mapping")],
)
def test_bad_recipes_are_refused(stages, message):
    with pytest.raises(MoECompressError, match=message):
        load_recipe({"model": "x", "stages": stages})


def test_shipped_example_recipes_are_valid():
    from pathlib import Path

    from moe_compress.source import bundled_models

    shipped = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
    assert len(shipped) >= 3
    for path in shipped:
        recipe = load_recipe(path)
        assert recipe["model"] in bundled_models(), path
