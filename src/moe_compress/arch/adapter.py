"""The common path shared by every architecture family.

An adapter answers structural questions about a model (where are the decoder layers, which
of them are MoE, where is the router) without any per-family code paths: the families differ
only in the attribute names and config keys declared in `families.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

RouterScore = Literal["softmax", "sigmoid"]


@dataclass(frozen=True)
class ExpertTensor:
    """A tensor of an MoE block that has one slice per routed expert along `axis`."""

    module: nn.Module
    name: str
    axis: int

    @property
    def value(self) -> torch.Tensor:
        return getattr(self.module, self.name)


@dataclass(frozen=True)
class MoEAdapter:
    """How one architecture family lays out its MoE blocks.

    Attributes:
        model_type: the transformers `model_type` this adapter handles.
        num_experts_key: config key holding the number of routed experts per MoE layer.
        top_k_key: config key holding the number of experts each token is routed to.
        moe_attr: attribute of a decoder layer that holds its feed-forward block.
        router_attr / experts_attr: attributes of the MoE block holding router and experts.
        shared_expert_attrs: attributes of the MoE block holding always-on experts (and gates).
        router_score: how router logits become the probabilities p_t (softmax or sigmoid).
        group_keys: config keys (number of groups, groups per token) of group-limited routing.
        router_expert_tensors: (dotted name, axis) of router tensors indexed by expert; names
            that a model does not have are skipped, so optional biases can be listed.
        topk_renormalised: whether the router divides the selected experts' probabilities by
            their sum (True / False), or None when the config's `norm_topk_prob` says so.
    """

    model_type: str
    num_experts_key: str
    top_k_key: str = "num_experts_per_tok"
    moe_attr: str = "mlp"
    router_attr: str = "gate"
    experts_attr: str = "experts"
    shared_expert_attrs: tuple[str, ...] = ()
    router_score: RouterScore = "softmax"
    group_keys: tuple[str, str] | None = None
    router_expert_tensors: tuple[tuple[str, int], ...] = (("weight", 0), ("bias", 0), ("e_score_correction_bias", 0))
    moe_returns_tuple: bool = False  # the MoE block returns (hidden, router scores)
    pre_moe_norm_attr: str = "post_attention_layernorm"  # its input is the residual stream before the MoE
    topk_renormalised: bool | None = None

    # ---- structure -------------------------------------------------------------------
    def decoder_layers(self, model: PreTrainedModel) -> nn.ModuleList:
        return model.get_decoder().layers

    def moe_block(self, layer: nn.Module) -> nn.Module | None:
        """The layer's MoE block, or None for a dense layer (dense first layers, mlp_only_layers)."""
        block = getattr(layer, self.moe_attr, None)
        experts = getattr(block, self.experts_attr, None)
        if experts is None or not hasattr(experts, "gate_up_proj") and not hasattr(experts, "up_proj"):
            return None
        return block

    def moe_layer_indices(self, model: PreTrainedModel) -> list[int]:
        return [i for i, layer in enumerate(self.decoder_layers(model)) if self.moe_block(layer) is not None]

    def router(self, block: nn.Module) -> nn.Module:
        return getattr(block, self.router_attr)

    def experts(self, block: nn.Module) -> nn.Module:
        return getattr(block, self.experts_attr)

    def shared_experts(self, block: nn.Module) -> list[nn.Module]:
        return [m for m in (getattr(block, a, None) for a in self.shared_expert_attrs) if m is not None]

    def num_experts(self, block: nn.Module) -> int:
        experts = self.experts(block)
        weight = experts.gate_up_proj if hasattr(experts, "gate_up_proj") else experts.up_proj
        return int(weight.shape[0])

    # ---- config ----------------------------------------------------------------------
    def top_k(self, config: PretrainedConfig) -> int:
        return int(getattr(config, self.top_k_key))

    def config_num_experts(self, config: PretrainedConfig) -> int:
        return int(getattr(config, self.num_experts_key))

    def set_config_num_experts(self, config: PretrainedConfig, count: int) -> None:
        setattr(config, self.num_experts_key, count)

    def routing_groups(self, config: PretrainedConfig) -> tuple[int, int]:
        """(number of expert groups, groups each token may use); (1, 1) when routing is not group-limited."""
        if self.group_keys is None or getattr(config, "topk_method", None) == "greedy":
            return 1, 1
        n_group, topk_group = (getattr(config, key, None) for key in self.group_keys)
        if not n_group or n_group <= 1:
            return 1, 1
        return int(n_group), int(topk_group or n_group)

    # ---- routing ---------------------------------------------------------------------
    def renormalises_topk(self, config: PretrainedConfig) -> bool:
        """Whether the gates the model applies are its top-k probabilities renormalised to sum to 1."""
        if self.topk_renormalised is not None:
            return self.topk_renormalised
        return bool(getattr(config, "norm_topk_prob", False))

    def router_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The full router distribution p_t over all experts, before top-k (float32)."""
        logits = logits.float()
        return torch.sigmoid(logits) if self.router_score == "sigmoid" else torch.softmax(logits, dim=-1)

    # ---- surgery support -------------------------------------------------------------
    def router_tensors(self, block: nn.Module) -> list[ExpertTensor]:
        """Router tensors indexed by routed expert (weight, biases), with their expert axis."""
        found = []
        for dotted, axis in self.router_expert_tensors:
            *path, name = dotted.split(".")
            owner = self.router(block)
            for part in path:
                owner = getattr(owner, part, None)
            if owner is not None and isinstance(getattr(owner, name, None), torch.Tensor):
                found.append(ExpertTensor(owner, name, axis))
        return found

    def routed_expert_tensors(self, block: nn.Module) -> list[ExpertTensor]:
        """The routed experts' fused weights (and biases); expert axis 0."""
        experts = self.experts(block)
        return [ExpertTensor(experts, name, 0) for name, _ in experts.named_parameters(recurse=False)]

    def expert_tensors(self, block: nn.Module) -> list[ExpertTensor]:
        """Every tensor of the block that is indexed by routed expert, with its expert axis."""
        return self.router_tensors(block) + self.routed_expert_tensors(block)

    def router_size(self, block: nn.Module) -> int:
        """Number of router rows (equals num_experts unless pruned experts became novices)."""
        router = self.router(block)
        weight = getattr(router, "weight", None)
        return int(weight.shape[0] if weight is not None else router.expert_weights.numel())

    def count_holders(self, block: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
        """(router-side, experts-side) modules caching an expert count in `num_experts`."""
        has_count = lambda m: isinstance(getattr(m, "num_experts", None), int)  # noqa: E731
        return [m for m in (self.router(block),) if has_count(m)], [m for m in (self.experts(block),) if has_count(m)]
