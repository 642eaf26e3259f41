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
from moe_compress.evaluate.fidelity import compare, fidelity
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
