"""Runtime for compressed structures: the one piece of code shared with saved checkpoints.

This module imports only torch, so it is copied verbatim into every checkpoint that needs it
(as `moe_compress_runtime.py`, imported by the generated modelling file). moe_compress uses
the same functions for in-memory surgery: the model you compress and the model a stranger
reloads with `trust_remote_code=True` run identical code.

A structure spec (stored under `config.moe_compress`) says, per MoE layer, how many rows its
router keeps, how many routed experts keep their weights, and whether the layer
  * has *novices*: router rows that add a single vector (times the gate) instead of an expert;
  * is *condensed*: no router, every token goes through the kept experts with constant weights
    (plus the family's shared experts, which stay as they are);
  * is *dropped*: the whole MoE sub-layer contributes nothing (attention stays).

What transformers' standard per-layer schema (`per_layer_config`) can say of that -- a plain
layer's expert count, a dropped feed-forward sub-layer -- is also written there for loaders
that read it (`standard_per_layer_config`); the generated config reads it back and checks it
against the spec, and the model is built from the spec (`take_standard_structure`).
"""

from __future__ import annotations

import torch
from torch import nn


def _project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    out = x @ weight if transposed else x @ weight.T
    return out if bias is None else out + bias


def expert_forward(experts: nn.Module, expert: int, x: torch.Tensor) -> torch.Tensor:
    """f_e(x) before gating for tokens `x` [N, H], read from the fused 3-D expert weights.

    transformers 5 describes each family's expert layout with flags (transposed weights,
    biases, gated or not, the family's own `_apply_gate`); reading them gives one expert
    forward for every family.
    """
    transposed = getattr(experts, "is_transposed", False)
    has_bias = getattr(experts, "has_bias", False)
    if getattr(experts, "has_gate", True):
        bias = experts.gate_up_proj_bias[expert] if has_bias else None
        hidden = experts._apply_gate(_project(x, experts.gate_up_proj[expert], bias, transposed))
    else:
        bias = experts.up_proj_bias[expert] if has_bias else None
        hidden = experts.act_fn(_project(x, experts.up_proj[expert], bias, transposed))
    bias = experts.down_proj_bias[expert] if has_bias else None
    out = _project(hidden, experts.down_proj[expert], bias, transposed)
    if getattr(experts, "has_post_expert_norm", False):
        out = experts.post_expert_norm(out)
    return out


def resolve(root: nn.Module, dotted: str) -> nn.Module:
    for part in filter(None, dotted.split(".")):
        root = getattr(root, part)
    return root


def _resize(layer: nn.Module, tensors: list, count: int, original: int) -> None:
    """Give each (dotted name, axis) tensor `count` expert slices along its axis (values loaded later).

    A freshly built layer has `original` experts; rows beyond them (a router's shared-expert
    rows) are not experts and are kept.
    """
    for dotted, axis in tensors:
        owner_path, _, name = dotted.rpartition(".")
        owner = resolve(layer, owner_path)
        old = getattr(owner, name)
        size = count + max(old.shape[axis] - original, 0)
        if old.shape[axis] == size:
            continue
        shape = list(old.shape)
        shape[axis] = size
        new = torch.zeros(shape, dtype=old.dtype, device=old.device)
        setattr(owner, name, nn.Parameter(new, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else new)


def _set_counts(layer: nn.Module, holders: list, count: int) -> None:
    for dotted in holders:
        resolve(layer, dotted).num_experts = count


_NOVICE_CLASSES: dict[type, type] = {}


def novice_experts_class(base: type) -> type:
    """`base` experts whose router rows may point either to a kept expert or to a novice.

    `expert_slot[e]` is e's index among the kept experts, or -(j + 1) for novice row j. Kept
    experts run through the family's own (possibly fused) experts forward; a token routed to
    a novice gets gate * novice_vectors[j] added instead.
    """
    if base not in _NOVICE_CLASSES:

        def forward(self, hidden_states, top_k_index, top_k_weights):
            slot = self.expert_slot[top_k_index]
            is_novice = slot < 0
            kept_weights = top_k_weights.masked_fill(is_novice, 0)
            out = base.forward(self, hidden_states, slot.clamp(min=0), kept_weights)
            novice_weights = (top_k_weights * is_novice).unsqueeze(-1)
            novices = self.novice_vectors[(-slot - 1).clamp(min=0)]
            return out + (novice_weights * novices).sum(dim=1).to(out.dtype)

        _NOVICE_CLASSES[base] = type(f"Novice{base.__name__}", (base,), {"forward": forward, "_novice_base": base})
    return _NOVICE_CLASSES[base]


def novice_slots(novice_ids: list[int], router_experts: int) -> list[int]:
    """Each router row's slot: its index among the kept experts, or -(j + 1) for novice row j (ascending ids)."""
    novices = set(novice_ids)
    slot, kept, row = [], 0, 0
    for expert in range(router_experts):
        if expert in novices:
            row += 1
            slot.append(-row)
        else:
            slot.append(kept)
            kept += 1
    return slot


def attach_novices(experts: nn.Module, novice_ids: list[int], router_experts: int, novice_vectors: torch.Tensor) -> None:
    """Turn router rows `novice_ids` into novices; the module must already hold only kept experts."""
    slot = novice_slots(novice_ids, router_experts)
    # Persistent: transformers builds models on the meta device before loading, which would
    # lose the values of a buffer that is not in the checkpoint.
    # On a meta skeleton (a streamed run describing its output) the slot map stays real: it is structure.
    device = novice_vectors.device if novice_vectors.device.type != "meta" else "cpu"
    experts.register_buffer("expert_slot", torch.tensor(slot, dtype=torch.long, device=device))
    experts.register_buffer("novice_vectors", novice_vectors)
    experts.__class__ = novice_experts_class(getattr(type(experts), "_novice_base", type(experts)))


class ConstantRouter(nn.Module):
    """A condensed layer's router: every token goes to the same experts with fixed weights.

    After surgery the experts module holds exactly those experts, so `expert_ids` is
    0..K-1; while searching which experts to keep, ids index the full, unsliced module.
    """

    def __init__(self, weights: torch.Tensor, expert_ids: torch.Tensor | None = None):
        super().__init__()
        ids = torch.arange(weights.numel(), device=weights.device) if expert_ids is None else expert_ids
        self.register_buffer("expert_weights", weights)
        self.register_buffer("expert_ids", ids.to(device=weights.device, dtype=torch.long))

    def forward(self, hidden_states: torch.Tensor):
        tokens = hidden_states.reshape(-1, hidden_states.shape[-1]).shape[0]
        count = self.expert_weights.numel()
        index = self.expert_ids.expand(tokens, count)
        weights = self.expert_weights.to(hidden_states.dtype).expand(tokens, count)
        return torch.zeros(tokens, count, dtype=hidden_states.dtype, device=hidden_states.device), weights, index


_CONDENSED_CLASSES: dict[type, type] = {}


def condensed_experts_class(base: type) -> type:
    """`base` experts that run every token through every kept expert: a small dense layer.

    The constant router sends all tokens to all experts, so routing bookkeeping (sorting,
    grouping, scattering) is skipped and each expert is one dense matmul chain.
    """
    if base not in _CONDENSED_CLASSES:

        def forward(self, hidden_states, top_k_index, top_k_weights):
            out = torch.zeros_like(hidden_states)
            for slot in range(top_k_index.shape[-1]):
                expert = int(top_k_index[0, slot]) if top_k_index.shape[0] else slot
                out = out + top_k_weights[:, slot : slot + 1] * expert_forward(self, expert, hidden_states)
            return out

        _CONDENSED_CLASSES[base] = type(f"Condensed{base.__name__}", (base,), {"forward": forward, "_condensed_base": base})
    return _CONDENSED_CLASSES[base]


class NoRoutedExperts(nn.Module):
    """The experts module of a condensed layer that keeps no routed expert (CD-MoE-S): adds zeros.

    It holds no weights, so a checkpoint has nothing to store for it (the family's per-expert key
    layout cannot express zero experts). Empty `gate_up_proj` / `down_proj` attributes -- plain
    tensors, neither parameters nor buffers -- let structural code count its 0 experts.
    """

    def __init__(self):
        super().__init__()
        self.gate_up_proj = torch.zeros(0)
        self.down_proj = torch.zeros(0)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


def condense(block: nn.Module, router_attr: str, experts_attr: str, weights: torch.Tensor, expert_ids: torch.Tensor | None = None) -> None:
    """Replace the block's router by constant weights for `expert_ids` (default: all experts it holds).

    A block left with no routed expert gets a weightless `NoRoutedExperts`; while searching
    (`expert_ids` given) the experts module is only re-classed, so it can be restored.
    """
    setattr(block, router_attr, ConstantRouter(weights, expert_ids))
    experts = getattr(block, experts_attr)
    if expert_ids is None and weights.numel() == 0:
        setattr(block, experts_attr, NoRoutedExperts())
        return
    experts.__class__ = condensed_experts_class(getattr(type(experts), "_condensed_base", type(experts)))


class DroppedMoE(nn.Module):
    """A dropped MoE sub-layer: adds nothing to the residual stream."""

    def __init__(self, returns_tuple: bool = False):
        super().__init__()
        self.returns_tuple = returns_tuple

    def forward(self, hidden_states: torch.Tensor):
        zeros = torch.zeros_like(hidden_states)
        return (zeros, None) if self.returns_tuple else zeros


def apply_structure(model: nn.Module, spec: dict, hidden_size: int) -> None:
    """Reshape a freshly built stock model to the structure `spec` describes."""
    layers = resolve(model, spec["layers_path"])
    for index, layer_spec in spec["layers"].items():
        layer = layers[int(index)]
        if layer_spec.get("dropped"):
            setattr(layer, spec["moe_attr"], DroppedMoE(spec.get("moe_returns_tuple", False)))
            continue
        original = spec["original_num_experts"]
        _resize(layer, spec["router_tensors"], layer_spec["router"], original)
        _set_counts(layer, spec["router_count_holders"], layer_spec["router"])
        _resize(layer, spec["expert_tensors"], layer_spec["experts"], original)
        _set_counts(layer, spec["expert_count_holders"], layer_spec["experts"])
        novices = layer_spec.get("novices") or []
        if novices:
            experts = resolve(layer, spec["experts_path"])
            dtype = experts.down_proj.dtype
            vectors = torch.zeros(len(novices), hidden_size, dtype=dtype, device=experts.down_proj.device)
            attach_novices(experts, novices, layer_spec["router"], vectors)
        if layer_spec.get("condensed"):
            block = resolve(layer, spec["moe_attr"])
            experts = resolve(layer, spec["experts_path"])
            weights = torch.zeros(layer_spec["experts"], dtype=torch.float32, device=experts.down_proj.device)
            condense(block, spec["router_attr"], spec["experts_attr"], weights)


#: The skip type transformers' heterogeneous modelling gives a decoder layer's feed-forward sub-layer.
MLP_SKIP = "mlp"


def standard_per_layer_config(spec: dict) -> dict[int, dict]:
    """The part of `spec` transformers' `per_layer_config` schema can state, layer index -> overrides.

    A plain MoE layer whose routed expert count differs from the original's states it under the
    family's own config key; a dropped MoE sub-layer is `skip: ["mlp"]`. Novices and condensed
    layers have no standard form: `config.moe_compress` alone describes them.
    """
    key, original = spec["num_experts_key"], spec["original_num_experts"]
    overrides = {}
    for index, layer in spec["layers"].items():
        if layer.get("dropped"):
            overrides[int(index)] = {"skip": [MLP_SKIP]}
        elif not layer.get("novices") and not layer.get("condensed") and layer["experts"] != original:
            overrides[int(index)] = {key: layer["experts"]}
    return overrides


def take_standard_structure(config, spec: dict) -> None:
    """Check the standard per-layer structure `config` (the text config) declares against `spec`, then
    take it off the config: the stock layers are built at the original count and `apply_structure`
    reshapes them. A mismatch means the file was edited by hand: refuse rather than guess.

    Other per-layer overrides (a family's own, e.g. Gemma 4's) stay as they are. A spec marked
    `standard_per_layer_config: false` declared nothing there (its family's config class refused it).
    """
    ours = {spec["num_experts_key"], "skip"}
    declared = config.to_dict().get("per_layer_config") or {} if getattr(config, "is_heterogeneous", False) else {}
    declared = {int(index): values for index, values in declared.items()}
    stated = {index: {k: v for k, v in values.items() if k in ours} for index, values in declared.items()}
    stated = {index: values for index, values in stated.items() if values}
    expected = standard_per_layer_config(spec) if spec.get("standard_per_layer_config", True) else {}
    if stated != expected:
        raise ValueError(
            f"config.json's per_layer_config states {stated} but its moe_compress structure describes {expected}; "
            "the checkpoint's config was edited and no longer matches its weights."
        )
    if not stated:
        return
    rest = {index: {k: v for k, v in values.items() if k not in ours} for index, values in declared.items()}
    config.per_layer_config = None
    config.per_layer_config = {index: values for index, values in rest.items() if values} or None


# ---- MoNE in the expert-substitution format (vLLM PR #50415, llm-compressor PR #2906) --------
#
# The checkpoint keeps its family's architecture: full routers, each retained expert stored under
# its original id, and per substituted expert one constant [hidden] tensor, all listed under
# `compression_config.transform_config.expert_substitution` in config.json. `config.moe_compress`
# still describes the structure, with `output_format` saying the weights are laid out this way.

#: The key of `config.moe_compress` naming the checkpoint's weight layout, and its substitution value.
OUTPUT_FORMAT_KEY = "output_format"
SUBSTITUTION = "expert-substitution"
#: The only router semantics version 1 of the format has, and the ones MoNE's novices need: the
#: router keeps every row and its weights as the family computes them (its own top-k normalisation
#: included, over every picked expert, novices too); a novice adds its weight times its constant;
#: nothing is renormalised over the retained experts afterwards.
ROUTER_SEMANTICS = {"preserve_logical_expert_ids": True, "preserve_router_weights": True, "renormalize_after_substitution": False}
REPLACEMENTS = "expert_replacements"


def is_substitution(spec: object) -> bool:
    """Whether a structure spec says its checkpoint is in the expert-substitution format."""
    return isinstance(spec, dict) and spec.get(OUTPUT_FORMAT_KEY) == SUBSTITUTION


def replacement_name(experts_path: str, expert: int) -> str:
    """The checkpoint name of a substituted expert's constant, beside its experts module
    (`model.layers.1.mlp.experts` -> `model.layers.1.mlp.expert_replacements.3.value`, as llm-compressor names it)."""
    return f"{experts_path.rpartition('.')[0]}.{REPLACEMENTS}.{expert}.value"


def substitution_block(spec: dict, experts_paths: dict[int, str]) -> dict:
    """The `expert_substitution` block for the novices of `spec`, each MoE layer's experts module named
    `experts_paths[layer]` in the checkpoint; layers without novices are not targets."""
    targets = {}
    for index, layer in spec["layers"].items():
        novices = layer.get("novices") or []
        if novices:
            path = experts_paths[int(index)]
            replacements = {str(e): {"format": "constant-v1", "tensors": {"value": replacement_name(path, e)}} for e in novices}
            targets[path] = {"num_logical_experts": layer["router"], "weight_layout": "compact_retained_experts", "replacements": replacements}
    return {"version": 1, "router_semantics": dict(ROUTER_SEMANTICS), "targets": targets}


def declared_substitution(config) -> object:
    """What `config.compression_config.transform_config.expert_substitution` holds (None if absent)."""
    compression = getattr(config, "compression_config", None)
    transform = compression.get("transform_config") if isinstance(compression, dict) else None
    return transform.get("expert_substitution") if isinstance(transform, dict) else None


def check_substitution(config, spec: dict) -> None:
    """Refuse a checkpoint whose declared substitution is not exactly what its structure spec describes:
    its config was edited (or written by another tool, whose names this code does not read)."""
    declared = declared_substitution(config)
    targets = declared.get("targets") if isinstance(declared, dict) else None
    paths = {}
    for path in targets if isinstance(targets, dict) else []:
        indices = [int(part) for part in path.split(".") if part.isdigit()]
        if len(indices) == 1:
            paths[indices[0]] = path
    try:
        expected = substitution_block(spec, paths)
    except KeyError:  # a layer with novices has no target
        expected = None
    if declared != expected:
        raise ValueError(
            "config.json's compression_config.transform_config.expert_substitution does not match its moe_compress structure "
            f"(expected {expected}); the checkpoint's config was edited and no longer matches its weights."
        )
