"""The common path shared by every architecture family.

An adapter answers structural questions about a model (where are the decoder layers, which
of them are MoE, where is the router) without per-family code paths. Its fields are found by
`discovery.discover` from the module tree and the config class; `families.py` only corrects
the few facts that differ from the common shapes.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from ..errors import MoECompressError
from .layout import find_decoder_layers

#: How router outputs become the probabilities p_t: "softmax" over experts, or an elementwise
#: function (any `transformers.activations.ACT2FN` name, "sigmoid" for DeepSeek-V3-style routers).
RouterScore = str
RouterOutput = Literal["logits", "probs"]


@dataclass(frozen=True)
class ExpertTensor:
    """A tensor of an MoE block that has one slice per routed expert along `axis`.

    Some routers keep rows beyond the routed experts (shared-expert rows, a skip expert); those
    trailing rows are not experts: slicing keeps them after the kept experts.
    """

    module: nn.Module
    name: str
    axis: int

    @property
    def value(self) -> torch.Tensor:
        return getattr(self.module, self.name)


class TextOnlyCalibrationWarning(UserWarning):
    """Calibration of a vision-language model with text alone."""


def warn_if_text_only(adapter: "MoEAdapter") -> None:
    """Say that a multimodal model is being calibrated on text: experts that serve image tokens look unused."""
    if adapter.multimodal:
        warnings.warn(
            f"{adapter.model_type} is a multimodal model and calibration here is text only: experts that mostly "
            "serve image, video or audio tokens score low and may be removed; the vision/audio towers are kept as they are.",
            TextOnlyCalibrationWarning,
            stacklevel=3,
        )


def text_config(config: PretrainedConfig) -> PretrainedConfig:
    """The config that holds the language model's MoE keys (the text config of a multimodal wrapper)."""
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def config_value(config: PretrainedConfig, key: str, default=None):
    """`config.<key>`; for a value that heterogeneous configs set per layer, the per-layer values as a list."""
    try:
        return getattr(config, key, default)
    except RuntimeError as error:  # transformers refuses a global read of a value that differs per layer
        if "per-layer" not in str(error):
            raise
        values = config.to_dict()
        overrides = values.get("per_layer_config") or {}
        return [overrides.get(str(i), {}).get(key, values[key]) for i in range(values["num_hidden_layers"])]


def resolve(root: nn.Module, dotted: str) -> nn.Module | None:
    """The submodule at `dotted` ("" is `root` itself), or None when any part is missing."""
    for part in filter(None, dotted.split(".")):
        root = getattr(root, part, None)
        if root is None:
            return None
    return root


@dataclass(frozen=True)
class MoEAdapter:
    """How one architecture family lays out its MoE blocks.

    Attributes:
        model_type: the transformers `model_type` this adapter handles.
        num_experts_key: config key (of the text config) holding the number of routed experts.
        top_k_key: config key holding the number of experts each token is routed to.
        moe_attr: dotted path from a decoder layer to its MoE block ("" when the layer holds
            router and experts itself, as Gemma 4 does).
        router_attr / experts_attr: attributes of the MoE block holding router and experts.
        shared_expert_attrs: attributes of the MoE block holding always-on experts (and gates).
        router_score: how router logits become the probabilities p_t (see `RouterScore`).
        group_keys: config keys (number of groups, groups per token) of group-limited routing.
        router_expert_tensors: (dotted name under the router, axis) of router tensors indexed by
            expert; names that a model does not have are skipped, so optional biases can be listed.
        moe_returns_tuple: the MoE block returns (hidden, router scores).
        pre_moe_norm_attr: the norm whose input is the residual stream entering the MoE.
        layers_path: dotted path from the model to its decoder layers ("" = `get_decoder().layers`).
        block_expert_tensors: (dotted name under the MoE block, axis) of expert-indexed tensors the
            block keeps outside its router (a correction bias passed to the router, say).
        router_output: whether the router's first output is logits or already probabilities.
        renormalize: whether the top-k gates are renormalised to sum to one: True/False, or the
            config key that decides it (e.g. "norm_topk_prob").
        group_score_experts: how many best experts score a group in group-limited routing
            (DeepSeek-V3 sums the best two; DeepSeek-V2 takes the best one).
        gates_use_softmax_bias: a correction bias is added to *softmax* probabilities before
            top-k (Ernie 4.5), so removing any expert can change which experts are chosen.
        multimodal: the language model runs inside a multimodal wrapper.
        layer_state: what each decoder layer returns beside its hidden states and the next
            layer takes as a keyword: (index in the returned tuple, keyword), e.g. GLM-5's
            sparse-attention indices ((1, "prev_topk_indices"),).
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
    moe_returns_tuple: bool = False
    pre_moe_norm_attr: str = "post_attention_layernorm"
    layers_path: str = ""
    block_expert_tensors: tuple[tuple[str, int], ...] = ()
    router_output: RouterOutput = "logits"
    renormalize: bool | str = False
    group_score_experts: int = 1
    gates_use_softmax_bias: bool = False
    multimodal: bool = False
    layer_state: tuple[tuple[int, str], ...] = ()

    # ---- structure -------------------------------------------------------------------
    def decoder_layers(self, model: PreTrainedModel) -> nn.ModuleList:
        layers = resolve(model, self.layers_path) if self.layers_path else None
        if isinstance(layers, nn.ModuleList):
            return layers
        return find_decoder_layers(model)[1]  # a model wrapped differently than the one discovered

    def moe_block(self, layer: nn.Module) -> nn.Module | None:
        """The layer's MoE block, or None for a dense layer (dense first layers, mlp_only_layers)."""
        block = resolve(layer, self.moe_attr)
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
        """Experts per token, as the config states it (transformers fills in the config class's
        default for a config.json without the key); refused where neither gives a value, since
        every budget and plan depends on it."""
        target = text_config(config)
        value = config_value(target, self.top_k_key) if self.top_k_key else None
        if value is None or isinstance(value, (list, tuple)) and None in value:
            key = self.top_k_key or "num_experts_per_tok"
            raise MoECompressError(
                f"the {self.model_type} config states no top-k: its config.json has no {key!r} and {type(target).__name__} "
                f"has no default; add \"{key}\": <experts each token is routed to> (the model's published value) to config.json."
            )
        return int(max(value) if isinstance(value, (list, tuple)) else value)

    def config_num_experts(self, config: PretrainedConfig) -> int:
        """The routed expert count the config states (the largest, where layers differ)."""
        value = config_value(text_config(config), self.num_experts_key)
        return int(max(value) if isinstance(value, (list, tuple)) else value)

    def set_config_num_experts(self, config: PretrainedConfig, count: int) -> None:
        """Every MoE layer of the config gets `count` experts, per-layer overrides included.

        Heterogeneous configs (Gemma 4, Dots3) may give single layers their own expert count
        under `per_layer_config`; those entries change with the global one.
        """
        target = text_config(config)
        per_layer = target.to_dict().get("per_layer_config") if getattr(target, "is_heterogeneous", False) else None
        overridden = per_layer and any(self.num_experts_key in values for values in per_layer.values())
        if overridden:
            target.per_layer_config = None
        value = config_value(target, self.num_experts_key)
        # A per-layer list stays a list; its entries all become `count`.
        setattr(target, self.num_experts_key, [count] * len(value) if isinstance(value, (list, tuple)) else count)
        if overridden:
            key = self.num_experts_key
            target.per_layer_config = {i: {k: count if k == key else v for k, v in values.items()} for i, values in per_layer.items()}

    def routing_groups(self, config: PretrainedConfig) -> tuple[int, int]:
        """(number of expert groups, groups each token may use); (1, 1) when routing is not group-limited."""
        config = text_config(config)
        if self.group_keys is None or getattr(config, "topk_method", None) == "greedy":
            return 1, 1
        n_group, topk_group = (getattr(config, key, None) for key in self.group_keys)
        if not n_group or n_group <= 1:
            return 1, 1
        return int(n_group), int(topk_group or n_group)

    def renormalizes_top_k(self, config: PretrainedConfig) -> bool:
        """Whether the router rescales the chosen experts' gates to sum to one (times any scaling factor)."""
        if isinstance(self.renormalize, bool):
            return self.renormalize
        return bool(getattr(text_config(config), self.renormalize, False))

    def gates_depend_only_on_chosen(self, config: PretrainedConfig) -> bool:
        """Whether a token's gates and choices are unchanged when experts it never chooses are removed.

        True for elementwise scores (sigmoid) and for softmax routers that renormalise over the
        chosen experts; false for a plain softmax over all experts, and for a correction bias
        added to softmax probabilities before top-k.
        """
        if self.gates_use_softmax_bias:
            return False
        return self.router_score != "softmax" or self.renormalizes_top_k(config)

    def require_separate_moe(self) -> None:
        """MoE sub-layers can be dropped only where the MoE is a module of its own in the decoder layer."""
        if not self.moe_attr:
            raise MoECompressError(
                f"{self.model_type} runs its experts inside the decoder layer, beside the dense MLP: "
                "its MoE sub-layer cannot be dropped on its own; drop whole blocks instead."
            )

    # ---- routing ---------------------------------------------------------------------
    def router_probs(self, logits: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The full router distribution p_t over all experts, before top-k, computed in `dtype`.

        `logits` is the router's first output; routers that return probabilities already
        (Gemma 4) are passed through. The observer asks for float64: its statistics sum p_t
        over every calibration token, and float32 rounding there could decide a near-tie.
        """
        logits = logits.to(dtype)
        if self.router_output == "probs":
            return logits
        if self.router_score == "softmax":
            return torch.softmax(logits, dim=-1)
        if self.router_score == "sigmoid":
            return torch.sigmoid(logits)
        from transformers.activations import ACT2FN

        return ACT2FN[self.router_score](logits)

    # ---- surgery support -------------------------------------------------------------
    def router_tensors(self, block: nn.Module) -> list[ExpertTensor]:
        """Tensors indexed by routed expert on the routing side (router weight, biases), with their axis."""
        found = []
        for root, specs in ((self.router(block), self.router_expert_tensors), (block, self.block_expert_tensors)):
            for dotted, axis in specs:
                path, _, name = dotted.rpartition(".")
                owner = resolve(root, path)
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
        """Number of router rows for routed experts (equals num_experts unless pruned experts became novices)."""
        router = self.router(block)
        weights = getattr(router, "expert_weights", None)
        if isinstance(weights, torch.Tensor):  # a condensed layer's constant router
            return int(weights.numel())
        # The expert-indexed router tensor with the fewest rows: weights may carry extra rows
        # (shared experts, a skip expert) after the routed ones, biases never do.
        sizes = [t.value.shape[t.axis] for t in self.router_tensors(block)]
        return int(min(sizes))

    def count_holders(self, block: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
        """(router-side, experts-side) modules caching an expert count in `num_experts`.

        The block itself counts as router-side: where it caches the count, it shapes the
        router's logits with it (Ernie 4.5 VL).
        """
        experts = self.experts(block)

        def holds(module: nn.Module) -> bool:
            value = getattr(module, "num_experts", None)
            return isinstance(value, int) and not isinstance(value, bool)

        routing = [m for m in (block, *self.router(block).modules()) if m is not experts and holds(m)]
        return routing, [experts] if holds(experts) else []
