"""quantize --method autoround --calibrate-all-experts: an expert calibration never reaches is tuned, not rounded to nearest."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from moe_compress import MoECompressError, get_adapter, load_model, quantize
from moe_compress.cli import app
from moe_compress.evaluate.fidelity import FidelityResult
from moe_compress.evaluate.guard import GuardReport
from moe_compress.slimming import autoround as autoround_module
from moe_compress.slimming.autoround_experts import experts_to_route, tune_every_expert
from moe_compress.stages.registry import stages
from moe_compress.walk.all_experts import even_routing, routed_evenly
from test_autoround import _autoround_rtn
from tiny_checkpoints import save_tiny_checkpoint, tiny_tokenizer, write_calibration
from tiny_models import tiny_model

DEAD = 7  # layer 1's expert the router never picks


def _checkpoint(directory):
    """A tiny deepseek_v3 (widths AutoRound tunes: multiples of 32) whose layer 1 never routes a token to expert DEAD."""
    tokenizer = tiny_tokenizer()
    model = tiny_model("deepseek_v3", num_layers=2, hidden_size=64, intermediate_size=64, moe_intermediate_size=64, kv_lora_rank=32,
                       vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=0, eos_token_id=0)
    adapter = get_adapter(model)
    with torch.no_grad():
        adapter.router(adapter.moe_block(model.model.layers[1])).e_score_correction_bias[DEAD] = -1e4  # selection only, not the weights
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model, adapter


def _rounded_to_nearest(experts, loaded, expert: int) -> list[bool]:
    return [torch.allclose(getattr(loaded, name)[expert], _autoround_rtn(getattr(experts, name)[expert].detach(), 32), rtol=0, atol=1e-6)
            for name in ("gate_up_proj", "down_proj")]


def test_an_unreached_expert_is_named_and_rounded_to_nearest_and_with_calibrate_all_experts_it_is_tuned(tmp_path, monkeypatch):
    model, adapter = _checkpoint(tmp_path / "tiny")
    calib = write_calibration(tmp_path / "calib.jsonl", documents=60)
    args = ["quantize", str(tmp_path / "tiny"), "--method", "autoround", "--bits", "4", "--group-size", "32", "--scope", "experts",
            "--iters", "30", "--calib", str(calib), "--samples", "4", "--seq-len", "32", "--batch-size", "2", "--guard-min-top1", "0"]
    runner = CliRunner()
    experts = adapter.experts(adapter.moe_block(model.model.layers[1]))

    plain = runner.invoke(app, [*args, "--out", str(tmp_path / "plain")])
    assert plain.exit_code == 2, plain.output
    summary = json.loads((tmp_path / "plain" / "moe_compress_summary.json").read_text())
    assert f"1:{DEAD}" in summary["unreached_experts"] and summary["guard"]["unreached_experts"] == summary["unreached_experts"]
    message = " ".join(plain.output.split())
    assert f"1:{DEAD}" in message and "route calibration to every expert (--calibrate-all-experts)" in message
    loaded = adapter.experts(adapter.moe_block(load_model(tmp_path / "plain")[0].model.layers[1]))
    assert _rounded_to_nearest(experts, loaded, DEAD) == [True, True]  # no gradient: AutoRound's starting point
    assert _rounded_to_nearest(experts, loaded, 0) == [False, False]

    captured = []
    tune = autoround_module.autoround
    monkeypatch.setattr(autoround_module, "autoround", lambda *a, **k: captured.append(tune(*a, **k)) or captured[-1])
    routed = runner.invoke(app, [*args, "--out", str(tmp_path / "all"), "--calibrate-all-experts"])
    assert routed.exit_code == 0, routed.output
    summary = json.loads((tmp_path / "all" / "moe_compress_summary.json").read_text())
    assert summary["unreached_experts"] == [] and summary["guard"]["unreached_experts"] == [] and summary["guard"]["passed"]
    assert summary["calibrate_all_experts"] is True and summary["autoround"]["routed_to_every_expert"] == 1  # layer 1's MoE block
    reloaded = load_model(tmp_path / "all")[0]
    loaded = adapter.experts(adapter.moe_block(reloaded.model.layers[1]))
    assert _rounded_to_nearest(experts, loaded, DEAD) == [False, False]  # it received gradient
    torch.testing.assert_close(adapter.router(adapter.moe_block(reloaded.model.layers[1])).e_score_correction_bias,
                               adapter.router(adapter.moe_block(model.model.layers[1])).e_score_correction_bias)  # the routing saved is the model's

    # the checkpoint reloads to the in-memory quantised model: the original with AutoRound's rounded values
    (rounded, _), = captured
    in_memory = load_model(tmp_path / "tiny")[0]
    with torch.no_grad():
        for name, value in rounded.items():
            in_memory.get_parameter(name).copy_(value.value)
    tokens = torch.randint(3, len(tiny_tokenizer()), (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens).logits, in_memory(tokens).logits, rtol=1e-5, atol=1e-5)


def test_round_to_nearest_refuses_calibrate_all_experts(tmp_path):
    checkpoint = save_tiny_checkpoint(tmp_path / "tiny")
    refused = CliRunner().invoke(app, ["quantize", str(checkpoint), "--calibrate-all-experts", "--out", str(tmp_path / "q")])
    assert refused.exit_code == 2
    assert refused.output.strip().splitlines()[-1] == (
        "error: --calibrate-all-experts needs calibration, and --method rtn reads no data; use --method autoround.")
    assert not (tmp_path / "q").exists()
    with pytest.raises(MoECompressError, match=r"^calibrate_all_experts needs calibration, and method rtn reads no data; use method autoround\.$"):
        quantize(tiny_model("mixtral", num_layers=1), tmp_path / "p", calibrate_all_experts=True)


def test_even_routing_gives_every_expert_an_equal_share_of_the_routed_weight():
    every, weights = even_routing(torch.tensor([[2, 0], [1, 3]]), torch.tensor([[0.75, 0.25], [0.5, 2.0]]), 4)
    assert every.tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]
    assert weights.tolist() == [[0.25] * 4, [0.625] * 4]


class _Quantizer:
    """AutoRound's block quantizer as `tune_every_expert` sees it: records the output it tunes on and its target."""

    def __init__(self):
        self.seen = {}

    def quantize_block(self, block, inputs, input_others, target, *rest, **kwargs):
        self.seen.update(tuned=block(inputs), target=target)


class _Composer:
    """AutoRound's per-block pipeline, reduced to its calls: target, tuning, then the block's outputs for the next block."""

    def __init__(self):
        self.block_quantizer = _Quantizer()
        self.block_forward = lambda block, inputs, input_others: block(inputs)

    def compress_block(self, block, fp_inputs, input_others, block_ctx, q_inputs=None, input_ids=None, reference_output=None):
        self.block_quantizer.quantize_block(block, fp_inputs, input_others, reference_output)
        return self.block_forward(block, fp_inputs, input_others), reference_output


class _Runner:
    def __init__(self):
        self.alg_composer = _Composer()

    def post_init(self):
        pass


def test_a_block_is_tuned_evenly_routed_and_hands_on_its_output_under_the_models_routing():
    model = tiny_model("mixtral", num_layers=1).eval()
    adapter = get_adapter(model)
    block = adapter.moe_block(model.model.layers[0])
    hidden = torch.randn(1, 6, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        native = block(hidden)
        with routed_evenly([(adapter.experts(block), 8)]):
            even = block(hidden)
        experts = adapter.experts(block)
        flat = hidden.reshape(-1, hidden.shape[-1])
        each = [experts(flat, torch.full((6, 1), e), torch.ones(6, 1)) for e in range(8)]
    torch.testing.assert_close(even.reshape(-1, flat.shape[-1]), sum(each) / 8)  # mixtral's routed weights sum to 1
    assert not torch.allclose(even, native, atol=1e-3)

    runner = _Runner()
    tune_every_expert(runner, model, experts_to_route(model))
    with torch.no_grad():
        quantized, next_input = runner.alg_composer.compress_block(model.model.layers[0].mlp, hidden, {}, None)
    seen = runner.alg_composer.block_quantizer.seen
    torch.testing.assert_close(seen["target"], even)  # the full-precision target, evenly routed
    torch.testing.assert_close(seen["tuned"], even)  # ... and the block being tuned
    torch.testing.assert_close(quantized, native)  # what the next block reads: the model's own routing
    torch.testing.assert_close(next_input, native)


def test_the_stages_that_take_calibrate_all_experts_say_so_and_the_guard_offers_it_for_them():
    routes = [kind for kind, stage in stages().items() if stage.routes_all_experts]
    assert routes == ["slim", "quantize"]
    assert all("calibrate_all_experts" in stages()[kind].model_fields for kind in routes)
    unreached = dict(stage="quantize", fidelity=FidelityResult(0.01, 0.95, 64), windows=2, seq_len=32, min_top1=0.9, layer_errors=None,
                     unreached=((1, 7),))
    assert "route calibration to every expert (calibrate_all_experts), or allow" in GuardReport(**unreached, routes_all=True).to_dict()["failure"]
    assert "route calibration" not in GuardReport(**unreached).to_dict()["failure"]
