"""Fidelity metrics: KL divergence to the original's next-token distribution and top-1 agreement."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from helpers import token_batches
from moe_compress import compress
from moe_compress.cli import app
from moe_compress.evaluate.fidelity import compare, fidelity, float_log_softmax
from moe_compress.evaluate.lm_perplexity import perplexity
from tiny_checkpoints import save_tiny_checkpoint, write_calibration
from tiny_models import VOCAB, tiny_model


def test_a_model_against_itself_has_zero_kl_and_full_agreement():
    model = tiny_model("deepseek_v3")
    windows = torch.cat(token_batches(count=2, batch=3, seq_len=12))
    result = fidelity(model, model, windows, batch_size=4)
    assert result.kl == 0.0 and result.top1_agreement == 1.0 and result.tokens == 6 * 11


class _FixedLogits(nn.Module):
    """Returns the same logits at every position, whatever the input."""

    def __init__(self, logits: list[float]):
        super().__init__()
        self.row = nn.Parameter(torch.tensor(logits), requires_grad=False)

    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(logits=self.row.expand(*input_ids.shape, -1))


def test_kl_and_agreement_match_hand_computed_values():
    original, compressed = _FixedLogits([0.0, 0.0, math.log(2.0)]), _FixedLogits([0.0, math.log(3.0), 0.0])
    p, q = [0.25, 0.25, 0.5], [0.2, 0.6, 0.2]
    expected = sum(a * math.log(a / b) for a, b in zip(p, q))
    result = fidelity(compressed, original, torch.zeros(2, 5, dtype=torch.long))
    assert result.tokens == 8 and math.isclose(result.kl, expected, rel_tol=1e-6)
    assert result.top1_agreement == 0.0  # argmax 2 vs argmax 1 everywhere
    agreeing = fidelity(_FixedLogits([0.0, 0.0, 3.0]), original, torch.zeros(1, 3, dtype=torch.long))
    assert agreeing.top1_agreement == 1.0 and agreeing.kl > 0


def test_eval_compare_reports_fidelity_per_source(tmp_path):
    original = save_tiny_checkpoint(tmp_path / "tiny")
    calib = write_calibration(tmp_path / "text.jsonl")
    from moe_compress import load_model

    model, tokenizer = load_model(original)
    compress(model, method="reap", ratio=0.5, calib=[torch.randint(3, VOCAB, (2, 16))], tokenizer=tokenizer, out=tmp_path / "pruned", cache_dir=False)
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "pruned"), "--ppl", str(calib), "--seq-len", "32", "--max-windows", "3",
                                      "--compare", str(original), "--no-speed", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "KL to original" in result.stdout and "top-1 agreement" in result.stdout
    fidelity_report = json.loads(out.read_text())["fidelity"][str(calib)]
    assert fidelity_report["kl"] > 0 and 0 <= fidelity_report["top1_agreement"] <= 1 and fidelity_report["tokens"] == 3 * 31


def test_streamed_fidelity_equals_in_memory(tmp_path):
    from moe_compress.source.load import load_model, load_streamed

    tiny_model("qwen3_moe").save_pretrained(tmp_path / "original")
    pruned = tiny_model("qwen3_moe")
    compress(pruned, method="reap", ratio=0.5, calib=token_batches(), out=tmp_path / "pruned", cache_dir=False)
    windows = torch.cat(token_batches(count=3, batch=2, seq_len=10))
    in_memory = fidelity(load_model(tmp_path / "pruned")[0], load_model(tmp_path / "original")[0], windows, batch_size=2)
    mine, theirs = load_streamed(tmp_path / "pruned")[0], load_streamed(tmp_path / "original")[0]
    streamed = fidelity(mine.model, theirs.model, windows, batch_size=2, weights=mine, original_weights=theirs, chunk_bytes=3 * 20 * VOCAB * 4)
    assert streamed.tokens == in_memory.tokens == 6 * 9
    assert streamed.kl == pytest.approx(in_memory.kl, rel=1e-5) and streamed.top1_agreement == in_memory.top1_agreement


def test_compare_gives_both_perplexities_from_one_forward_per_batch_and_model(tmp_path):
    """`eval --compare` reads perplexity off the fidelity pass: each model runs once per batch, not twice."""
    from moe_compress.source.load import load_model

    tiny_model("qwen3_moe").save_pretrained(tmp_path / "original")
    compress(tiny_model("qwen3_moe"), method="reap", ratio=0.5, calib=token_batches(), out=tmp_path / "pruned", cache_dir=False)
    mine, theirs = load_model(tmp_path / "pruned")[0], load_model(tmp_path / "original")[0]
    windows = torch.cat(token_batches(count=3, batch=2, seq_len=10))
    calls = {"mine": 0, "theirs": 0}
    for name, model in (("mine", mine), ("theirs", theirs)):
        model.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    measured, mine_ppl, theirs_ppl = compare(mine, theirs, windows, batch_size=4)
    assert calls == {"mine": 2, "theirs": 2}  # 6 windows in batches of 4
    assert measured == fidelity(mine, theirs, windows, batch_size=4)
    for model, result in ((mine, mine_ppl), (theirs, theirs_ppl)):
        alone = perplexity(model, windows, batch_size=4)
        assert (result.tokens, result.windows) == (alone.tokens, alone.windows) == (6 * 9, 6)
        assert result.perplexity == pytest.approx(alone.perplexity, rel=1e-6) and result.perplexity != pytest.approx(1.0)
    assert mine_ppl.perplexity != pytest.approx(theirs_ppl.perplexity, rel=1e-6)


def test_position_blocks_take_whole_windows_while_one_fits_else_parts_of_one():
    from moe_compress.evaluate.fidelity import position_blocks

    whole = slice(None)
    assert position_blocks(3, 9, 10, 3 * 9 * 10 * 4) == [(slice(0, 3), whole)]  # the batch fits: one block, as unblocked
    assert position_blocks(5, 9, 10, 2 * 9 * 10 * 4 + 4) == [(slice(0, 2), whole), (slice(2, 4), whole), (slice(4, 6), whole)]
    assert position_blocks(2, 9, 10, 4 * 10 * 4) == [(slice(w, w + 1), slice(p, p + 4)) for w in (0, 1) for p in (0, 4, 8)]
    assert position_blocks(1, 3, 10, 1) == [(slice(0, 1), slice(p, p + 1)) for p in range(3)]  # one position at least


def _saved_pair(tmp_path):
    """A tiny Qwen3-MoE checkpoint and its REAP-pruned copy (half the experts), saved."""
    tiny_model("qwen3_moe").save_pretrained(tmp_path / "original")
    compress(tiny_model("qwen3_moe"), method="reap", ratio=0.5, calib=token_batches(), out=tmp_path / "pruned", cache_dir=False)
    return tmp_path / "pruned", tmp_path / "original"


def _recorded_blocks(monkeypatch) -> list[int]:
    """Bytes of the larger side's log-probabilities of every block `FidelityTotals.add` receives."""
    from moe_compress.evaluate.fidelity import FidelityTotals

    sizes, add = [], FidelityTotals.add

    def recording(self, mine, reference, targets=None, consume=False):
        sizes.append(max(t.numel() * t.element_size() for t in (mine, reference)))
        add(self, mine, reference, targets, consume)

    monkeypatch.setattr(FidelityTotals, "add", recording)
    return sizes


def test_log_probabilities_in_blocks_within_the_budget_give_the_unblocked_numbers(tmp_path, monkeypatch):
    from moe_compress.source.load import load_model

    pruned, original = _saved_pair(tmp_path)
    mine, theirs = load_model(pruned)[0], load_model(original)[0]
    windows = torch.cat(token_batches(count=3, batch=2, seq_len=10))
    whole = compare(mine, theirs, windows, batch_size=4)
    sizes = _recorded_blocks(monkeypatch)
    for budget, blocks in ((9 * VOCAB * 4, 6), (4 * VOCAB * 4, 6 * 3)):  # one window per block; 4 positions of one (4 + 4 + 1)
        sizes.clear()
        blocked = compare(mine, theirs, windows, batch_size=4, chunk_bytes=budget)
        assert len(sizes) == blocks and max(sizes) <= budget
        assert blocked[0].tokens == whole[0].tokens == 6 * 9 and blocked[0].top1_agreement == whole[0].top1_agreement
        assert blocked[0].kl == pytest.approx(whole[0].kl, rel=1e-6) and whole[0].kl > 0
        for ours, unblocked in zip(blocked[1:], whole[1:]):
            assert ours.perplexity == pytest.approx(unblocked.perplexity, rel=1e-6)


def test_a_streamed_comparison_reads_each_checkpoint_once_whatever_the_batches(tmp_path, monkeypatch):
    """Three batches whose log-probabilities exceed the budget: each layer and the stem of each checkpoint are still read
    once (a walk per model, then both stems), the head once for both (the prune left it as it was), and the numbers are
    the in-memory ones."""
    from moe_compress.source.load import load_model, load_streamed
    from moe_compress.source.residency import StreamedWeights

    pruned, original = _saved_pair(tmp_path)
    windows = torch.cat(token_batches(count=3, batch=2, seq_len=10))
    in_memory = compare(load_model(pruned)[0], load_model(original)[0], windows, batch_size=2)
    mine, theirs = load_streamed(pruned)[0], load_streamed(original)[0]
    reads: dict[int, list[list[str]]] = {id(mine): [], id(theirs): []}
    materialize = StreamedWeights.materialize

    def counting(self, names, device="cpu", lookups=None):
        reads[id(self)].append(list(names))
        materialize(self, names, device, lookups)

    monkeypatch.setattr(StreamedWeights, "materialize", counting)
    sizes = _recorded_blocks(monkeypatch)
    budget = 4 * VOCAB * 4  # 4 positions: a batch of 2 x 9 is 6 blocks
    streamed = compare(mine.model, theirs.model, windows, batch_size=2, weights=mine, original_weights=theirs, chunk_bytes=budget)
    for weights in (mine, theirs):
        layers = len(weights.model.model.layers)
        read = reads[id(weights)]
        assert len(read) == 1 + layers + 1  # stem (the walk), each decoder layer, stem and head (the logits)
        for index in range(layers):
            assert sum(any(n.startswith(f"model.layers.{index}.") for n in names) for names in read) == 1
        assert sum("lm_head.weight" in names for names in read) == (weights is theirs)  # the pruned copy's is the original's
    assert len(sizes) == 3 * 2 * 3 and max(sizes) <= budget
    assert streamed[0].tokens == in_memory[0].tokens == 6 * 9 and streamed[0].top1_agreement == in_memory[0].top1_agreement
    assert streamed[0].kl == pytest.approx(in_memory[0].kl, rel=1e-5)
    for ours, unstreamed in zip(streamed[1:], in_memory[1:]):
        assert ours.perplexity == pytest.approx(unstreamed.perplexity, rel=1e-5)


def test_float_log_softmax_gives_the_floats_of_converting_first():
    """Converting inside `log_softmax` must not change a bit of what every KL and perplexity is built from."""
    torch.manual_seed(0)
    logits = (torch.randn(3, 17, 1000) * 4).to(torch.bfloat16)
    for view in (logits, logits[:, :-1], logits[:, :-1][:, 3:9]):
        assert torch.equal(float_log_softmax(view), torch.nn.functional.log_softmax(view.float(), dim=-1))
