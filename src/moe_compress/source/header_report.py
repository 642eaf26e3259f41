"""`inspect`'s report from config.json and the shard headers alone: no torch, no transformers.

Importing those two takes several seconds, longer than `inspect` may take; the report needs
only names, shapes and dtypes, which the headers hold, and the family's key layout
(`source.key_layout`), learned from its modelling code once. The numbers are those the meta
skeleton gives (`arch.size.structure_report`): a stored tensor has the numel of the
parameter it fills, a tied one counts once, a computed rotary buffer is sized by the rule its
family was learned with.

Anything this reading cannot vouch for returns None, and `inspect` asks the modelling code
instead, which gives the same report or the error the user must see: a Hub id, code in the
checkpoint, a quantised or moe-compress-structured checkpoint, a multimodal wrapper, a family
not learned yet, a key the layout does not know, top-k or the expert count left to the config
class's default, a router whose stored size is not the config's, integer or FP8 tensors, a
shard whose header is malformed or whose offsets do not tile it.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..arch.parts import ModelSize, layer_row, report
from ..errors import MoECompressError
from .headers import TensorInfo, offset_fault, read_header, shard_files
from .key_layout import config_value, known_layout, pattern, rotary_entries, stock
from .locate import resolve_model

#: --dtype values, and config.json's dtype names, with their element bytes.
COMPUTE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
FLOATS = ("F32", "BF16", "F16")


def _json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def header_tensors(directory: Path) -> dict[str, TensorInfo] | None:
    """Every tensor of the checkpoint's shards, from their headers; None where a header is malformed
    or its offsets do not tile the shard (`Checkpoint` then refuses it, naming the fault)."""
    tensors = {}
    try:
        for shard in shard_files(directory):
            _, header = read_header(shard)
            if offset_fault(shard):
                return None
            for key, entry in header.items():
                if key != "__metadata__":
                    tensors[key] = TensorInfo(shard, entry["dtype"], tuple(entry["shape"]))
    except (MoECompressError, OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    return tensors if tensors else None


def stock_checkpoint(model: str) -> tuple[Path, dict] | None:
    """(directory, config.json) of a local stock checkpoint whose files run no code; else None."""
    try:
        source = Path(resolve_model(model))
    except MoECompressError:
        return None
    stored = _json(source / "config.json") if source.is_dir() else None
    if stored is None or not stock(stored):
        return None
    tokenizer = _json(source / "tokenizer_config.json") if (source / "tokenizer_config.json").exists() else {}
    return None if tokenizer is None or tokenizer.get("auto_map") else (source, stored)


def structure_from_headers(model: str, dtype: str = "auto") -> dict | None:
    """The report `arch.size.structure_report` gives for `model`, or None (see the module docstring)."""
    found = stock_checkpoint(model)
    layout = known_layout(found[1]["model_type"]) if found else None
    if layout is None:
        return None
    source, stored = found
    names = layout["names"]
    layers, top_k, experts, tie = (config_value(stored, names[k]) for k in ("num_hidden_layers", "top_k", "num_experts", "tie_word_embeddings"))
    compute = dtype if dtype != "auto" else config_value(stored, ["dtype", "torch_dtype"])
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (layers, top_k, experts)):
        return None
    if not isinstance(tie, bool) or compute not in COMPUTE_BYTES:
        return None
    tensors = header_tensors(source)
    return None if tensors is None else _count(model, layout, stored, tensors, (layers, top_k, experts, tie), compute)


def _count(model: str, layout: dict, stored: dict, tensors: dict[str, TensorInfo], numbers: tuple, compute: str) -> dict | None:
    layers, top_k, experts, tie = numbers
    size = ModelSize(top_k=top_k, num_layers=layers)
    routed = [0] * layers
    shared: list[set[str]] = [set() for _ in range(layers)]
    seen, routers = [False] * layers, [0] * layers
    prefix = layout["layer_prefix"]
    for key, info in tensors.items():
        entry = layout["keys"].get(pattern(key))
        index = key[len(prefix):].split(".", 1)[0] if key.startswith(prefix) else ""
        layer = int(index) if index.isdigit() else None
        if layer is not None and layer >= layers:
            continue  # a layer beyond the decoder's (multi-token prediction): carried, not counted
        if entry is None or info.dtype not in FLOATS:
            return None
        kind, role, element, shared_attr = entry
        if kind == "carried" or tie and key in layout["tied"]:
            continue
        size.bytes += info.numel * (COMPUTE_BYTES[compute] if element == "compute" else element)
        if layer is not None:
            seen[layer] = True
        router = layout["routers"].get(pattern(key))
        if router is not None:
            axis, extra = router
            if layer is None or len(info.shape) <= axis or info.shape[axis] - extra != experts:
                return None  # the stored router is not the config's size: the modelling code says so
            routers[layer] += 1
        if kind != "param":
            continue
        setattr(size, role, getattr(size, role) + info.numel)
        if role == "routed_experts" and layer is not None:
            routed[layer] += info.numel
        if shared_attr and layer is not None:
            shared[layer].add(shared_attr)
    if not all(seen) or any(bool(routed[i]) != bool(routers[i]) for i in range(layers)):
        return None
    for rotary in layout["rotary"]:
        counts = {rotary_entries(stored, rule, layout["absent"]) for rule in rotary["rules"]}
        if len(counts) != 1 or None in counts:
            return None
        size.bytes += counts.pop() * rotary["bytes"]
    rows = []
    for index in range(layers):
        moe = routed[index] > 0
        if moe:
            size.experts_per_layer[index] = experts
            size.active_per_token += round(routed[index] * min(top_k, experts) / experts)
        rows.append(layer_row(index, moe, experts if moe else 0, len(shared[index]) if moe else 0))
    size.active_per_token += size.attention + size.shared_experts + size.router + size.other
    return report(model, layout["adapter_model_type"], f"torch.{compute}", rows, size)
