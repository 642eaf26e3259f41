"""Structure is found on every family, and one expert's forward matches transformers' own experts module."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from moe_compress import MoECompressError, get_adapter, supported_model_types
from moe_compress.arch import expert_forward
from tiny_models import EXPERTS, FAMILIES, SUPPORTED, tiny_model

#: MoE layer indices of the 3-layer tiny models: dense first layers, mlp_only_layers, moe ranges.
EXPECTED_MOE_LAYERS = {
    "mixtral": [0, 1, 2],
    "qwen2_moe": [1, 2],
    "qwen3_moe": [0, 2],
    "olmoe": [0, 1, 2],
    "deepseek_v2": [1, 2],
    "deepseek_v3": [1, 2],
    "glm4_moe": [1, 2],
    "gpt_oss": [0, 1, 2],
    "ernie4_5_moe": [1, 2],
    "granitemoe": [0, 1, 2],
    # hybrid stacks: mamba / linear-attention layers beside MoE layers
    "nemotron_h": [1],  # mamba, MoE, attention: each layer is one kind
    "jamba": [1],  # MoE every second layer
    "qwen3_next": [0, 1, 2],  # linear attention and attention layers, every one with an MoE
}
SHARED = {"qwen2_moe": 2, "deepseek_v2": 1, "deepseek_v3": 1, "glm4_moe": 1, "ernie4_5_moe": 1, "qwen3_next": 2, "nemotron_h": 1}


def test_supported_types_are_the_tiny_models_types():
    assert supported_model_types() == SUPPORTED and set(FAMILIES) <= set(SUPPORTED)


@pytest.mark.parametrize("family", sorted(EXPECTED_MOE_LAYERS))
def test_structure(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    assert adapter.moe_layer_indices(model) == EXPECTED_MOE_LAYERS[family]
    block = adapter.moe_block(adapter.decoder_layers(model)[EXPECTED_MOE_LAYERS[family][0]])
    assert adapter.num_experts(block) == EXPERTS
    assert adapter.top_k(model.config) == 2 and adapter.config_num_experts(model.config) == EXPERTS
    assert len(adapter.shared_experts(block)) == SHARED.get(family, 0)
    axes = {t.name: (t.axis, t.value.shape[t.axis]) for t in adapter.expert_tensors(block)}
    assert axes["down_proj"] == (0, EXPERTS) and axes["weight"][1] == EXPERTS
    assert all(size == EXPERTS for _, size in axes.values())


@pytest.mark.parametrize("family", SUPPORTED)
def test_expert_forward_matches_the_experts_module(family):
    """Routing every token to expert e with weight 1 through transformers equals f_e(x).

    Covers every layout flag the decorator declares: transposed weights and biases (GPT-OSS),
    interleaved gate/up, non-gated experts (NemotronH), a post-expert norm (Muse Spark), and the
    families' own gate functions (clamped SwiGLU).
    """
    model = tiny_model(family)
    adapter = get_adapter(model)
    experts = adapter.experts(adapter.moe_block(adapter.decoder_layers(model)[adapter.moe_layer_indices(model)[-1]]))
    width = experts.down_proj.shape[2] if experts.is_transposed else experts.down_proj.shape[1]
    x = torch.randn(5, width)
    with torch.no_grad():
        for e in range(EXPERTS):
            reference = experts(x, torch.full((5, 1), e), torch.ones(5, 1))
            torch.testing.assert_close(expert_forward(experts, e, x), reference, rtol=1e-5, atol=1e-6)


def test_dense_model_is_refused_with_a_pointer_to_the_list():
    dense = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(MoECompressError, match="'llama' is not supported.*dense.*moe-compress families"):
        get_adapter(dense)


def test_group_limited_routing_is_detected():
    model = tiny_model("deepseek_v3")
    assert get_adapter(model).routing_groups(model.config) == (2, 1)
    assert get_adapter(tiny_model("mixtral")).routing_groups(tiny_model("mixtral").config) == (1, 1)
