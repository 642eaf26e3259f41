"""How a family's checkpoint keys map to the parts `inspect` counts, learned once from its modelling code.

`inspect` answers from config.json and the shard headers (`source.header_report`): importing
torch and transformers alone takes longer than the whole answer may. The headers give every
stored tensor's name, dtype and shape; what they cannot say is the family's: which key is
attention, a routed expert, the router or a shared expert; which are buffers, kept in float32
whatever the model's dtype, tied to another, or read by nothing; and how large the rotary
frequencies are that the modelling code computes rather than stores. That is learned here
from the family's meta skeleton and transformers' own key conversion (the ones streaming
uses), the first time a checkpoint of the family is inspected, and kept under its model type
(`remembered`: keyed by this code and the transformers installed).

A layout is plain JSON: key patterns (numeric path parts as '#') with their part, and the
config keys to read. Learning declines (None) wherever the headers could not give the same
report -- a tensor whose size conversion changes, a state entry no key fills, computed
buffers inside the layers or of a size no rule below reproduces -- and such a family is
always inspected with the modelling code.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..remembered import recall, remember

TABLE = "key-layouts"
#: Keys of config.json that make a checkpoint something other than a stock one of its family.
NOT_STOCK = ("auto_map", "quantization_config", "moe_compress", "text_config", "vision_config", "audio_config", "per_layer_config")
#: Config keys the rotary rules read (`rotary_entries`).
ROTARY_KEYS = ("head_dim", "hidden_size", "num_attention_heads", "qk_rope_head_dim", "partial_rotary_factor", "rope_parameters")
RULES = ("head_dim", "qk_rope_head_dim")


class _Unknown(Exception):
    """A config key the rule needs is absent where the learned layout had it (its default was never checked)."""


def pattern(key: str) -> str:
    """`key` with each numeric path part (layer, expert) replaced by '#'."""
    return ".".join("#" if part.isdigit() else part for part in key.split("."))


def stock(stored: dict) -> bool:
    """Whether config.json describes a stock, text-only checkpoint of a transformers family."""
    model_type = stored.get("model_type")
    return isinstance(model_type, str) and not model_type.startswith("moe_compress_") and not any(stored.get(k) for k in NOT_STOCK)


def config_value(stored: dict, names: list[str]):
    """The first of `names` (a key and its aliases) config.json states, or None."""
    return next((stored[name] for name in names if name in stored), None)


def rotary_entries(stored: dict, rule: str, absent: list[str] | None = None) -> int | None:
    """Entries of a rotary frequency buffer under `rule`, as transformers computes them
    (`arange(0, dim, 2)`), from config.json; None where it cannot tell. `absent`: the rotary keys
    config.json lacked when the layout was learned, the only ones that may be missing now."""

    def get(key: str):
        if key in stored:
            return stored[key]
        if absent is not None and key not in absent:
            raise _Unknown(key)
        return None

    try:
        if rule == "qk_rope_head_dim":
            dim = get("qk_rope_head_dim")
        else:
            hidden, heads = get("hidden_size"), get("num_attention_heads")
            head_dim = get("head_dim") or (hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads else None)
            rope = get("rope_parameters")
            factor = rope.get("partial_rotary_factor") if isinstance(rope, dict) and "partial_rotary_factor" in rope else get("partial_rotary_factor")
            dim = int(head_dim * (1.0 if factor is None else factor))
        return len(range(0, dim, 2)) if isinstance(dim, int) and dim > 0 else None
    except (_Unknown, TypeError, ValueError):
        return None


def known_layout(model_type: str) -> dict | None:
    return next((row for row in recall(TABLE) or [] if row.get("model_type") == model_type), None)


def keep_layout(layout: dict) -> None:
    """Store `layout`; one learned before for the same model type gains its key patterns when all else agrees."""
    rows = [row for row in recall(TABLE) or [] if row.get("model_type") != layout["model_type"]]
    before = known_layout(layout["model_type"])
    same = before is not None and {k: v for k, v in before.items() if k not in ("keys", "routers")} == {
        k: v for k, v in layout.items() if k not in ("keys", "routers")}
    if same:
        for field in ("keys", "routers"):
            if any(before[field].get(p, value) != value for p, value in layout[field].items()):
                return  # a pattern means something else in this checkpoint: keep what was learned first
            layout = {**layout, field: {**before[field], **layout[field]}}
    remember(TABLE, [*rows, layout])


def learn_layout(source: str | Path, config) -> dict | None:
    """The layout of `config`'s family, as the checkpoint at `source` stores it; None where the
    headers could not give the report the modelling code gives (see the module docstring)."""
    stored = json.loads((Path(source) / "config.json").read_text())
    if not stock(stored):
        return None
    try:
        return _learn(Path(source), config, stored)
    except Exception:  # noqa: BLE001 -- an optimisation only: what it cannot handle stays with the modelling code
        return None


def _learn(source: Path, config, stored: dict) -> dict | None:
    import copy

    import torch

    from ..arch.catalog import auto_model_class
    from ..arch.registry import get_adapter
    from .checkpoint import Checkpoint
    from .load import meta_skeleton
    from .residency import StreamedWeights, layers_prefix, module_names

    # bfloat16, so that a tensor transformers keeps in float32 is told apart from the compute dtype.
    model = meta_skeleton(auto_model_class(config), copy.deepcopy(config), torch.bfloat16, False)
    weights = StreamedWeights(model, Checkpoint(source))
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    mapped = type(model.config).attribute_map  # aliases transformers maps onto a config key

    def names(key: str) -> list[str]:
        return [key, *(alias for alias, target in mapped.items() if target == key)]

    top_k, experts, count, tie = (names(k) for k in (adapter.top_k_key, adapter.num_experts_key, "num_hidden_layers", "tie_word_embeddings"))
    if config_value(stored, count) != len(layers) or not isinstance(config_value(stored, tie), bool):
        return None
    state = model.state_dict(keep_vars=True)
    params = {name for name, _ in model.named_parameters()}
    tied = dict(type(model)._tied_weights_keys or {})
    if set(model.all_tied_weights_keys) != (set(tied) if config_value(stored, tie) else set()):
        return None
    roles, shared_attr, routers = {}, {}, {}
    module_name = module_names(model)
    for layer in layers:
        attention = getattr(layer, "self_attn", None)  # as `arch.size.model_size` counts it (None in a Mamba layer)
        for name in weights.state_names(attention) if attention is not None else []:
            roles.setdefault(name, "attention")
        block = adapter.moe_block(layer)
        if block is None:
            continue
        if adapter.num_experts(block) != config_value(stored, experts):
            return None
        for name in weights.state_names(adapter.experts(block)):
            roles.setdefault(name, "routed_experts")
        for attr in adapter.shared_expert_attrs:
            if getattr(block, attr, None) is not None:
                for name in weights.state_names(getattr(block, attr)):
                    roles.setdefault(name, "shared_experts")
                    shared_attr.setdefault(name, attr)
        for name in weights.state_names(adapter.router(block)):
            roles.setdefault(name, "router")
        for tensor in adapter.router_tensors(block):
            keys = weights.targets.get(f"{module_name[id(tensor.module)]}.{tensor.name}".lstrip("."), [])
            if len(keys) != 1:
                return None
            shape = weights.checkpoint.tensors[keys[0]].shape
            routers[pattern(keys[0])] = [tensor.axis, shape[tensor.axis] - adapter.num_experts(block)]
    state_prefix = layers_prefix(model, adapter) + "."
    prefixes, entries = set(), {}
    for name, value in state.items():
        keys = weights.targets.get(name, [])
        if not keys:
            if name in model.all_tied_weights_keys:
                continue
            return None  # a state entry no stored key fills: the skeleton counts it, the headers cannot
        if sum(weights.checkpoint.tensors[key].numel for key in keys) != value.numel():
            return None
        kind = "param" if name in params or name in tied else "buffer"
        dtype = "compute" if value.dtype == torch.bfloat16 else value.element_size()
        entry = [kind, roles.get(name, "other"), dtype, shared_attr.get(name, "")]
        for key in keys:
            if name.startswith(state_prefix):
                index = name[len(state_prefix):].split(".", 1)[0]
                parts = key.split(".")
                prefixes.add(".".join(parts[: parts.index(index)]) + "." if index in parts else None)
            if entries.setdefault(pattern(key), entry) != entry:
                return None
    if len(prefixes) != 1 or None in prefixes:
        return None
    prefix = prefixes.pop()
    for key in weights.carried:
        inside = key.startswith(prefix) and key[len(prefix):].split(".", 1)[0].isdigit()
        if not (inside and int(key[len(prefix):].split(".", 1)[0]) >= len(layers)):  # not a layer beyond the decoder (MTP)
            if entries.setdefault(pattern(key), ["carried", "", "", ""]) != ["carried", "", "", ""]:
                return None
    rotary = []
    for name, buffer in model.named_buffers():
        if name in state:
            continue
        rules = [rule for rule in RULES if rotary_entries(stored, rule) == buffer.numel()]
        if name.startswith(state_prefix) or not rules:
            return None
        rotary.append({"rules": rules, "bytes": buffer.element_size()})
    return {
        "model_type": stored["model_type"], "adapter_model_type": adapter.model_type, "layer_prefix": prefix,
        "names": {"top_k": top_k, "num_experts": experts, "num_hidden_layers": count, "tie_word_embeddings": tie},
        "tied": sorted(tied), "rotary": rotary, "absent": sorted(k for k in ROTARY_KEYS if k not in stored),
        "keys": entries, "routers": routers,
    }
