"""AutoRound quantisation: reloads, beats round-to-nearest, and rounds unrouted experts to nearest."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import token_batches
from moe_compress import MoECompressError, get_adapter, load_model, quantize
from tiny_checkpoints import tiny_tokenizer
from tiny_models import VOCAB, tiny_model

# AutoRound's int kernels need every quantised dimension divisible by 32.
WIDE = dict(hidden_size=64, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
CALIB = token_batches(count=4, batch=2, seq_len=32)
HELD_OUT = torch.randint(3, VOCAB, (4, 32), generator=torch.Generator().manual_seed(11))


def _relative_error(reloaded, original) -> float:
    with torch.no_grad():
        want = original(HELD_OUT).logits
        return float((reloaded(HELD_OUT).logits - want).norm() / want.norm())


def test_autoround_4bit_reloads_and_beats_round_to_nearest(tmp_path):
    model = tiny_model("mixtral", num_layers=1, **WIDE)
    rtn = quantize(model, tmp_path / "rtn", bits=4, group_size=32)
    tuned = quantize(model, tmp_path / "ar", bits=4, group_size=32, method="autoround", calib=CALIB, tokenizer=tiny_tokenizer(), iters=30)
    summary = tuned.summary
    assert summary["method"] == "autoround" and summary["autoround"]["tuned_matrices"] == 4 + 3 * 8  # attention + every expert projection
    assert summary["autoround"]["left_to_round_to_nearest"] == [] and summary["calibrated_keys"] == 4 + 3 * 8
    config = json.loads((tmp_path / "ar" / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized" and config["config_groups"]["group_0"]["weights"]["num_bits"] == 4
    assert tuned.summary["checkpoint_bytes"] == rtn.summary["checkpoint_bytes"]  # same format, same size
    ar_error = _relative_error(load_model(tmp_path / "ar")[0], model)
    rtn_error = _relative_error(load_model(tmp_path / "rtn")[0], model)
    print(f"\nrelative logit error on held-out tokens: AutoRound {ar_error:.4f}, round-to-nearest {rtn_error:.4f}")
    assert ar_error < rtn_error


def _autoround_rtn(weight: torch.Tensor, group: int) -> torch.Tensor:
    """AutoRound's starting point for 4 bits, written out: symmetric full range [-8, 7], fp16 scales."""
    grouped = weight.unflatten(-1, (-1, group))
    low, high = grouped.amin(-1).clamp(max=0), grouped.amax(-1).clamp(min=0)
    peak = torch.where(high < -low, -low, -high)  # the larger magnitude; negative when the maximum wins, so -8 * scale reaches it
    scale = (peak / 8).half().float().unsqueeze(-1)
    return (torch.clamp(torch.round(grouped / scale), -8, 7) * scale).flatten(-2)


def test_an_expert_calibration_never_reaches_is_rounded_to_nearest(tmp_path):
    model = tiny_model("deepseek_v3", num_layers=2, hidden_size=64, intermediate_size=64, moe_intermediate_size=64, kv_lora_rank=32)
    adapter = get_adapter(model)
    block = adapter.moe_block(model.model.layers[1])
    with torch.no_grad():
        adapter.router(block).e_score_correction_bias[7] = -1e4  # expert 7 is never selected
    quantize(model, tmp_path / "ar", bits=4, group_size=32, scope="experts", method="autoround", calib=CALIB, tokenizer=tiny_tokenizer(), iters=30)
    reloaded, _ = load_model(tmp_path / "ar")
    assert "1:7" in json.loads((tmp_path / "ar" / "moe_compress_summary.json").read_text())["unreached_experts"]  # named for the guard
    experts, loaded = adapter.experts(block), adapter.experts(adapter.moe_block(reloaded.model.layers[1]))
    for name in ("gate_up_proj", "down_proj"):
        torch.testing.assert_close(getattr(loaded, name)[7], _autoround_rtn(getattr(experts, name)[7].detach(), 32), rtol=0, atol=1e-6)
    tuned = [e for e in range(7) if not torch.allclose(loaded.down_proj[e], _autoround_rtn(experts.down_proj[e].detach(), 32), atol=1e-6)]
    assert tuned, "routed experts move away from round-to-nearest"


def test_autoround_input_errors(tmp_path):
    model = tiny_model("mixtral", num_layers=1, **WIDE)
    with pytest.raises(MoECompressError, match="tokenizer"):
        quantize(model, tmp_path / "a", method="autoround", calib=CALIB, group_size=32)
    with pytest.raises(MoECompressError, match="needs a group size"):
        quantize(model, tmp_path / "b", method="autoround", calib=CALIB, group_size=0, tokenizer=tiny_tokenizer())
    assert not list(tmp_path.iterdir())


def test_cli_autoround_rounds_what_it_cannot_tune_to_nearest(tmp_path):
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from moe_compress.cli import app
    from tiny_checkpoints import save_tiny_checkpoint, write_calibration

    checkpoint = save_tiny_checkpoint(tmp_path / "tiny")  # widths 32 and 16: the experts are not AutoRound-shaped
    calib = write_calibration(tmp_path / "calib.jsonl")
    common = ["--bits", "8", "--group-size", "16", "--scope", "experts"]
    tuned = CliRunner().invoke(app, ["quantize", str(checkpoint), "--method", "autoround", "--iters", "2", "--calib", str(calib),
                                     "--samples", "4", "--seq-len", "32", "--batch-size", "2", *common, "--out", str(tmp_path / "ar")])
    assert tuned.exit_code == 0, tuned.output
    plain = CliRunner().invoke(app, ["quantize", str(checkpoint), *common, "--out", str(tmp_path / "rtn")])
    assert plain.exit_code == 0, plain.output
    summary = json.loads((tmp_path / "ar" / "moe_compress_summary.json").read_text())
    assert summary["autoround"]["tuned_matrices"] == 0 and len(summary["autoround"]["left_to_round_to_nearest"]) == 3 * 8 * 3
    ar, rtn = load_file(str(tmp_path / "ar" / "model.safetensors")), load_file(str(tmp_path / "rtn" / "model.safetensors"))
    assert ar.keys() == rtn.keys() and all(torch.equal(ar[k], rtn[k]) for k in ar)
    bad = CliRunner().invoke(app, ["quantize", str(checkpoint), "--method", "gptq", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "--method must be one of" in bad.output


def test_autoround_packs_a_fused_expert_family_per_expert(tmp_path):
    """granitemoe fuses experts on disk: AutoRound's per-expert rounding is written one packed weight per expert."""
    from moe_compress.slimming.quantize import PER_EXPERT_STORAGE

    model = tiny_model("granitemoe", num_layers=1, **WIDE)
    summary = quantize(model, tmp_path / "ar", bits=4, group_size=32, scope="experts", method="autoround", calib=CALIB,
                       tokenizer=tiny_tokenizer(), iters=2).summary
    assert summary["experts_storage"] == PER_EXPERT_STORAGE and summary["calibrated_keys"] == 8 * 2  # every expert's two projections
    reloaded, _ = load_model(tmp_path / "ar")
    assert type(reloaded).__name__ == "MoECompressPerExpertGraniteMoeForCausalLM"
    assert _relative_error(reloaded, model) < 0.2
