"""Find a model's MoE layout from its module tree and config, instead of listing families.

transformers 5 gives every MoE family it ships one experts module (decorated with
`use_experts_implementation`: fused 3-D `gate_up_proj` / `down_proj`, or `up_proj` when not
gated), and its routers share a few shapes: a `[E, H]` weight (or a Linear to E outputs),
optional biases and correction biases with one entry per expert, and a forward returning
(logits, top-k weights, top-k indices). From those shapes we find the decoder layers, the MoE
block, router, experts and shared experts, and which tensors are indexed by expert. How the
router scores (softmax or sigmoid, renormalised or not, group-limited) is read from the
router's code and the config class. Everything here works on a model built on the meta
device: only shapes, names and code are read, never weight values.
"""

from __future__ import annotations

import ast
import functools
import inspect
import re
import textwrap
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

from ..errors import MoECompressError
from .adapter import MoEAdapter, config_value, resolve, text_config
from .layout import experts_in, find_decoder_layers

#: Config keys that hold the routed expert count / top-k, most specific first. Aliases in a
#: config class's `attribute_map` resolve to the key it stores.
EXPERT_COUNT_KEYS = ("n_routed_experts", "num_experts", "num_local_experts", "moe_num_experts")
TOP_K_KEYS = ("num_experts_per_tok", "moe_k", "moe_topk", "top_k_experts", "num_experts_per_token", "moe_top_k")
GROUP_KEYS = ("n_group", "topk_group")
#: Config keys that choose an elementwise score function where the router's code defers to the config.
SCORE_KEYS = ("scoring_func", "expert_selection_fn", "score_func")
#: Preferred names of the norm in front of the MoE, when the layer's code does not tell.
NORM_NAMES = ("pre_feedforward_layernorm", "pre_mlp_layernorm", "pre_ff_layernorm", "ffn_norm", "post_attention_layernorm", "norm")


@functools.cache
def _class_source(cls: type) -> str:
    """The class's code without comments or docstrings (comments mention functions they do not call). Cached per class:
    reading and parsing the source costs a few tens of milliseconds, and every command asks for its adapter several times."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return ""
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
            node.body = body[1:] or [ast.Pass()]
    return ast.unparse(tree)


@functools.cache
def _method_tree(cls: type, name: str) -> ast.Module | None:
    """The parsed code of `cls.name`: an empty module where its source cannot be read, None where it does not parse.
    Cached per class, as `_class_source`; callers only read the tree."""
    method = getattr(cls, name, None)
    method = getattr(method, "__wrapped__", method)
    try:
        return ast.parse(textwrap.dedent(inspect.getsource(method)))
    except (OSError, TypeError):
        return ast.parse("")
    except SyntaxError:
        return None


def _returns_tuple(cls: type) -> bool:
    """Whether `cls.forward` returns a tuple (GPT-OSS's MoE block returns (hidden, router scores))."""
    tree = _method_tree(cls, "forward")
    if tree is None:
        return False
    return any(isinstance(node, ast.Return) and isinstance(node.value, ast.Tuple) for node in ast.walk(tree))


def _first_returned_name(cls: type) -> str:
    tree = _method_tree(cls, "forward")
    if tree is None:
        return ""
    for node in ast.walk(tree):
        if isinstance(node, ast.Return) and isinstance(node.value, ast.Tuple) and node.value.elts:
            return ast.unparse(node.value.elts[0])
    return ""


def _config_value(config: PretrainedConfig, keys: tuple[str, ...]) -> tuple[str, object] | None:
    for key in keys:
        value = getattr(config, key, None)
        if value is not None:
            return config.attribute_map.get(key, key), value
    return None


def _canonical_key(config: PretrainedConfig, keys: tuple[str, ...], wanted: set[int]) -> str | None:
    """The stored config key among `keys` whose value is one of `wanted` (else the first present)."""
    present = []
    for key in keys:
        value = config_value(config, key)
        canonical = config.attribute_map.get(key, key)
        if value is None and canonical in config.to_dict():  # a key the config class has, left unset
            present.append(canonical)
        if isinstance(value, bool) or not isinstance(value, (int, list, tuple)):
            continue
        values = set(value) if isinstance(value, (list, tuple)) else {value}
        if values & wanted:
            return canonical
        present.append(canonical)
    return present[0] if present else None


def _tensors(module: nn.Module, recurse: bool = True) -> list[tuple[str, torch.Tensor]]:
    return list(module.named_parameters(recurse=recurse)) + list(module.named_buffers(recurse=recurse))


def _expert_axis(shape: torch.Size, sizes: set[int], name: str) -> int | None:
    axes = [axis for axis, size in enumerate(shape) if size in sizes]
    if not axes:
        return None
    if len(axes) > 1 and len(shape) == 2 and shape[0] in sizes:
        return 0  # a router weight [E, H] where H happens to equal E
    if len(axes) > 1:
        raise MoECompressError(f"cannot tell which axis of {name} {tuple(shape)} is the expert axis.")
    return axes[0]


def _find_router(block: nn.Module, experts: nn.Module, num_experts: int, hidden: int) -> tuple[str, nn.Module, int]:
    """(attribute, module, rows) of the block's router: the child holding an [E(+extra), H] weight."""
    from ..runtime import ConstantRouter

    candidates = []
    for name, child in block.named_children():
        if child is experts:
            continue
        if isinstance(child, ConstantRouter):
            return name, child, num_experts
        for _, tensor in _tensors(child):
            if tensor.dim() == 2 and tensor.shape[1] == hidden and num_experts <= tensor.shape[0] < 2 * num_experts:
                named = name in ("gate", "router") or "router" in type(child).__name__.lower()
                candidates.append((not named, name, child, int(tensor.shape[0])))
                break
    if not candidates:
        raise MoECompressError(f"{type(block).__name__} has no router with one [experts, hidden] weight row per expert.")
    _, name, child, rows = min(candidates, key=lambda c: c[0])
    return name, child, rows


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def _shared_experts(block: nn.Module, skip: set[int]) -> tuple[str, ...]:
    """Children that run for every token beside the routed experts: MLPs (with a down projection) and their gates."""
    found = []
    for name, child in block.named_children():
        if id(child) in skip or _is_norm(child):
            continue
        if hasattr(child, "down_proj"):
            found.append(name)
        elif isinstance(child, nn.Linear) and child.out_features == 1:
            found.append(name)
    return tuple(found)


def _self_calls(node: ast.AST) -> list[ast.Call]:
    """Calls of `self.<name>(...)` under `node`, in source order."""
    calls = [n for n in ast.walk(node) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)]
    calls = [c for c in calls if isinstance(c.func.value, ast.Name) and c.func.value.id == "self"]
    return sorted(calls, key=lambda c: (c.lineno, c.col_offset))


def _pre_moe_norm(layer: nn.Module, moe_attr: str) -> str:
    """The norm the layer applies to the MoE block's input, read from the layer's code.

    Either the norm called inside the MoE call (`self.mlp(self.ffn_norm(h))`) or the last norm
    called before it; "" when the layer calls none (post-norm or hyper-connection layers).
    """
    norms = {name for name, child in layer.named_children() if _is_norm(child)}
    first = moe_attr.split(".")[0]
    tree = _method_tree(type(layer), "forward")
    calls = _self_calls(tree) if tree is not None and first else []
    moe_call = next((c for c in calls if c.func.attr == first), None)
    if moe_call is not None:
        inside = [c.func.attr for c in _self_calls(moe_call) if c.func.attr in norms]
        before = [c.func.attr for c in calls if c.func.attr in norms and (c.lineno, c.col_offset) < (moe_call.lineno, moe_call.col_offset)]
        if inside or before:
            return (inside or before)[-1]
    return next((name for name in NORM_NAMES if name in norms), "") if moe_call is None else ""


def _router_facts(router: nn.Module, config: PretrainedConfig) -> dict:
    """How the router scores and gates, from its code and the config class."""
    source = _class_source(type(router))
    uses_sigmoid, uses_softmax = "sigmoid" in source, "softmax" in source
    facts: dict = {}
    if uses_sigmoid != uses_softmax:
        facts["router_score"] = "sigmoid" if uses_sigmoid else "softmax"
    else:
        chosen = _config_value(config, SCORE_KEYS)
        if chosen is not None:
            facts["router_score"] = str(chosen[1])
    if re.search(r"config\.norm_topk_prob\b", source):
        facts["renormalize"] = "norm_topk_prob"
    else:
        topk, softmax = source.find("topk("), source.find("softmax(")
        # A sum over the chosen gates, or a softmax over the top-k logits, renormalises them.
        facts["renormalize"] = ".sum(" in source or 0 <= topk < softmax
    facts["group_score_experts"] = 2 if ".topk(2" in source else 1
    if "prob" in _first_returned_name(type(router)).lower():
        facts["router_output"] = "probs"
    return facts


def _layer_state(stack_owner: nn.Module) -> tuple[tuple[int, str], ...]:
    """What a decoder layer hands to the next one besides the hidden states.

    GLM-5's sparse-attention layers return (hidden, top-k indices) and the next layer takes the
    indices as `prev_topk_indices`: read from the stack owner's loop, `h, x = layer(h, ..., key=x)`
    gives ((1, "key"),). The layer-by-layer pipeline must carry these along.
    """
    tree = _method_tree(type(stack_owner), "forward")
    if tree is None:
        return ()
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and isinstance(node.targets[0], ast.Tuple)):
            continue
        if not isinstance(node.value.func, ast.Name):  # the loop variable over the layers, not a helper method
            continue
        names = [ast.unparse(t) for t in node.targets[0].elts]
        passed = {ast.unparse(k.value): k.arg for k in node.value.keywords if k.arg}
        state = tuple((i, passed[name]) for i, name in enumerate(names) if i > 0 and name in passed)
        if state:
            return state
    return ()


def _int_tensors(module: nn.Module) -> list[str]:
    return [name for name, t in _tensors(module) if not t.is_floating_point() and not t.is_complex()]


@dataclass
class _Reference:
    """The MoE layer discovery reads names and shapes from: the first one with a real router."""

    layer: nn.Module
    moe_attr: str
    experts_attr: str
    block: nn.Module
    experts: nn.Module
    router_attr: str
    router: nn.Module
    num_experts: int  # experts holding weights
    routed: int  # router rows for routed experts (more than `num_experts` where experts became novices)
    rows: int  # rows of the router weight (routed ones plus any extra, e.g. shared-expert rows)


def _reference_layer(layers: nn.ModuleList, model_type: str, hidden: int) -> _Reference:
    from ..runtime import ConstantRouter, DroppedMoE

    reference = None
    for layer in layers:
        found = experts_in(layer)
        if len(found) > 1:
            raise MoECompressError(
                f"model type {model_type!r} has {len(found)} routed-expert modules per decoder layer "
                f"({', '.join(n for n, _ in found)}); only one set of routed experts per layer can be pruned."
            )
        if not found or isinstance(layer, DroppedMoE):
            continue
        experts_path, experts = found[0]
        block_path, _, experts_attr = experts_path.rpartition(".")
        block = resolve(layer, block_path)
        num_experts = int(experts.down_proj.shape[0])
        slots = getattr(experts, "expert_slot", None)
        routed = int(slots.numel()) if isinstance(slots, torch.Tensor) else num_experts
        router_attr, router, rows = _find_router(block, experts, routed, hidden)
        reference = _Reference(layer, block_path, experts_attr, block, experts, router_attr, router, num_experts, routed, rows)
        if not isinstance(router, ConstantRouter):
            break
    if reference is None:
        raise MoECompressError(f"model type {model_type!r}: no decoder layer holds routed experts.")
    return reference


def discover(model: nn.Module, model_type: str, config: PretrainedConfig | None = None, overrides: dict | None = None) -> MoEAdapter:
    """The adapter for `model` (real or meta weights), found from its structure and config."""
    from ..runtime import ConstantRouter
    from .catalog import is_multimodal

    config = config if config is not None else model.config
    tconfig = text_config(config)
    layers_path, layers = find_decoder_layers(model)
    ref = _reference_layer(layers, model_type, int(tconfig.hidden_size))
    if ids := _int_tensors(ref.router):
        raise MoECompressError(
            f"model type {model_type!r} routes some tokens by a fixed table of expert ids ({ref.router_attr}.{ids[0]}, "
            "hash routing): removing experts would break that table, so it cannot be pruned."
        )
    sizes = {ref.num_experts, ref.routed}
    router_specs = tuple((name, _expert_axis(t.shape, sizes | {ref.rows}, name)) for name, t in _tensors(ref.router))
    block_specs = tuple((name, _expert_axis(t.shape, sizes, name)) for name, t in _tensors(ref.block, recurse=False))
    fields: dict = dict(
        model_type=model_type,
        num_experts_key=_canonical_key(tconfig, EXPERT_COUNT_KEYS, sizes) or "",
        top_k_key=_canonical_key(tconfig, TOP_K_KEYS, {getattr(ref.router, "top_k", -1)}) or "",
        moe_attr=ref.moe_attr,
        router_attr=ref.router_attr,
        experts_attr=ref.experts_attr,
        shared_expert_attrs=_shared_experts(ref.block, {id(ref.experts), id(ref.router)}),
        router_expert_tensors=tuple((n, a) for n, a in router_specs if a is not None),
        block_expert_tensors=tuple((n, a) for n, a in block_specs if a is not None),
        moe_returns_tuple=bool(ref.moe_attr) and _returns_tuple(type(ref.block)),
        pre_moe_norm_attr=_pre_moe_norm(ref.layer, ref.moe_attr),
        layers_path=layers_path,
        layer_state=_layer_state(resolve(model, layers_path.rpartition(".")[0])),
        multimodal="language_model" in layers_path.split(".") or is_multimodal(config),
    )
    if isinstance(ref.router, ConstantRouter):  # every MoE layer is condensed: the structure spec names the router
        fields["router_attr"] = (getattr(config, "moe_compress", None) or {}).get("router_attr", ref.router_attr)
    else:
        fields.update(_router_facts(ref.router, tconfig))
        grouped = any(getattr(ref.router, key, None) is not None for key in ("num_group", "n_group"))
        if grouped and all(getattr(tconfig, key, None) is not None for key in GROUP_KEYS):
            fields["group_keys"] = GROUP_KEYS
    biases = [name for name, _ in fields["router_expert_tensors"] + fields["block_expert_tensors"]]
    fields["gates_use_softmax_bias"] = fields.get("router_score", "softmax") == "softmax" and any(
        "correction" in name or "expert_bias" in name for name in biases
    )
    fields.update(overrides or {})
    missing = [what for key, what in (("num_experts_key", "expert count"), ("top_k_key", "top-k")) if not fields[key]]
    if missing:
        raise MoECompressError(f"model type {model_type!r}: no config key holds its {' or '.join(missing)}.")
    return MoEAdapter(**fields)


def discover_from_config(config: PretrainedConfig, model_type: str, overrides: dict | None = None) -> MoEAdapter:
    """Discovery from a config alone: the model skeleton is built on the meta device (no weights)."""
    from .catalog import build_skeleton

    return discover(build_skeleton(config), model_type, config, overrides)
