"""The true exceptions: model types whose MoE differs from what discovery finds on its own.

Everything else -- where the layers, router, experts and shared experts are, which config keys
hold the expert count and top-k, how the router scores -- is found by `discovery.py`, so a new
transformers family that follows the common shapes needs no line here. Each entry says what
differs.
"""

from __future__ import annotations

#: Model types we refuse, with the reason (shown to the user, and in `moe-compress families`).
REFUSED: dict[str, str] = {
    "diffusion_gemma": "a block-diffusion model with two MoE stacks (encoder and decoder), not a causal language model",
    "ernie4_5_vl_moe": "modality-isolated experts: text and vision experts share one expert count, and text "
    "calibration cannot rank the vision experts",
    "inkling2": "its decoder layers read the outputs of all earlier blocks (block attention residuals), which the "
    "one-layer-at-a-time pipeline cannot carry",
    "inkling2_text": "its decoder layers read the outputs of all earlier blocks (block attention residuals), which the "
    "one-layer-at-a-time pipeline cannot carry",
    "deepseek_v4": "its first MoE layers route tokens by a fixed token-to-expert table (hash routing), which removing "
    "experts would break",
    "longcat_flash": "zero-computation (identity) experts share its router and gate_up_proj rows with the routed "
    "experts, in an experts module that is not the transformers standard one",
    "zaya": "its router has a zero-computation skip expert beside the routed ones and carries router states from "
    "layer to layer",
    "qwen3_omni_moe": "thinker and talker are two MoE models in one checkpoint and no transformers Auto class loads "
    "the pair; compress the thinker (qwen3_omni_moe_thinker)",
    "openai_privacy_filter": "a token classifier, not a language model",
}

#: Adapter fields discovery cannot read from code or config, per model type: (fields, what differs).
OVERRIDES: dict[str, tuple[dict, str]] = {
    "flex_olmo": ({"pre_moe_norm_attr": ""}, "post-norm layers: the MoE reads the residual stream itself"),
}

#: Config values a model type's default config leaves unset, so that the families table can build
#: its skeleton (any valid values do; a checkpoint's config always has them): (values, what is missing).
_GEMMA4_MOE = {"enable_moe_block": True, "num_experts": 128, "top_k_experts": 8, "moe_intermediate_size": 704}
_QWEN4_INDEXER = {"indexer_n_heads": 16, "indexer_kv_heads": 1, "indexer_head_dim": 256, "indexer_budget": 2048, "indexer_compress_ratio": 4}
PROBE_CONFIG: dict[str, tuple[dict, str]] = {
    "dots1": ({"n_routed_experts": 128, "num_experts_per_tok": 6, "n_shared_experts": 2}, "the default config has no experts"),
    "deepseek_v2": ({"num_experts_per_tok": 6}, "the default config has no top-k"),
    "deepseek_ocr2": ({"text_config": {"mlp_layer_types": ["dense"] + ["sparse"] * 31}}, "no dense/MoE layer pattern"),
    "gemma4": ({"text_config": _GEMMA4_MOE}, "the default config is the dense Gemma 4"),
    "gemma4_text": (_GEMMA4_MOE, "the default config is the dense Gemma 4"),
    "hunyuan_v1_moe": ({"head_dim": 128}, "no attention head size"),
    "lfm2_moe": ({"layer_types": ["conv", "conv", "full_attention", "conv"] * 8}, "no convolution/attention layer pattern"),
    "qwen4_exp": ({"text_config": _QWEN4_INDEXER}, "no sparse-attention indexer sizes"),
    "qwen4_exp_text": (_QWEN4_INDEXER, "no sparse-attention indexer sizes"),
}
