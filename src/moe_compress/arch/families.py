"""The supported architecture families: each states only how it differs from the common path.

transformers 5 gives every family here the same MoE shape -- a router module returning
``(logits, top_k_weights, top_k_index)`` and an experts module with fused 3-D weights -- so
an adapter is a handful of names: where the MoE block, router and shared experts live, which
config keys hold the expert count and top-k, and how the router turns logits into scores.
"""

from __future__ import annotations

from .adapter import MoEAdapter

FAMILIES: tuple[MoEAdapter, ...] = (
    # Mixtral, GPT-OSS and Granite take the softmax over the top-k (= renormalised probabilities),
    # Ernie divides by the top-k sum; DeepSeek-V2 never renormalises (its config flag is unused).
    MoEAdapter("mixtral", num_experts_key="num_local_experts", topk_renormalised=True),
    MoEAdapter(
        "qwen2_moe",
        num_experts_key="num_experts",
        shared_expert_attrs=("shared_expert", "shared_expert_gate"),
    ),
    MoEAdapter("qwen3_moe", num_experts_key="num_experts"),
    MoEAdapter("olmoe", num_experts_key="num_experts"),
    MoEAdapter(
        "deepseek_v2",
        num_experts_key="n_routed_experts",
        shared_expert_attrs=("shared_experts",),
        group_keys=("n_group", "topk_group"),
        topk_renormalised=False,
    ),
    MoEAdapter(
        "deepseek_v3",
        num_experts_key="n_routed_experts",
        shared_expert_attrs=("shared_experts",),
        router_score="sigmoid",
        group_keys=("n_group", "topk_group"),
    ),
    MoEAdapter(
        "glm4_moe",
        num_experts_key="n_routed_experts",
        shared_expert_attrs=("shared_experts",),
        router_score="sigmoid",
        group_keys=("n_group", "topk_group"),
    ),
    MoEAdapter("gpt_oss", num_experts_key="num_local_experts", router_attr="router", moe_returns_tuple=True, topk_renormalised=True),
    MoEAdapter(
        "ernie4_5_moe",
        num_experts_key="moe_num_experts",
        top_k_key="moe_k",
        shared_expert_attrs=("shared_experts",),
        # Ernie keeps its correction bias as a [1, E] parameter in a sub-module of the router.
        router_expert_tensors=(("weight", 0), ("moe_statics.e_score_correction_bias", 1)),
        topk_renormalised=True,
    ),
    MoEAdapter("granitemoe", num_experts_key="num_local_experts", moe_attr="block_sparse_moe", router_attr="router", topk_renormalised=True),
)
