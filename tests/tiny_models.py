"""Tiny randomly initialised MoE models built from the real transformers config classes.

Every architecture family we support gets one configuration here. They are small enough to
run a forward pass in milliseconds, but keep the structural features that make each family
different: dense first layers, sparse steps, shared experts (with and without a gate),
sigmoid/group-limited routers with a correction bias, expert biases, sliding-window layers.
"""

from __future__ import annotations

import torch
import transformers
from transformers import AutoModelForCausalLM, PreTrainedModel

VOCAB = 96
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)
_MLA = dict(num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)

#: model_type -> (config class name, family-specific keyword arguments)
TINY_CONFIGS: dict[str, tuple[str, dict]] = {
    "mixtral": ("MixtralConfig", dict(intermediate_size=16, num_local_experts=8, num_experts_per_tok=2)),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(
            intermediate_size=24,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            num_experts=8,
            num_experts_per_tok=2,
            mlp_only_layers=[0],
            norm_topk_prob=False,
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(intermediate_size=24, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[1], head_dim=8, norm_topk_prob=True),
    ),
    "olmoe": ("OlmoeConfig", dict(intermediate_size=16, num_experts=8, num_experts_per_tok=2)),
    "deepseek_v2": (
        "DeepseekV2Config",
        dict(intermediate_size=24, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=2, first_k_dense_replace=1, **_MLA),
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        dict(
            intermediate_size=24,
            moe_intermediate_size=16,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=2,
            topk_group=1,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            **_MLA,
        ),
    ),
    "glm4_moe": (
        "Glm4MoeConfig",
        dict(intermediate_size=24, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, head_dim=8),
    ),
    "gpt_oss": (
        "GptOssConfig",
        dict(
            intermediate_size=16,
            num_local_experts=8,
            num_experts_per_tok=2,
            head_dim=8,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            sliding_window=4,
        ),
    ),
    "ernie4_5_moe": (
        "Ernie4_5_MoeConfig",
        dict(intermediate_size=24, moe_intermediate_size=16, moe_num_experts=8, moe_k=2, moe_num_shared_experts=1, moe_layer_start_index=1, moe_layer_end_index=2),
    ),
    "granitemoe": ("GraniteMoeConfig", dict(intermediate_size=16, num_local_experts=8, num_experts_per_tok=2)),
}

FAMILIES = sorted(TINY_CONFIGS)


def tiny_config(model_type: str, num_layers: int = 3, **overrides):
    """The tiny config of `model_type`, with `num_layers` decoder layers."""
    class_name, kwargs = TINY_CONFIGS[model_type]
    merged = {**_COMMON, **kwargs, "num_hidden_layers": num_layers, **overrides}
    if "layer_types" in merged and len(merged["layer_types"]) != num_layers:
        merged["layer_types"] = [("sliding_attention", "full_attention")[i % 2] for i in range(num_layers)]
    return getattr(transformers, class_name)(**merged)


def tiny_model(model_type: str, num_layers: int = 3, seed: int = 0, **overrides) -> PreTrainedModel:
    """A randomly initialised tiny model in eval mode, float32, with non-trivial router weights.

    Routers of some families initialise to zeros (every expert ties); random router rows and a
    random correction bias make routing decisions distinct so pruning tests mean something.
    """
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, num_layers, **overrides))
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if tensor.dim() >= 2:
                tensor.normal_(0.0, 0.2)
            elif not name.endswith("norm.weight") and "layernorm" not in name:
                tensor.normal_(0.0, 0.05)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(0.0, 0.05)
    return model.eval()
