"""Mixed precision for the routed experts: a bit width per MoE layer, or per expert (`quantize(expert_bits=...)`).

Why: a rarely routed or low-saliency expert can be kept at fewer bits instead of being removed,
and a budget search (`fit`) trades widths against expert counts layer by layer.

How it is written: compressed-tensors config groups, one per bit width, whose targets are the
checkpoint's module names as `re:` patterns -- one per experts module and width, naming the
experts at that width (`re:^model\\.layers\\.3\\.mlp\\.experts\\.(?:0|5)\\.`, or `\\d+` for all of
them) -- so the config itself says which module has which scheme, for compressed-tensors and
vLLM alike; the default width's group also targets `Linear` when other decoder weights are
quantised (scope "all"), and experts left at 16 bits are `ignore`d.

transformers (5.23) dequantises every routed expert of a compressed-tensors checkpoint with one
scheme (`get_experts_scheme`: one group for all experts), and cannot mix packed experts with
plain ones in a layer. So a checkpoint whose experts differ in width also records the width of
every expert (`config.moe_compress["expert_bits"]`) and carries the generated modelling code,
whose conversions dequantise each expert by its own width before stacking them
(`source/templates/mixed_bits.py.tmpl`): it loads with `from_pretrained(path, trust_remote_code=True)`.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping

from ..errors import MoECompressError

#: What `expert_bits` maps: decoder layer index -> one width for its routed experts, or {expert: width}.
ExpertBits = dict[int, int | dict[int, int]]
#: The widths an expert may take; 16 leaves it as stored.
WIDTHS = (4, 8, 16)


def _is_index(value: object) -> bool:
    return type(value) is int and value >= 0


def check_expert_bits(expert_bits: Mapping) -> None:
    """The widths and the kinds of index, before any model is read."""
    for layer, value in expert_bits.items():
        if not _is_index(layer):
            raise MoECompressError(f"expert_bits is keyed by decoder layer index (0, 1, ...); got {layer!r}.")
        named = value.items() if isinstance(value, Mapping) else [(None, value)]
        for expert, width in named:
            where = f"layer {layer}" + ("" if expert is None else f", expert {expert!r}")
            if expert is not None and not _is_index(expert):
                raise MoECompressError(f"expert_bits: experts are numbered 0, 1, ... within their layer; got {where}.")
            if type(width) is not int or width not in WIDTHS:
                raise MoECompressError(f"expert_bits widths must be 4, 8 or 16 (16: left as stored); got {width!r} for {where}.")


def resolve_expert_bits(expert_bits: Mapping, experts: Mapping[int, int], layers: int, default: int) -> dict[int, tuple[int, ...]]:
    """Every MoE layer -> the width of each of its routed experts: `default` unless `expert_bits` names it.

    `experts`: MoE layer -> the routed experts it has; `layers`: how many decoder layers there are.
    """
    check_expert_bits(expert_bits)
    for layer, value in expert_bits.items():
        if layer >= layers:
            raise MoECompressError(f"expert_bits names layer {layer}, but the model has {layers} decoder layers (0-{layers - 1}).")
        if layer not in experts:
            raise MoECompressError(f"expert_bits names layer {layer}, which has no routed experts; name MoE layers ({', '.join(map(str, sorted(experts)))}).")
        count = experts[layer]
        outside = sorted(e for e in (value if isinstance(value, Mapping) else {}) if e >= count)
        if outside:
            raise MoECompressError(f"expert_bits names expert {outside[0]} of layer {layer}, which has {count} routed experts (0-{count - 1}).")

    def width(layer: int, expert: int) -> int:
        value = expert_bits.get(layer, default)
        return value.get(expert, default) if isinstance(value, Mapping) else value

    return {layer: tuple(width(layer, e) for e in range(count)) for layer, count in experts.items()}


def bits_histogram(widths: tuple[int, ...]) -> dict[int, int]:
    """A layer's widths as {width: how many experts}, widest first (what `stages.sizes` counts bytes from)."""
    return {w: widths.count(w) for w in sorted(set(widths), reverse=True)}


def expert_of(key: str) -> tuple[str, int]:
    """(the experts module's checkpoint name, the expert) of a per-expert checkpoint key:
    `model.layers.3.mlp.experts.5.down_proj.weight` -> (`model.layers.3.mlp.experts`, 5).

    Every per-expert key transformers writes (and `sink.per_expert` writes for families that fuse
    experts on disk) puts the expert's number after the layer's, as the last numeric part.
    """
    parts = key.split(".")
    position = max(i for i, part in enumerate(parts) if part.isdigit())
    return ".".join(parts[:position]), int(parts[position])


def key_widths(expert_keys: Mapping[str, int], widths: Mapping[int, tuple[int, ...]]) -> dict[str, int]:
    """Each routed-expert checkpoint weight (key -> its decoder layer) -> its width.

    Refuses a family whose keys do not number every expert of a layer, rather than guess.
    """
    found: dict[int, set[int]] = defaultdict(set)
    result = {}
    for key, layer in expert_keys.items():
        _, expert = expert_of(key)
        found[layer].add(expert)
        if expert < len(widths.get(layer, ())):
            result[key] = widths[layer][expert]
    unclear = sorted(layer for layer in set(widths) | set(found) if found.get(layer, set()) != set(range(len(widths.get(layer, ())))))
    if unclear:
        raise MoECompressError(
            f"cannot tell the routed experts of layer {unclear[0]} apart by their checkpoint keys; quantise this family without expert_bits."
        )
    return result


def _patterns(modules: Mapping[str, set[int]], everyone: Mapping[str, set[int]]) -> list[str]:
    """`re:` patterns naming these experts of each experts module (`\\d+` where they are all of its experts)."""
    patterns = []
    for prefix, experts in sorted(modules.items()):
        chosen = r"\d+" if experts == everyone[prefix] else "(?:" + "|".join(map(str, sorted(experts))) + ")"
        patterns.append(f"re:^{re.escape(prefix)}\\.{chosen}\\.")
    return patterns


def bit_groups(widths: Mapping[str, int], default: int, others: bool) -> tuple[dict[int, list[str]], list[str]]:
    """(width -> the targets of its config group, the patterns of the experts left at 16 bits for `ignore`).

    `widths`: routed-expert checkpoint key -> width; `others`: weights besides the experts are
    quantised at `default` (scope "all"), which its group then also targets as `Linear`.
    """
    by_width: dict[int, dict[str, set[int]]] = defaultdict(lambda: defaultdict(set))
    everyone: dict[str, set[int]] = defaultdict(set)
    for key, width in widths.items():
        prefix, expert = expert_of(key)
        by_width[width][prefix].add(expert)
        everyone[prefix].add(expert)
    targets = {width: _patterns(by_width[width], everyone) for width in sorted(by_width) if width != 16}
    if others:
        targets[default] = ["Linear", *targets.get(default, [])]
    return dict(sorted(targets.items())), _patterns(by_width[16], everyone) if 16 in by_width else []
