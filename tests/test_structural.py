"""Layer drop, block drop and CD-MoE condensing: scores, identities, loading, fine-tuning."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_reloads_exactly, load_in_fresh_process, save_expected, token_batches
from moe_compress import CalibrationSpec, LayerPlan, Plan, apply_plan, condense, drop, finetune, get_adapter, load_model
from moe_compress.api import collect_statistics
from moe_compress.methods.condense import js_divergence, mean_selected_gate
from moe_compress.observe.similarity import _cos_sum, observe_similarities
from tiny_checkpoints import save_tiny_checkpoint, write_calibration
from tiny_models import VOCAB, tiny_model


def test_cosine_on_a_hand_case():
    total, count = _cos_sum(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[1.0, 1.0], [0.0, -3.0]]))
    assert count == 2 and math.isclose(total, 1 / math.sqrt(2) - 1.0, rel_tol=1e-12)


def test_js_divergence_hand_case():
    p = torch.log(torch.tensor([[0.5, 0.5]]))
    q = torch.log(torch.tensor([[1.0, 1e-30]]))
    # m = [.75, .25]; JSD = .5 KL(p||m) + .5 KL(q||m) = .5(.5 ln(2/3) + .5 ln 2) + .5 ln(4/3)
    expected = 0.5 * (0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)) + 0.5 * math.log(1 / 0.75)
    assert math.isclose(float(js_divergence(p, q)), expected, rel_tol=1e-6)
    assert float(js_divergence(p, p)) == 0.0


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "granitemoe"])
def test_scores_equal_cosines_computed_from_the_full_model(family):
    model = tiny_model(family, num_layers=4)
    adapter = get_adapter(model)
    batches = token_batches(count=2)
    scores = observe_similarities(model, adapter, batches, max_distance=2)
    # Reference from a plain forward: boundaries via layer hooks, MoE residual as output - mlp output.
    boundaries, moe_parts = {}, {}
    handles = []
    for index, layer in enumerate(adapter.decoder_layers(model)):
        handles.append(layer.register_forward_hook(lambda m, a, o, i=index: boundaries.setdefault(i + 1, []).append(o)))
        handles.append(layer.register_forward_pre_hook(lambda m, a, i=index: boundaries.setdefault(i, []).append(a[0]) if i == 0 else None))
        handles.append(getattr(layer, adapter.moe_attr).register_forward_hook(lambda m, a, o, i=index: moe_parts.setdefault(i, []).append(o)))
    with torch.no_grad():
        for batch in batches:
            model(batch)
    for handle in handles:
        handle.remove()

    def mean_cos(a_list, b_list):
        a, b = torch.cat([a.reshape(-1, a.shape[-1]) for a in a_list]), torch.cat([b.reshape(-1, b.shape[-1]) for b in b_list])
        return float(F.cosine_similarity(a.double(), b.double(), dim=-1).mean())

    for distance in (1, 2):
        for i, value in enumerate(scores.blocks[distance]):
            assert math.isclose(value, mean_cos(boundaries[i], boundaries[i + distance]), rel_tol=1e-9, abs_tol=1e-12)
    for layer in adapter.moe_layer_indices(model):
        outs, parts = boundaries[layer + 1], moe_parts[layer]
        if family == "granitemoe":  # h + m * residual_multiplier
            parts = [p * model.config.residual_multiplier for p in parts]
        residual = [o - p for o, p in zip(outs, parts)]
        assert math.isclose(scores.moe[layer], mean_cos(residual, outs), rel_tol=1e-6)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_dropping_nothing_is_an_identity(family):
    model = tiny_model(family)
    inputs = torch.randint(3, VOCAB, (2, 9))
    with torch.no_grad():
        before = model(inputs).logits
    apply_plan(model, Plan(family, 2, [], num_layers=3))
    with torch.no_grad():
        assert torch.equal(model(inputs).logits, before)


@pytest.fixture(scope="module")
def structural_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("structural")
    inputs = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    jobs = []
    cases = {
        "mixtral-block": ("mixtral", dict(unit="block", n=1)),
        "qwen3_moe-block": ("qwen3_moe", dict(unit="block", n=1)),  # mlp_only_layers renumbered
        "deepseek_v3-block": ("deepseek_v3", dict(unit="block", n=2, mode="consecutive")),  # first_k_dense_replace
        "gpt_oss-block": ("gpt_oss", dict(unit="block", n=1)),  # layer_types subset
        "ernie4_5_moe-block": ("ernie4_5_moe", dict(unit="block", n=1)),  # MoE range recomputed
        "qwen2_moe-moe": ("qwen2_moe", dict(unit="moe", n=1)),
        "gpt_oss-moe": ("gpt_oss", dict(unit="moe", n=2)),
    }
    for name, (family, options) in cases.items():
        model = tiny_model(family, num_layers=4)
        drop(model, calib=token_batches(count=2), out=root / name, **options)
        save_expected(root / name, inputs, model)
        jobs.append({"path": str(root / name), "remote": options["unit"] == "moe"})
    for family in ("deepseek_v3", "qwen2_moe", "mixtral"):
        model = tiny_model(family, num_layers=4)
        condense(model, layers=1, calib=token_batches(count=1, batch=1, seq_len=8), out=root / f"{family}-condensed", cache_dir=False)
        save_expected(root / f"{family}-condensed", inputs, model)
        jobs.append({"path": str(root / f"{family}-condensed"), "remote": True})
    return root, load_in_fresh_process(jobs)


@pytest.mark.parametrize("name", ["mixtral-block", "qwen3_moe-block", "deepseek_v3-block", "gpt_oss-block", "ernie4_5_moe-block"])
def test_block_dropped_checkpoint_loads_in_plain_transformers(structural_checkpoints, name):
    root, results = structural_checkpoints
    result = results[str(root / name)]
    assert result["class"] != "MoECompressForCausalLM"
    assert_reloads_exactly(result)


@pytest.mark.parametrize("name", ["qwen2_moe-moe", "gpt_oss-moe", "deepseek_v3-condensed", "qwen2_moe-condensed", "mixtral-condensed"])
def test_dropped_and_condensed_layers_reload_exactly(structural_checkpoints, name):
    root, results = structural_checkpoints
    result = results[str(root / name)]
    assert result["class"] == "MoECompressForCausalLM"
    assert_reloads_exactly(result)


def test_block_drop_renumbers_the_config():
    model = tiny_model("qwen3_moe", num_layers=4)  # mlp_only_layers=[1]
    apply_plan(model, Plan("qwen3_moe", 2, [], dropped_blocks=[0], num_layers=4))
    assert model.config.num_hidden_layers == 3 and model.config.mlp_only_layers == [0]
    assert [l.self_attn.layer_idx for l in model.model.layers] == [0, 1, 2]
    model = tiny_model("deepseek_v3", num_layers=4)  # first_k_dense_replace=1
    apply_plan(model, Plan("deepseek_v3", 2, [], dropped_blocks=[2], num_layers=4))
    assert model.config.first_k_dense_replace == 1 and model.config.num_hidden_layers == 3


def _constant_routing_model():
    """DeepSeek-V3 whose router ignores the input: zero weights, a correction bias that picks
    experts 0 and 1, so every token gets the same two experts with the same gates."""
    model = tiny_model("deepseek_v3", num_layers=3, n_group=1, topk_group=1)
    adapter = get_adapter(model)
    with torch.no_grad():
        for index in adapter.moe_layer_indices(model):
            router = adapter.router(adapter.moe_block(model.model.layers[index]))
            router.weight.zero_()
            router.e_score_correction_bias.copy_(torch.tensor([1.0, 0.5, 0, 0, 0, 0, 0, 0]))
    return model, adapter


def test_condensed_layer_equals_the_original_when_routing_is_constant():
    model, adapter = _constant_routing_model()
    inputs = torch.randint(3, VOCAB, (2, 9))
    with torch.no_grad():
        before = model(inputs).logits
    stats, _ = collect_statistics(model, token_batches(), ("gate_sum", "selected"), cache_dir=False)
    weights = mean_selected_gate(stats[1])
    assert torch.allclose(weights[:2], torch.tensor([1.25, 1.25], dtype=torch.float64)), "sigmoid(0)=.5, renormalised, x2.5"
    plan = Plan("deepseek_v3", 2, [LayerPlan(1, 8, [0, 1], condensed_weights=[float(weights[0]), float(weights[1])])], num_layers=3)
    apply_plan(model, plan, adapter)
    block = adapter.moe_block(model.model.layers[1])
    assert adapter.num_experts(block) == 2 and type(adapter.router(block)).__name__ == "ConstantRouter"
    with torch.no_grad():
        torch.testing.assert_close(model(inputs).logits, before, rtol=0, atol=1e-5)


def test_condense_search_finds_the_constant_routing():
    model, _ = _constant_routing_model()
    result = condense(model, layers=1, calib=token_batches(count=1), cache_dir=False)
    layer = result.plan.layers[0]
    assert layer.keep == [0, 1] and result.plan.meta["order_jsd"][0] < 1e-9
    assert result.plan.meta["evaluations"] > 0


def test_finetuning_reduces_calibration_loss(tmp_path):
    checkpoint = save_tiny_checkpoint(tmp_path / "tiny", "qwen2_moe")
    calib = write_calibration(tmp_path / "calib.jsonl", documents=60)
    model, tokenizer = load_model(checkpoint)
    condense(model, layers=1, calib=CalibrationSpec(str(calib), samples=16, seq_len=64), tokenizer=tokenizer, cache_dir=False)
    report = finetune(model, tokenizer, data=str(calib), steps=25, lr=1e-2, batch_size=4, seq_len=32, eval_data=str(calib),
                      eval_windows=8, out=tmp_path / "tuned", checkpoint_every=10)
    assert report["last_loss"] < report["first_loss"]
    assert report["perplexity_after"] < report["perplexity_before"]
    assert (tmp_path / "tuned.checkpoints" / "step-10" / "config.json").is_file()
    reloaded, _ = load_model(tmp_path / "tuned")
    assert sum(p.numel() for p in reloaded.parameters()) == sum(p.numel() for p in model.parameters())
