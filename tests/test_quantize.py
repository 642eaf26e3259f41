"""Weight-only quantisation to compressed-tensors checkpoints: reload, accuracy, composition, errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from helpers import calm, round_experts, rounded, token_batches
from moe_compress import MoECompressError, compress, get_adapter, load_model, quantize, slim
from moe_compress.cli import app
from test_save_load import _non_uniform_plan
from tiny_checkpoints import save_tiny_checkpoint
from tiny_models import VOCAB, tiny_model

IDS = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def _round_in_memory(model, bits: int, group: int) -> None:
    """What the checkpoint should hold: every decoder Linear and routed expert rounded; routers, gates, embeddings kept."""
    adapter = get_adapter(model)
    for layer in adapter.decoder_layers(model):
        block = adapter.moe_block(layer)
        skip = {id(adapter.router(block))} if block is not None else set()
        skip |= {id(m) for m in (adapter.shared_experts(block) if block is not None else []) if isinstance(m, nn.Linear)}
        for module in layer.modules():
            if isinstance(module, nn.Linear) and id(module) not in skip:
                module.weight.copy_(rounded(module.weight, bits, group))
    round_experts(model, bits, group)


@pytest.mark.parametrize("bits, tolerance", [(8, 0.05), (4, 0.3)])
def test_quantized_checkpoint_reloads_with_rounded_weights_and_close_logits(bits, tolerance, tmp_path):
    model = calm(tiny_model("mixtral"))
    with torch.no_grad():
        original = model(IDS).logits
    result = quantize(model, tmp_path / "q", bits=bits, group_size=16)
    reloaded, _ = load_model(tmp_path / "q")
    with torch.no_grad():
        logits = reloaded(IDS).logits
    assert torch.isfinite(logits).all()
    relative = float((logits - original).norm() / original.norm())
    print(f"\n{bits}-bit: relative logit error {relative:.4f}; checkpoint {result.summary['checkpoint_bytes_before']} -> {result.summary['checkpoint_bytes']} bytes")
    assert relative < tolerance
    _round_in_memory(model, bits, 16)  # the model itself was left untouched until now
    with torch.no_grad():
        assert torch.allclose(logits, model(IDS).logits, atol=1e-5)
    assert result.summary["checkpoint_bytes"] < result.summary["checkpoint_bytes_before"] * (0.45 if bits == 4 else 0.6)
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert config["config_groups"]["group_0"]["weights"]["num_bits"] == bits
    assert "lm_head" in config["ignore"] and "model.layers.0.block_sparse_moe.gate" in config["ignore"]


@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss"])  # experts per expert on disk / fused on disk
def test_non_uniform_remote_code_model_quantizes_and_reloads(family, tmp_path):
    model = tiny_model(family)
    compress(model, plan=_non_uniform_plan(model), out=tmp_path / "pruned", ignore_plan_identity=True)
    quantize(tmp_path / "pruned", tmp_path / "q", bits=8, group_size=8)
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert "auto_map" in config and "moe_compress" in config and "quantization_config" in config
    assert config["moe_compress"]["layers"] == json.loads((tmp_path / "pruned" / "config.json").read_text())["moe_compress"]["layers"]
    assert ("per_expert_tensors" in config["moe_compress"]) == (family == "gpt_oss")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q", trust_remote_code=True).eval()
    _round_in_memory(model, 8, 8)
    with torch.no_grad():
        assert torch.allclose(reloaded(IDS).logits, model(IDS).logits, atol=1e-5)


def _stored_shapes(path) -> dict[str, list[int]]:
    shapes = {}
    for shard in path.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as stored:
            shapes.update({key: stored.get_slice(key).get_shape() for key in stored.keys()})
    return shapes


@pytest.mark.parametrize("family", ["gpt_oss", "granitemoe", "qwen3_vl_moe"])  # transposed, renamed on disk, multimodal
def test_fused_expert_families_are_packed_per_expert_and_reload_exactly(family, tmp_path):
    """Families that fuse experts on disk: every expert packed as its own 2-D weight; the generated class stacks them back on load."""
    import transformers

    from moe_compress.arch import auto_model_class
    from moe_compress.slimming.quantize import PER_EXPERT_STORAGE

    model = calm(tiny_model(family))
    result = quantize(model, tmp_path / "q", bits=4, group_size=16, scope="experts")
    assert result.summary["experts_storage"] == PER_EXPERT_STORAGE
    adapter = get_adapter(model)
    layers = adapter.moe_layer_indices(model)
    shapes = _stored_shapes(tmp_path / "q")
    assert all(len(shape) <= 2 for key, shape in shapes.items() if ".experts." in key), "no fused 3-D expert tensor is left"
    packed = [key for key in shapes if key.endswith("weight_packed")]
    assert len(packed) == len(layers) * 8 * 2  # 8 experts, gate_up_proj and down_proj, in every MoE layer
    assert all(".experts." in key for key in packed)
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_moe_compress.MoECompressPerExpertForCausalLM"
    auto = getattr(transformers, auto_model_class(model.config).__name__)
    reloaded = auto.from_pretrained(tmp_path / "q", trust_remote_code=True).eval()
    # transformers keeps a checkpoint's generated code per directory name for the whole process: after a
    # mixed-width checkpoint named alike (tests/test_mixed_bits.py), its superset of this class loads it
    assert type(reloaded).__name__.startswith(("MoECompressPerExpert", "MoECompressMixedBitsPerExpert"))
    round_experts(model, 4, 16)  # the in-memory quantised model
    state, expected = reloaded.state_dict(), model.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, model(IDS).logits, rtol=0, atol=1e-5)
    ours, _ = load_model(tmp_path / "q")  # moe-compress recognises its own generated code without trust_remote_code
    assert torch.equal(get_adapter(ours).experts(get_adapter(ours).moe_block(get_adapter(ours).decoder_layers(ours)[layers[0]])).down_proj,
                       adapter.experts(adapter.moe_block(adapter.decoder_layers(model)[layers[0]])).down_proj)


def test_tensors_whose_stock_conversion_cannot_run_packed_keep_their_in_memory_names(tmp_path):
    """kimi_linear joins q/k/v conv1d checkpoint keys on load, a conversion transformers cannot run on a packed checkpoint."""
    model = tiny_model("kimi_linear")
    quantize(model, tmp_path / "q", bits=4, group_size=16, scope="experts")
    shapes = _stored_shapes(tmp_path / "q")
    assert "model.layers.0.self_attn.conv1d.weight" in shapes and not any("q_conv1d" in key for key in shapes)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    round_experts(model, 4, 16)
    state, expected = reloaded.state_dict(), model.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)


def test_a_family_transformers_cannot_load_packed_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(MoECompressError, match=r"quantised inkling_mm_model checkpoint would not load in transformers: .*mlp\.w13_dn\.weight"):
        quantize(tiny_model("inkling_mm_model"), tmp_path / "q", bits=4)
    assert not list(tmp_path.iterdir())


def test_dry_run_says_a_fused_family_is_packed_per_expert_and_refuses_what_cannot_load(tmp_path):
    runner = CliRunner()
    gpt_oss = runner.invoke(app, ["quantize", str(save_tiny_checkpoint(tmp_path / "gpt_oss", "gpt_oss")), "--out", str(tmp_path / "q"), "--dry-run"])
    assert gpt_oss.exit_code == 0 and "packed one weight per expert" in " ".join(gpt_oss.output.split()), gpt_oss.output
    mixtral = runner.invoke(app, ["quantize", str(save_tiny_checkpoint(tmp_path / "mixtral")), "--out", str(tmp_path / "q"), "--dry-run"])
    assert mixtral.exit_code == 0 and "one weight per expert" not in " ".join(mixtral.output.split())
    inkling = runner.invoke(app, ["quantize", str(save_tiny_checkpoint(tmp_path / "inkling", "inkling_mm_model")), "--out", str(tmp_path / "q"), "--dry-run"])
    assert inkling.exit_code == 2 and "would not load in transformers" in inkling.output
    assert not (tmp_path / "q").exists()


def test_slim_then_quantize_keeps_the_zeros(tmp_path):
    model = tiny_model("mixtral")
    slim(model, "wanda", nm=(2, 4), calib=token_batches(2))
    quantize(model, tmp_path / "q", bits=4, scope="experts")
    reloaded, _ = load_model(tmp_path / "q")
    for name in ("gate_up_proj", "down_proj"):
        before = getattr(model.model.layers[1].mlp.experts, name)
        after = getattr(reloaded.model.layers[1].mlp.experts, name)
        assert bool((after[before == 0] == 0).all())  # pruned weights stay exactly zero (symmetric: 0 -> 0)
    # scope "experts" leaves attention in full precision
    assert torch.equal(reloaded.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight)


@pytest.mark.parametrize("family, kwargs, message", [
    ("mixtral", {"bits": 3}, "bits must be 4 or 8"),
    ("mixtral", {"group_size": 5}, "does not divide"),
    ("mixtral", {"scope": "router"}, "scope must be one of"),
    ("mixtral", {"method": "gptq"}, "method must be one of"),
])
def test_bad_input_gives_clear_errors(family, kwargs, message, tmp_path):
    with pytest.raises(MoECompressError, match=message):
        quantize(tiny_model(family, num_layers=1), tmp_path / "q", **kwargs)
    assert not (tmp_path / "q").exists() and not list(tmp_path.glob(".q*"))


def test_cli_quantize_and_refuse_to_quantize_twice(tmp_path):
    checkpoint = save_tiny_checkpoint(tmp_path / "tiny")
    runner = CliRunner()
    result = runner.invoke(app, ["quantize", str(checkpoint), "--bits", "8", "--out", str(tmp_path / "q8")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "q8" / "tokenizer.json").exists()
    again = runner.invoke(app, ["quantize", str(tmp_path / "q8"), "--out", str(tmp_path / "q8q")])
    assert again.exit_code == 2 and "quantised with 'compressed-tensors'" in again.output and "full-precision" in again.output
    bad = runner.invoke(app, ["quantize", str(checkpoint), "--bits", "2", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and not (tmp_path / "bad").exists()
    help_text = runner.invoke(app, ["quantize", "--help"], terminal_width=200).output
    for option in ("--bits", "--group-size", "--scope", "--asymmetric", "--out", "--overwrite"):
        assert option in help_text


def test_recipe_prune_then_slim_then_quantize_composes(tmp_path):
    from moe_compress import run_recipe
    from moe_compress.evaluate.lm_perplexity import perplexity
    from tiny_checkpoints import write_calibration

    checkpoint = save_tiny_checkpoint(tmp_path / "tiny", "qwen2_moe")
    calib = write_calibration(tmp_path / "calib.jsonl", documents=60)
    recipe = {
        "model": str(checkpoint),
        "calibration": {"source": str(calib), "samples": 8, "seq_len": 32},
        "evaluate": {"ppl": str(calib), "windows": 4, "seq_len": 32},
        # a random tiny model's next-token distributions are near ties: 4-bit rounding flips their top-1
        # far more often than on a trained model, so the guard's quantisation threshold does not apply
        "guard": False,
        "stages": [{"prune": {"method": "reap", "ratio": 0.25}}, {"slim": {"method": "sparsegpt", "nm": "2:4", "targets": ["experts", "shared"]}},
                   {"quantize": {"bits": 4}}],
    }
    report = run_recipe(recipe, out=tmp_path / "out")
    assert report["rows"][2]["sparsity_reached"] == {"experts": 0.5, "shared": 0.5}
    assert report["rows"][3]["bits"] == 4 and report["checkpoint_bytes"] == report["rows"][3]["checkpoint_bytes"]
    assert report["rows"][3]["params"] == report["rows"][2]["params"]  # quantising removes no parameter
    assert report["rows"][3]["bytes"] == report["checkpoint_bytes"] < report["rows"][2]["bytes"]
    assert sorted(p.name for p in (tmp_path / "out" / "plans").iterdir()) == ["01-prune.json"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] == 4
    reloaded, tokenizer = load_model(tmp_path / "out")
    experts = reloaded.model.layers[1].mlp.experts
    assert experts.gate_up_proj.shape[0] == 6  # the pruned structure survives
    nonzeros = (experts.down_proj != 0).reshape(6, experts.down_proj.shape[1], -1, 4).sum(-1)
    assert (nonzeros <= 2).all()  # and so does 2:4 through 4-bit rounding
    # the report's last row measured exactly the saved checkpoint
    from moe_compress.pipeline import eval_sets

    data = eval_sets(tokenizer, recipe["evaluate"])[str(calib)]
    assert perplexity(reloaded, data).perplexity == pytest.approx(report["rows"][3]["perplexity"][str(calib)], rel=1e-6)


def test_recipe_quantize_must_be_the_last_stage():
    from moe_compress.recipes import load_recipe

    with pytest.raises(MoECompressError, match="must be the last stage"):
        load_recipe({"stages": [{"quantize": {"bits": 4}}, {"prune": {"ratio": 0.25}}]})
