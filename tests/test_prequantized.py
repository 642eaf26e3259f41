"""Pre-quantised inputs (FP8 block-scaled, MXFP4): calibrated dequantised, pruned in their own format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, FineGrainedFP8Config

import moe_compress as mc
from helpers import token_batches
from tiny_models import VOCAB, tiny_model

BLOCK = 128
FP8_MAX = 448.0


def _fp8_block_quantise(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, float32 inverse scale per 128x128 block), as DeepSeek-V3's FP8 checkpoints store them."""
    rows, cols = weight.shape
    scales = torch.zeros(-(-rows // BLOCK), -(-cols // BLOCK))
    quantised = torch.empty_like(weight, dtype=torch.float8_e4m3fn)
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            block = weight[i * BLOCK : (i + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK].float()
            scales[i, j] = block.abs().max().clamp_min(1e-12) / FP8_MAX
            quantised[i * BLOCK : (i + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK] = (block / scales[i, j]).to(torch.float8_e4m3fn)
    return quantised, scales


def _rewrite(directory: Path, convert, quantization_config: dict) -> None:
    shard = directory / "model.safetensors"
    with safe_open(str(shard), "pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    converted = {}
    for key, value in tensors.items():
        converted.update(convert(key, value))
    save_file(converted, str(shard), metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (directory / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory) -> Path:
    """A tiny DeepSeek-V3 in FineGrainedFP8 layout: every Linear but the router and head in FP8 with block scales."""
    directory = tmp_path_factory.mktemp("fp8")
    tiny_model("deepseek_v3").save_pretrained(directory)

    def convert(key: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
        linear = key.endswith(".weight") and value.dim() == 2 and not any(p in key for p in ("embed", "lm_head", "norm", "mlp.gate."))
        if not linear:
            return {key: value}
        quantised, scales = _fp8_block_quantise(value)
        return {key: quantised, f"{key}_scale_inv": scales}

    _rewrite(directory, convert, FineGrainedFP8Config(weight_block_size=(BLOCK, BLOCK)).to_dict())
    return directory


def _logits(model, inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(inputs).logits


def test_fp8_prune_writes_fp8_that_matches_the_dequantised_reference(fp8_checkpoint, tmp_path):
    result = mc.compress(fp8_checkpoint, "reap", 0.5, "layer", token_batches(), out=tmp_path / "out", cache_dir=False)
    assert result.summary["streamed"] and result.summary["weights_format"].startswith("fp8, as stored")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "fp8" and config["n_routed_experts"] == 4
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
        assert handle.get_slice("model.layers.1.mlp.experts.3.up_proj.weight").get_dtype() == "F8_E4M3"
        assert "model.layers.1.mlp.experts.3.up_proj.weight_scale_inv" in keys
        assert not any(".experts.4." in k for k in keys), "removed experts and their scales are gone"
        keep = sorted(next(lp for lp in result.plan.layers if lp.layer == 1).keep)
        with safe_open(str(fp8_checkpoint / "model.safetensors"), "pt") as source:
            for new, old in enumerate(keep):  # kept experts: the stored bytes, renumbered
                for suffix in ("weight", "weight_scale_inv"):
                    assert torch.equal(
                        handle.get_tensor(f"model.layers.1.mlp.experts.{new}.down_proj.{suffix}").view(torch.uint8),
                        source.get_tensor(f"model.layers.1.mlp.experts.{old}.down_proj.{suffix}").view(torch.uint8),
                    )
    # transformers dequantises FP8 on a CPU; pruning the dequantised original with the same plan gives the same model
    reference = AutoModelForCausalLM.from_pretrained(fp8_checkpoint)
    mc.prune_experts(reference, result.plan)
    inputs = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "out"), inputs), _logits(reference, inputs), rtol=0, atol=0)


def test_fp8_calibration_sees_the_dequantised_weights(fp8_checkpoint):
    from moe_compress.engine.statistics import collect_statistics
    from moe_compress.source.load import load_streamed

    weights, _ = load_streamed(fp8_checkpoint)
    streamed, _ = collect_statistics(weights.model, token_batches(), ("reap_sum", "selected"), cache_dir=False, weights=weights)
    reference = AutoModelForCausalLM.from_pretrained(fp8_checkpoint)
    in_memory, _ = collect_statistics(reference, token_batches(), ("reap_sum", "selected"), cache_dir=False)
    assert all(torch.equal(streamed[i][n], in_memory[i][n]) for i in in_memory for n in in_memory[i])


def test_fp8_under_a_plan_that_creates_weights_is_written_dequantised_and_says_so(fp8_checkpoint, tmp_path):
    result = mc.compress(fp8_checkpoint, "mone", 0.5, "global", token_batches(), out=tmp_path / "out", cache_dir=False)
    assert "dequantised" in result.summary["weights_format"]
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as handle:
        assert not any(k.endswith("scale_inv") for k in handle.keys())


def test_mxfp4_expert_blocks_are_sliced_along_the_expert_axis(tmp_path):
    """gpt-oss stores each layer's experts fused, as MXFP4 blocks and scales: pruning slices them as stored."""
    source = tmp_path / "mxfp4"
    tiny_model("gpt_oss", intermediate_size=32).save_pretrained(source)
    generator = torch.Generator().manual_seed(0)

    def convert(key: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
        if not key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            return {key: value}
        experts, inputs, outputs = value.shape  # stored transposed: rows are outputs, 16 bytes hold 32 FP4 inputs
        return {
            f"{key}_blocks": torch.randint(0, 256, (experts, outputs, inputs // 32, 16), generator=generator, dtype=torch.uint8),
            f"{key}_scales": torch.randint(120, 128, (experts, outputs, inputs // 32), generator=generator, dtype=torch.uint8),
        }

    _rewrite(source, convert, {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]})
    result = mc.compress(source, "reap", 0.5, "layer", token_batches(), out=tmp_path / "out", cache_dir=False)
    assert result.summary["weights_format"].startswith("mxfp4, as stored")
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as handle, safe_open(str(source / "model.safetensors"), "pt") as original:
        keep = torch.tensor(sorted(next(lp for lp in result.plan.layers if lp.layer == 0).keep))
        for name in ("gate_up_proj_blocks", "gate_up_proj_scales", "down_proj_blocks", "gate_up_proj_bias"):
            key = f"model.layers.0.mlp.experts.{name}"
            assert torch.equal(handle.get_tensor(key), original.get_tensor(key)[keep])
    reference = AutoModelForCausalLM.from_pretrained(source)
    mc.prune_experts(reference, result.plan)
    inputs = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "out"), inputs), _logits(reference, inputs), rtol=0, atol=0)


def test_fp8_under_a_merge_plan_is_written_dequantised_with_the_merged_experts(fp8_checkpoint, tmp_path):
    """A merge creates weights: copying the stored experts would write each group's first expert unmerged."""
    result = mc.compress(fp8_checkpoint, "hc-smoe", 0.5, "layer", token_batches(), out=tmp_path / "out", cache_dir=False)
    assert result.plan.layers and all(lp.action == "merge" for lp in result.plan.layers)
    assert "dequantised" in result.summary["weights_format"]
    reference = AutoModelForCausalLM.from_pretrained(fp8_checkpoint)
    mc.apply_plan(reference, result.plan)
    inputs = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "out"), inputs), _logits(reference, inputs))
