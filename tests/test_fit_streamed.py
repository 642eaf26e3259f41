"""fit streamed (one decoder layer read at a time) chooses, measures and writes what the in-memory fit does."""

from __future__ import annotations

import filecmp
import json
import math
from pathlib import Path

import pytest
import transformers

import moe_compress as mc
from helpers import tensor_bytes
from moe_compress.arch.registry import get_adapter
from moe_compress.fitting import choices as fit_choices, search
from moe_compress.fitting.proxies import LayerProxy, other_costs
from moe_compress.fitting.streamed import streamed_other_costs
from moe_compress.source.load import load_model, load_streamed
from moe_compress.stages.sizes import checkpoint_sizes
from tiny_checkpoints import save_tiny_checkpoint

TINY_CALIB = mc.CalibrationSpec(samples=4, seq_len=32)
#: Files whose content records how the run went: times (report rows, the quantize summary), whether it streamed,
#: whether the prune stage found its statistics cached; compared apart below.
RUN_RECORDS = {"report.json", "moe_compress_summary.json"}


def _never(*args, **kwargs):
    raise AssertionError("loaded whole")


def _without_fingerprint(plan: dict) -> dict:
    """A streamed plan identifies its model by a checkpoint fingerprint, an in-memory one by a content hash."""
    return {**plan, "identity": {k: v for k, v in plan["identity"].items() if k != "fingerprints"}}


def _without_run(value):
    """A run record less what differs between runs (seconds, streamed, statistics_from_cache)."""
    if isinstance(value, dict):
        return {k: _without_run(v) for k, v in value.items() if k not in ("seconds", "streamed", "statistics_from_cache")}
    if isinstance(value, list):
        return [_without_run(v) for v in value]
    return value


def _fit_both(source: Path, tmp_path: Path, share: float, monkeypatch, method: str = "reap", calib: mc.CalibrationSpec = TINY_CALIB,
              options: dict | None = None) -> dict:
    """In memory and streamed; the in-memory race never stops a candidate (`RACE_Z` infinite), as the streamed walk,
    which measures every candidate on every window in one read of the layers, does not race."""
    budget = int(checkpoint_sizes(source).total * share)
    results = {}
    for streaming in (False, True):
        with monkeypatch.context() as patch:
            patch.setattr("moe_compress.fitting.race.RACE_Z", math.inf)
            if streaming:
                patch.setattr("moe_compress.source.load.load_model", _never)
            results[streaming] = mc.fit(str(source), memory=budget, calib=calib, out=tmp_path / str(streaming), windows=2, seq_len=32,
                                        streaming=streaming, cache_dir=False, method=method, method_options=options)
    return results


@pytest.mark.parametrize("family, share, kinds, method, options", [
    ("mixtral", 0.4, ["prune", "quantize"], "reap", None), ("deepseek_v3", 0.72, ["quantize"], "reap", None),
    ("mixtral", 0.7, ["quantize"], "reap", None), ("mixtral", 0.355, ["prune", "drop", "quantize"], "reap", None),
    ("mixtral", 0.4, ["prune", "drop", "quantize"], "mone", None), ("mixtral", 0.4, ["prune", "quantize"], "reap", {"renormalize": False})])
def test_streamed_fit_chooses_measures_and_writes_as_in_memory(family, share, kinds, method, options, tmp_path, monkeypatch):
    """Same candidates, same KL / top-1 / perplexities (to 1e-6), same choice, and the same bytes for every tensor,
    config, tokenizer, card, provenance and fit report; the plans alike but for the fingerprint, the run records but
    for times and the streamed flag. MoNE (calibrated on two batches: its running variance needs them) writes novices."""
    source = save_tiny_checkpoint(tmp_path / "source", family)
    results = _fit_both(source, tmp_path, share, monkeypatch, method, TINY_CALIB if method == "reap" else mc.CalibrationSpec(samples=4, seq_len=32, batch_size=2),
                        options)
    memory, streamed = results[False], results[True]
    assert [c.name for c in streamed.candidates] == [c.name for c in memory.candidates] and len(memory.candidates) >= 2
    for mine, theirs in zip(streamed.candidates, memory.candidates):
        assert mine.measured == pytest.approx(theirs.measured, rel=1e-6, abs=1e-9), mine.name
    assert streamed.best.name == memory.best.name and [s.kind for s in streamed.best.stages] == kinds
    assert streamed.best.measured["kl"] > 0 and "reference" not in streamed.seconds  # measured in the candidates' walk
    a, b = tmp_path / "False", tmp_path / "True"
    _same_outputs(a, b)
    assert tensor_bytes(b) == streamed.best.bytes <= streamed.weight_budget
    if method == "mone":
        assert any(entry["action"] == "novices" and len(entry["keep"]) < entry["num_experts"]
                   for entry in json.loads((b / "plans" / "01-prune.json").read_text())["layers"])
    if options:  # the method's options reach the prune stage both paths wrote with, and its plan
        assert dict(streamed.best.stages[0].options) == options == dict(memory.best.stages[0].options)
        assert '"renormalize": false' in (b / "plans" / "01-prune.json").read_text()


def _same_outputs(a: Path, b: Path) -> None:
    """The same files, byte for byte; the plans but for the fingerprint, the run records but for times and the streamed flag."""
    names = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    assert names == sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file())
    for name in names:
        if name.startswith("plans/") and name.endswith(".json"):  # a plan's tensors beside it (novices) compare as bytes
            assert _without_fingerprint(json.loads((a / name).read_text())) == _without_fingerprint(json.loads((b / name).read_text()))
        elif name in RUN_RECORDS:
            assert _without_run(json.loads((a / name).read_text())) == _without_run(json.loads((b / name).read_text())), name
        else:
            assert filecmp.cmp(a / name, b / name, shallow=False), f"{name} differs"


@pytest.mark.parametrize("family, share", [("mixtral", 0.45), ("deepseek_v3", 0.6)])
def test_a_fit_that_drops_a_block_streams_as_in_memory_and_reloads_in_plain_transformers(family, share, tmp_path, monkeypatch):
    """The first MoE layer's block priced free to drop (every candidate of the search drops it), single methods left out,
    one width per candidate (no generated code): streamed and in memory measure and write the same, the written bytes are
    the prediction, and plain transformers loads the result with one decoder layer fewer (DeepSeek: shared experts,
    which MoE drop cannot remove, go with the block)."""
    source = save_tiny_checkpoint(tmp_path / "source", family)
    sizes = checkpoint_sizes(source)
    first = min(sizes.layers)
    monkeypatch.setattr(LayerProxy, "block_cost", lambda self: 0.0 if self.layer == first else 10.0)
    monkeypatch.setattr(search, "single_methods", lambda *args: [])
    monkeypatch.setattr(search, "PER_LAYER_BITS", False)
    monkeypatch.setattr(search, "other_widths", lambda sizes: (16,))
    monkeypatch.setattr(fit_choices, "PER_EXPERT_BITS", False)
    results = _fit_both(source, tmp_path, share, monkeypatch)
    memory, streamed = results[False], results[True]
    assert [c.name for c in streamed.candidates] == [c.name for c in memory.candidates]
    for mine, theirs in zip(streamed.candidates, memory.candidates):
        assert mine.dropped_blocks == theirs.dropped_blocks and mine.measured == pytest.approx(theirs.measured, rel=1e-6, abs=1e-9), mine.name
    assert streamed.best.name == memory.best.name and ("drop", {"unit": "block", "layers": [first]}) in [(s.kind, s.given()) for s in streamed.best.stages]
    _same_outputs(tmp_path / "False", tmp_path / "True")
    assert tensor_bytes(tmp_path / "True") == streamed.best.bytes == search.predicted_bytes(streamed.best.stages, sizes) <= streamed.weight_budget
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "True")
    assert reloaded.config.num_hidden_layers == len(sizes.blocks) - 1
    report = json.loads((tmp_path / "True" / "fit_report.json").read_text())
    chosen = next(c for c in report["candidates"] if c["name"] == report["chosen"])
    assert chosen["allocation"][str(first)] == {"keep": 0, "bits": 0, "dropped": "whole block"}
    assert f"| {first} | 0 | 0 | whole block |" in (tmp_path / "True" / "README.md").read_text()


def test_streamed_other_costs_are_the_in_memory_sums(tmp_path):
    """The attention rounding costs, each layer's weights read in turn: the same floats."""
    source = save_tiny_checkpoint(tmp_path / "source", "mixtral")
    group = checkpoint_sizes(source).group_size
    assert checkpoint_sizes(source).others  # fit prices the other weights of this model
    model, _ = load_model(str(source))
    weights, _ = load_streamed(str(source))
    expected = other_costs(model, get_adapter(model), group)
    assert streamed_other_costs(weights, get_adapter(weights.model), group, "cpu") == expected and expected[4] > expected[8] > 0


def test_a_streamed_fit_within_budget_writes_the_original_as_in_memory(tmp_path, monkeypatch):
    source = save_tiny_checkpoint(tmp_path / "source", "mixtral")
    mc.fit(str(source), target_ratio=1.0, calib=TINY_CALIB, out=tmp_path / "memory", streaming=False)
    monkeypatch.setattr("moe_compress.source.load.load_model", _never)
    result = mc.fit(str(source), target_ratio=1.0, calib=TINY_CALIB, out=tmp_path / "out", streaming=True)
    assert result.unchanged and result.best is None
    for name in ("model.safetensors", "config.json", "fit_report.json"):
        assert filecmp.cmp(tmp_path / "memory" / name, tmp_path / "out" / name, shallow=False), name
    assert json.loads((tmp_path / "out" / "fit_report.json").read_text())["unchanged"] is True


def test_the_fit_command_streams_on_request(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from moe_compress.cli import app

    source = save_tiny_checkpoint(tmp_path / "source", "mixtral")
    monkeypatch.setattr("moe_compress.source.load.load_model", _never)
    budget = int(checkpoint_sizes(source).total * 0.7)
    run = CliRunner().invoke(app, ["fit", str(source), "--memory", f"{budget}B", "--out", str(tmp_path / "out"), "--samples", "4",
                                   "--seq-len", "32", "--eval-windows", "2", "--eval-seq-len", "32", "--streaming", "on"])
    assert run.exit_code == 0, run.output
    assert tensor_bytes(tmp_path / "out") <= budget and "chosen: fit" in run.output
