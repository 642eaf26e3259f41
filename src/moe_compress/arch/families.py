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
    "zaya": "its router has an extra skip expert beside the routed ones and carries router states from layer to layer",
    "qwen3_omni_moe": "thinker and talker are two MoE models in one checkpoint and no transformers Auto class loads "
    "the pair; compress the thinker (qwen3_omni_moe_thinker)",
    "openai_privacy_filter": "a token classifier, not a language model",
}

#: Adapter fields discovery cannot read from code or config, per model type: (fields, what differs).
OVERRIDES: dict[str, tuple[dict, str]] = {
    "flex_olmo": ({"pre_moe_norm_attr": ""}, "post-norm layers: the MoE reads the residual stream itself"),
}

#: Config values a model type's default config lacks, so that its skeleton can be built for the
#: families table (the defaults leave them None): (values, what is missing).
PROBE_CONFIG: dict[str, tuple[dict, str]] = {}
