"""fit's per-expert widths: the table's entries on hand-made sizes and proxies, the expert numbers the quantize stage is
given after the prune stage renumbered the kept experts, and a fit that spends its slack on them end to end."""

from __future__ import annotations

import filecmp
import json
import math
from pathlib import Path

import pytest
import torch

import moe_compress as mc
from helpers import tensor_bytes
from moe_compress.arch.registry import get_adapter
from moe_compress.engine.prepare import calibration_batches
from moe_compress.fitting import choices as fit_choices, search
from moe_compress.fitting.fit_method import FitMethod
from moe_compress.fitting.measure import build
from moe_compress.fitting.proxies import LayerProxy
from moe_compress.fitting.search import Choice
from moe_compress.source.load import load_model
from moe_compress.stages.sizes import CheckpointSizes, LayerSizes, candidate_bytes, checkpoint_sizes
from moe_compress.walk.rounding import round_to_nearest
from tiny_checkpoints import save_tiny_checkpoint

TINY_CALIB = mc.CalibrationSpec(samples=4, seq_len=32)


def _sizes() -> CheckpointSizes:
    """One MoE layer of 4 experts of 100 / 50 / 25 bytes at 16 / 8 / 4 bits, 2 router bytes per expert and 3 fixed, in 1000 bytes."""
    return CheckpointSizes(1000, 16, {0: LayerSizes(0, 4, {16: 100, 8: 50, 4: 25}, 2, 3)}, {0: 1000})


def _proxy() -> LayerProxy:
    """Each expert's energy 1; rounding errors R_e(8) = .01 .02 .03 .04 and R_e(4) = .1 .3 .2 .4; at 2 kept, experts 1 and 3."""
    f = lambda *values: torch.tensor(values, dtype=torch.float64)  # noqa: E731
    return LayerProxy(0, f(1, 1, 1, 1), {16: f(0, 0, 0, 0), 8: f(.01, .02, .03, .04), 4: f(.1, .3, .2, .4)}, {4: [0, 1, 2, 3], 2: [1, 3]})


def test_per_expert_widths_are_table_entries_with_exact_bytes_and_costs():
    """After the whole-layer choices, per kept count and width, the m = 1, 2, ... (below the count) experts of largest
    gain R_e(b) - R_e(b') raised to each wider b', numbered by their place among the kept; bytes and costs by hand."""
    choices = fit_choices.layer_choices(_sizes(), {0: [4, 2]}, (16, 8, 4), {0: _proxy()})[0]
    # gains at 4 kept, 8 -> 16: .01 .02 .03 .04; 4 -> 16: .1 .3 .2 .4; 4 -> 8: .09 .28 .17 .36. At 2 kept (experts 1, 3): .02 .04; .3 .4; .28 .36
    assert [c.label for c in choices] == ["4x16b", "2x16b", "4x8b", "2x8b", "4x4b", "2x4b",
                                          "4x8b+1x16b", "4x8b+2x16b", "2x8b+1x16b",
                                          "4x4b+1x16b", "4x4b+2x16b", "4x4b+1x8b", "4x4b+2x8b", "2x4b+1x16b", "2x4b+1x8b"]
    assert [c.wider for c in choices[6:]] == [(3,), (2, 3), (1,), (3,), (1, 3), (3,), (1, 3), (1,), (1,)]
    rows = fit_choices.table(_sizes(), {0: choices}, {0: _proxy()})[0]
    by_label = {row.label: row for row in rows}
    # 4 kept at 4 bits, experts 1 and 3 at 8: 2 x 25 + 2 x 50 bytes, 4 x 2 + 3 of router; (.1 + .2 + .02 + .04) / 4
    assert by_label["4x4b+2x8b"].bytes == 161 and by_label["4x4b+2x8b"].cost == pytest.approx(0.09, abs=1e-15)
    # 2 kept (experts 0 and 2 removed: energy 2) at 4 bits, expert 3 (place 1) at 8: 25 + 50 + 2 x 2 + 3; (2 + .3 + .04) / 4
    assert by_label["2x4b+1x8b"].bytes == 82 and by_label["2x4b+1x8b"].cost == pytest.approx(0.585, abs=1e-15)
    assert by_label["4x8b+1x16b"].bytes == 3 * 50 + 100 + 11 and by_label["4x8b+1x16b"].cost == pytest.approx(0.06 / 4, abs=1e-15)
    assert all(row.bytes == candidate_bytes(_sizes().layers[0], c.keep, {c.bits: c.keep - len(c.wider), c.to: len(c.wider)})
               for row, c in zip(rows[6:], choices[6:]))
    # without proxies (a dry run) or per-expert widths off, the whole-layer choices alone
    assert fit_choices.layer_choices(_sizes(), {0: [4, 2]}, (16, 8, 4))[0] == choices[:6]


def test_the_quantize_stage_is_given_the_experts_numbered_after_the_prune():
    """Two of 4 experts kept (1 and 3: the prune removes 0 and 2, below each), expert 3 raised to 8 bits: after the prune it
    is expert 1, the number the quantize stage gets; the stages' prediction is the table's bytes, and the report says it."""
    sizes, proxies = _sizes(), {0: _proxy()}
    rows = fit_choices.table(sizes, fit_choices.layer_choices(sizes, {0: [4, 2]}, (16, 8, 4), proxies), proxies)[0]
    choice = next(c for c in fit_choices.layer_choices(sizes, {0: [4, 2]}, (16, 8, 4), proxies)[0] if c.label == "2x4b+1x8b")
    assert choice == Choice(2, 4, (1,), 8) and proxies[0].kept[2][choice.wider[0]] == 3
    stages = search.stages_for({0: choice}, sizes, FitMethod())
    assert [(s.kind, s.given()) for s in stages] == [("prune", {"method": "reap", "budget": "explicit", "keep": {0: 2}}),
                                                     ("quantize", {"bits": 4, "scope": "experts", "expert_bits": {0: {1: 8}}})]
    assert search.predicted_bytes(stages, sizes) == sizes.fixed + next(r.bytes for r in rows if r.label == choice.label) == 1000 - 411 + 82
    # the commonest width the stage's own: every expert of a layer at another base width is named, not only the raised ones
    three = CheckpointSizes(3000, 16, {i: LayerSizes(i, 4, {16: 100, 8: 50, 4: 25}, 2, 3) for i in (0, 1, 2)}, {i: 1000 for i in (0, 1, 2)})
    mixed = search.stages_for({0: Choice(4, 8), 1: Choice(4, 8), 2: Choice(4, 4, (0, 2), 16)}, three, FitMethod())
    assert [s.given() for s in mixed] == [{"bits": 8, "scope": "experts", "expert_bits": {2: {0: 16, 1: 4, 2: 16, 3: 4}}}]
    assert search.predicted_bytes(mixed, three) == 3000 - 3 * 411 + 2 * (4 * 50 + 11) + (2 * 25 + 2 * 100 + 11)
    others = search.stages_for({0: Choice(4, 8), 1: Choice(4, 4, (3,), 8)}, three, FitMethod(), other_bits=4)
    assert others[-1].given() == {"bits": 4, "scope": "all", "expert_bits": {0: 8, 1: {3: 8}}}
    assert choice.entry() == {"keep": 2, "bits": 4, "raised": "1 at 8 bits: 1"} and Choice(2, 4).entry() == {"keep": 2, "bits": 4}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("fit-experts") / "tiny", "mixtral")


def _slack_budget(sizes: CheckpointSizes) -> int:
    """Every routed expert at 4 bits, plus one expert's 4 -> 8 bit difference: no whole layer can widen, one expert can."""
    layer = sizes.layers[0]
    return sizes.fixed + sum(candidate_bytes(one, one.experts, 4) for one in sizes.layers.values()) + layer.expert_bytes[8] - layer.expert_bytes[4]


def test_a_fit_spends_slack_too_small_for_a_layer_on_single_experts(tiny, tmp_path, monkeypatch):
    """At `_slack_budget` (the other decoder weights kept as stored) fit raises one expert to 8 bits, writes it at the
    predicted bytes -- that expert of the checkpoint the original's rounded at 8 bits -- with the report saying so, and the
    checkpoint reloads with the logits of the candidate measured in memory."""
    monkeypatch.setattr(search, "other_widths", lambda sizes: (16,))
    sizes = checkpoint_sizes(tiny)
    budget = _slack_budget(sizes)
    result = mc.fit(str(tiny), memory=budget, calib=TINY_CALIB, out=tmp_path / "out", windows=2, seq_len=32)
    best = result.best
    raised = {i: c for i, c in best.allocation.items() if c.wider}
    assert len(raised) == 1 and [len(c.wider) for c in raised.values()] == [1] and all(c.to == 8 for c in raised.values())
    (index, choice), = raised.items()
    assert [s.kind for s in best.stages] == ["quantize"] and best.stages[0].expert_bits == {index: {choice.wider[0]: 8}}
    assert tensor_bytes(tmp_path / "out") == best.bytes == best.measured["written_bytes"] <= budget
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["moe_compress"]["expert_bits"][str(index)] == [choice.widths()[e] for e in range(choice.keep)]
    report = json.loads((tmp_path / "out" / "fit_report.json").read_text())
    chosen = next(c for c in report["candidates"] if c["name"] == report["chosen"])
    assert chosen["allocation"][str(index)]["raised"] == f"1 at 8 bits: {choice.wider[0]}"
    assert "experts at a wider width (numbered as written)" in (tmp_path / "out" / "README.md").read_text()

    original, tokenizer = load_model(str(tiny))
    reloaded, _ = load_model(tmp_path / "out")
    adapter = get_adapter(original)
    source = adapter.experts(adapter.moe_block(adapter.decoder_layers(original)[index])).down_proj[choice.wider[0]]
    written = adapter.experts(adapter.moe_block(adapter.decoder_layers(reloaded)[index])).down_proj[choice.wider[0]]
    assert torch.equal(written, round_to_nearest(source, 8, sizes.group_size))
    candidate = build(best, original, tokenizer, calibration_batches(TINY_CALIB, tokenizer, original.config), sizes.group_size, tmp_path / "build")
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(candidate(input_ids=ids).logits, reloaded(input_ids=ids).logits)


def _never(*args, **kwargs):
    raise AssertionError("loaded whole")


def test_a_streamed_fit_measures_and_writes_per_expert_widths_as_in_memory(tiny, tmp_path, monkeypatch):
    """Streamed (one decoder layer read at a time), the same candidates measured alike (the in-memory race never stopping
    one, as the streamed walk does not race), the same per-expert choice, the same tensors and config written."""
    monkeypatch.setattr(search, "other_widths", lambda sizes: (16,))
    monkeypatch.setattr("moe_compress.fitting.race.RACE_Z", math.inf)
    budget = _slack_budget(checkpoint_sizes(tiny))
    results = {}
    for streaming in (False, True):
        with monkeypatch.context() as patch:
            if streaming:
                patch.setattr("moe_compress.source.load.load_model", _never)
            results[streaming] = mc.fit(str(tiny), memory=budget, calib=TINY_CALIB, out=tmp_path / str(streaming), windows=2, seq_len=32,
                                        streaming=streaming, cache_dir=False)
    memory, streamed = results[False], results[True]
    assert [c.name for c in streamed.candidates] == [c.name for c in memory.candidates]
    assert sum(any(c.wider for c in candidate.allocation.values()) for candidate in memory.candidates) >= 1
    for mine, theirs in zip(streamed.candidates, memory.candidates):
        assert mine.measured == pytest.approx(theirs.measured, rel=1e-6, abs=1e-9), mine.name
    assert streamed.best.allocation == memory.best.allocation and any(c.wider for c in streamed.best.allocation.values())
    for name in ("model.safetensors", "config.json"):
        assert filecmp.cmp(tmp_path / "False" / name, tmp_path / "True" / name, shallow=False), name


def test_pruned_then_raised_experts_measure_as_written(tiny, tmp_path):
    """Experts pruned below a raised one (layer 0 keeps 6 of 8, its kept expert numbered 5 after the prune at 8 bits): the
    written checkpoint holds, at 5, the original expert the prune kept at that place rounded at 8 bits, and reloads with the
    logits of the candidate measured in memory (the prune stage run, then the per-expert rounding simulated)."""
    from moe_compress.plan import Plan

    sizes = checkpoint_sizes(tiny)
    allocation = {0: Choice(6, 4, (5,), 8), 1: Choice(8, 4), 2: Choice(8, 4)}
    stages = search.stages_for(allocation, sizes, FitMethod())
    assert [(s.kind, s.given()) for s in stages] == [("prune", {"method": "reap", "budget": "explicit", "keep": {0: 6, 1: 8, 2: 8}}),
                                                     ("quantize", {"bits": 4, "scope": "experts", "expert_bits": {0: {5: 8}}})]
    mc.compress(str(tiny), stages, calib=TINY_CALIB, out=tmp_path / "out", guard=False)
    assert tensor_bytes(tmp_path / "out") == search.predicted_bytes(stages, sizes)
    (plan,) = [Plan.load(path) for path in (tmp_path / "out" / "plans").glob("*prune*.json")]
    kept = sorted(next(lp for lp in plan.layers if lp.layer == 0).keep)
    assert len(kept) == 6 and kept[5] != 5  # the prune removed experts below the raised one
    original, tokenizer = load_model(str(tiny))
    reloaded, _ = load_model(tmp_path / "out")
    adapter = get_adapter(original)

    def experts(model):
        return adapter.experts(adapter.moe_block(adapter.decoder_layers(model)[0]))

    assert torch.equal(experts(reloaded).down_proj[5], round_to_nearest(experts(original).down_proj[kept[5]], 8, sizes.group_size))
    assert torch.equal(experts(reloaded).down_proj[4], round_to_nearest(experts(original).down_proj[kept[4]], 4, sizes.group_size))
    candidate = search.Candidate("raised", allocation, search.predicted_bytes(stages, sizes), 0.0, stages)
    built = build(candidate, original, tokenizer, calibration_batches(TINY_CALIB, tokenizer, original.config), sizes.group_size, tmp_path / "build")
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(built(input_ids=ids).logits, reloaded(input_ids=ids).logits)
