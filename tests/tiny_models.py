"""Tiny randomly initialised MoE models built from the real transformers config classes.

Every supported model type gets one: its config class's defaults, shrunk programmatically
(sizes, expert count, top-k, layer count; per-layer lists keep every distinct layer kind), with
per-type overrides only where a config class needs them. The trimmed build (the default) also
switches off costly optional features and sets structural features tests rely on; the
defaults build (`from_defaults=True`) keeps every feature as the class has it, only smaller, so
that a default the trimmed build switches off cannot hide a crash. They are small enough to run a
forward pass in milliseconds but keep the structural features that make each family differ:
dense first layers, sparse steps, hybrid mamba / linear-attention layers, shared experts (with
and without a gate), sigmoid / group-limited routers with correction biases, expert biases,
multimodal wrappers.
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from moe_compress.arch import auto_model_class, supported_model_types

VOCAB = 96
EXPERTS = 8
TOP_K = 2
LAYERS = 3

#: Values every config key of this name gets, when the config class has it.
SIZES: dict[str, object] = {
    "vocab_size": VOCAB, "unpadded_vocab_size": VOCAB, "vocab_size_per_layer_input": VOCAB,
    "hidden_size": 32, "intermediate_size": 24, "moe_intermediate_size": 16,
    "shared_expert_intermediate_size": 16, "shared_intermediate_size": 16, "moe_shared_expert_intermediate_size": 16,
    "shared_experts_intermediate_size": 16, "dense_intermediate_size": 24, "expert_ffn_hidden_size": 16, "ffn_hidden_size": 24,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
    "swa_num_attention_heads": 4, "swa_num_key_value_heads": 2, "swa_head_dim": 8,
    "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8, "qk_head_dim": 16,
    "o_lora_rank": 16, "o_groups": 2,
    "index_topk": 4, "index_head_dim": 8, "index_n_heads": 2, "index_block_size": 4, "index_topk_blocks": 2,
    "linear_head_dim": 8, "linear_num_heads": 4, "linear_key_head_dim": 8, "linear_value_head_dim": 8,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4,
    "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_d_state": 8, "mamba_num_heads": 4, "mamba_head_dim": 16,
    "ssm_state_size": 8, "n_groups": 1, "mamba_dt_rank": 4, "mamba_chunk_size": 16, "chunk_size": 16,
    "max_position_embeddings": 128, "model_max_length": 128, "sliding_window": 4, "sliding_window_size": 4,
    "router_hidden_size": 16, "moe_hidden_size": 32, "hidden_size_per_layer_input": 0, "moe_latent_size": None,
    "rotary_dim": 8, "enable_moe_block": True, "first_k_dense_replace": 1,
    "moe_num_shared_experts": 1, "n_shared_experts": 1, "num_shared_experts": 1,
    "d_rel": 4, "rel_extent": 16, "hc_lowrank": 8, "ple_embed_dim": 32,
    "text_hidden_size": 32, "out_hidden_size": 32, "adapter_out_dim": 32, "adapter_in_dim": 32, "thinker_hidden_size": 32,
    "tie_word_embeddings": False, "projector_hidden_size": 32,
}
#: Optional features (off when None or 0) that SIZES sets whatever the class's default (keys of
#: SIZES): a defaults build keeps each off where its class has it off, and gives it this size where on.
OPTIONAL: dict[str, object] = {
    "hidden_size_per_layer_input": 8, "moe_latent_size": 16, "sliding_window": 4, "sliding_window_size": 4, "q_lora_rank": 16,
    "first_k_dense_replace": 1, "moe_num_shared_experts": 1, "n_shared_experts": 1, "num_shared_experts": 1,
}
#: Switches a defaults build leaves as the class has them (only `enable_moe_block` stays on: without it Gemma 4 has no experts).
SWITCHES = ("tie_word_embeddings",)
#: Extra sizes of vision / audio towers (which keep their own architecture, one layer deep).
TOWER_SIZES: dict[str, object] = {
    "depth": 1, "num_heads": 4, "embed_dim": 32, "num_hidden_layers": 1, "n_layers": 1, "encoder_layers": 1, "d_model": 32,
    "encoder_attention_heads": 4, "encoder_ffn_dim": 32, "output_dim": 32, "adapter_input_size": 32,
}
EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
TOP_K_KEYS = ("num_experts_per_tok", "moe_k", "moe_topk", "top_k_experts", "num_experts_per_token")
LAYER_KEYS = ("num_hidden_layers", "num_layers")
SPECIAL_TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
_MLA = dict(num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)

#: Per-type overrides (of the text config for multimodal wrappers): structural features a test
#: relies on, or values a config class's validation needs.
OVERRIDES: dict[str, dict] = {
    "mixtral": dict(intermediate_size=16),
    "qwen2_moe": dict(mlp_only_layers=[0], norm_topk_prob=False, shared_expert_intermediate_size=24),
    "qwen3_moe": dict(decoder_sparse_step=1, mlp_only_layers=[1], norm_topk_prob=True),
    "olmoe": dict(intermediate_size=16),
    "deepseek_v2": dict(n_shared_experts=2, **_MLA),
    "deepseek_v3": dict(routed_scaling_factor=2.5, norm_topk_prob=True, **_MLA),
    "gpt_oss": dict(intermediate_size=16, layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "ernie4_5_moe": dict(moe_layer_start_index=1, moe_layer_end_index=2),
    "granitemoe": dict(intermediate_size=16),
    "deepseek_ocr2": dict(mlp_layer_types=["dense", "sparse", "sparse"]),
    "unlimited_ocr": dict(mlp_layer_types=["dense", "sparse", "sparse"]),
    # Its vision tower is an MoE too: discovery must pick the language model's experts.
    "dots3_note": dict(num_key_value_heads=4, head_dim=16, vision_config=dict(mlp_layer_types=["sparse"])),
    "glm4v_moe": dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1], "partial_rotary_factor": 1.0}),
    "granitemoehybrid": dict(layer_types=["linear_attention", "full_attention", "linear_attention"]),
    "mistral4": dict(head_dim=16),
    "dots3_note_text": dict(num_key_value_heads=4, head_dim=16),
    "glm5_next": dict(num_key_value_heads=4, index_topk=16, index_kpool=4, qk_rope_head_dim=0, qk_nope_head_dim=16, v_head_dim=16),
    "lfm2_moe": dict(layer_types=["conv", "full_attention", "conv"]),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=0),
    "beam": dict(layer_types=["sliding_attention", "full_attention", "full_attention"]),
    "nemotron_h": dict(layers_block_type=["linear_attention", "moe", "full_attention"]),
    "qwen4_exp_text": dict(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=8, indexer_budget=8, indexer_compress_ratio=2),
}
OVERRIDES["qwen4_exp"] = OVERRIDES["qwen4_exp_text"]
#: Per-type overrides of a defaults build, and only of three kinds: values the class's validation
#: needs at tiny sizes, layer patterns a 3-layer stack must keep (an attention layer, a sparse
#: one), and defaults that build no model at any size (dots1's shared experts, None).
DEFAULTS_OVERRIDES: dict[str, dict] = {
    **{t: OVERRIDES[t] for t in ("deepseek_ocr2", "dots3_note_text", "glm4v_moe", "glm5_next", "granitemoehybrid", "jamba", "lfm2_moe",
                                 "mistral4", "qwen4_exp", "qwen4_exp_text")},
    "dots3_note": OVERRIDES["dots3_note_text"], "dots1": dict(n_shared_experts=1),
}

#: The families the other test suites (observer, MoNE, ...) run on: one per router shape.
FAMILIES = sorted(["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "glm4_moe", "gpt_oss", "ernie4_5_moe", "granitemoe"])
#: Every model type moe-compress supports in the installed transformers.
SUPPORTED = supported_model_types()


def _pick_indices(rows: list, n: int) -> list[int]:
    """n layer indices that keep each distinct kind of layer (earliest first); `rows[i]` describes layer i."""
    firsts = [i for i, row in enumerate(rows) if row not in rows[:i]]
    rest = [i for i in range(len(rows)) if i not in firsts]
    return sorted((firsts + rest)[:n])


def _pick(values: list, n: int) -> list:
    return [values[i] for i in _pick_indices(values, n)]


def _fit(values: list, n: int) -> list:
    """A per-layer list written for `LAYERS` layers, fitted to n layers (shortened, or repeated from its start)."""
    return _pick(values, n) if len(values) >= n else [values[i % len(values)] for i in range(n)]


def _size(key: str, default, from_defaults: bool):
    """The tiny value of `key` (in SIZES) whose class default is `default`."""
    if not from_defaults:
        return SIZES[key]
    if key in SWITCHES or key in OPTIONAL and default in (None, 0):
        return default
    return OPTIONAL.get(key, SIZES[key])


def _shrunk_layer(values: dict, from_defaults: bool) -> dict:
    """One layer's values of a heterogeneous config, shrunk like the whole config."""
    shrunk = {key: _size(key, value, from_defaults) if key in SIZES else value for key, value in values.items()}
    if "kv_lora_rank" in values and "num_key_value_heads" in values:
        shrunk["num_key_value_heads"] = SIZES["num_attention_heads"]
    if {"head_dim", "qk_nope_head_dim", "qk_rope_head_dim"} <= set(values):  # a full-head sliding layer
        shrunk["head_dim"] = SIZES["qk_nope_head_dim"] + SIZES["qk_rope_head_dim"]
    return shrunk


def _shrunk(cls: type, layers: int, overrides: dict, from_defaults: bool) -> dict:
    """Keyword arguments that shrink `cls`'s default config (its keys only) to a tiny one."""
    defaults = cls().to_dict()
    old_layers = next((defaults[k] for k in LAYER_KEYS if isinstance(defaults.get(k), int)), None)
    # Every per-layer list (and per-layer config) keeps the same layers, chosen so that each
    # distinct combination of layer kinds survives.
    per_layer = [k for k, v in defaults.items() if isinstance(v, list) and old_layers and len(v) == old_layers]
    chosen = _pick_indices([tuple(defaults[k][i] for k in per_layer) for i in range(old_layers or 0)], layers)
    specials = iter(range(VOCAB - 1, 3, -1))
    kwargs: dict = {}
    for key, value in defaults.items():
        number = value is None or isinstance(value, int) and not isinstance(value, bool)
        if key in SIZES and (number or isinstance(value, bool)):
            kwargs[key] = _size(key, value, from_defaults)
        elif key in EXPERT_KEYS and number:
            kwargs[key] = EXPERTS
        elif key in TOP_K_KEYS and number:
            kwargs[key] = TOP_K
        elif key in LAYER_KEYS and number:
            kwargs[key] = layers
        elif key in per_layer:
            kwargs[key] = [value[i] for i in chosen]
        elif key.endswith(("token_id", "token_index")) and number and value is not None and value >= VOCAB:
            kwargs[key] = SPECIAL_TOKENS.get(key, next(specials))
        elif key == "eos_token_id" and isinstance(value, list):
            kwargs[key] = SPECIAL_TOKENS[key]
        elif key == "per_layer_config" and isinstance(value, dict):  # heterogeneous layers: shrink each
            layers_of = {str(new): value[old] for new, i in enumerate(chosen) for old in value if int(old) == i}
            kwargs[key] = {new: _shrunk_layer(values, from_defaults) for new, values in layers_of.items()} or None
    if "kv_lora_rank" in defaults:  # multi-head latent attention: as many key/value heads as query heads
        kwargs["num_key_value_heads"] = SIZES["num_attention_heads"]
    for groups in ("n_group", "num_expert_group"):
        if isinstance(defaults.get(groups), int):
            kwargs.update({groups: 2, "topk_group": 1})
    return {**kwargs, **overrides}


def _shrunk_tree(cls: type, layers: int, text: dict, from_defaults: bool) -> dict:
    """`_shrunk` for a config and, recursively, its sub-configs (towers get one small layer)."""
    names = getattr(cls, "sub_configs", None) or {}
    towers = {name: text.pop(name) for name in list(text) if name in names}  # overrides of a vision / audio tower
    kwargs = _shrunk(cls, layers, {} if "text_config" in names else text, from_defaults)
    defaults = cls()
    for name in names:
        sub = getattr(defaults, name, None)
        if isinstance(sub, PretrainedConfig):
            is_text = name == "text_config"
            kwargs[name] = {**_shrunk_tree(type(sub), layers if is_text else 1, text if is_text else {}, from_defaults), "model_type": sub.model_type}
            if not is_text:
                kwargs[name].update({k: v for k, v in TOWER_SIZES.items() if k in sub.to_dict()}, **towers.get(name, {}))
    return kwargs


def tiny_config(model_type: str, num_layers: int = LAYERS, from_defaults: bool = False, **overrides) -> PretrainedConfig:
    """The tiny config of `model_type` with `num_layers` decoder layers; `overrides` go to the text config.

    `from_defaults=True`: the class's own features, only sizes shrunk (see the module docstring).
    """
    cls = CONFIG_MAPPING[model_type]
    table = DEFAULTS_OVERRIDES if from_defaults else OVERRIDES
    text = {k: _fit(v, num_layers) if isinstance(v, list) and len(v) == LAYERS else v for k, v in table.get(model_type, {}).items()}
    return cls(**_shrunk_tree(cls, num_layers, {**text, **overrides}, from_defaults))


def _randomise(model: PreTrainedModel) -> None:
    """Random weights with distinct routing: router rows, biases and correction biases differ per expert.

    Some families initialise routers or biases to zeros (every expert ties); scales initialised
    to one stay near one so that no path is switched off.
    """
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if tensor.dim() >= 2:
                tensor.normal_(0.0, 0.2)
            elif "norm" in name:
                continue
            elif bool((tensor == 1).all()):
                tensor.add_(torch.randn_like(tensor), alpha=0.05)
            else:
                tensor.normal_(0.0, 0.05)
        for name, buffer in model.named_buffers():
            if buffer.is_floating_point() and "bias" in name.rpartition(".")[2]:
                buffer.normal_(0.0, 0.05)


def tiny_model(model_type: str, num_layers: int = LAYERS, seed: int = 0, from_defaults: bool = False, **overrides) -> PreTrainedModel:
    """A randomly initialised tiny model in eval mode, float32, with non-trivial router weights."""
    torch.manual_seed(seed)
    config = tiny_config(model_type, num_layers, from_defaults, **overrides)
    model = auto_model_class(config).from_config(config)
    _randomise(model)
    return model.eval()
