"""Building the families table: every MoE model type of the installed transformers, as discovery sees it.

Each row comes from building that type's default config on the meta device and running the
same discovery the pipeline uses, so the table (printed by `moe-compress families`, and the
README's copy of it from `moe-compress families --markdown`) cannot drift from the code.
"""

from __future__ import annotations

from torch import nn

from ..errors import MoECompressError
from .adapter import MoEAdapter, text_config
from .catalog import build_skeleton, probe_config, standard_moe_model_types
from .families import REFUSED
from .family_table import FamilyRow
from .registry import get_adapter


def experts_stored_per_expert(model: nn.Module, adapter: MoEAdapter) -> bool:
    """Whether the family's checkpoints keep one 2-D tensor per expert (transformers fuses them on load).

    Asked of transformers' own save-time key conversion, on a meta tensor: no weights needed.
    """
    from transformers.core_model_loading import revert_weight_conversion

    layers = adapter.decoder_layers(model)
    experts = adapter.experts(adapter.moe_block(layers[adapter.moe_layer_indices(model)[0]]))
    name = next(n for n, m in model.named_modules() if m is experts) + ".down_proj"
    converted = revert_weight_conversion(model, {name: experts.down_proj.detach().to("meta")})
    return all(tensor.dim() == 2 for tensor in converted.values())


def unloadable_when_packed(model: nn.Module) -> str | None:
    """Why transformers could not load `model` from a packed checkpoint, or None.

    On load, transformers dequantises a packed weight before the family's own conversion of it
    runs, by adding the packed tensors to that conversion's sources; a conversion that splits
    one stored weight into several (inkling_mm_model's fused dense MLP) then becomes a
    many-to-many conversion, which transformers 5.23 refuses for every checkpoint of the family.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter

    for converter in get_model_conversion_mapping(model, add_legacy=False):
        sources, targets = converter._original_source_patterns, converter._original_target_patterns
        if (isinstance(converter, WeightConverter) and len(targets) > 1 and all(s.endswith(".weight") for s in sources)
                and not any(op.supports_many_to_many for op in converter.operations)):
            return f"its weight conversion splits {', '.join(sources)} into {', '.join(targets)}, which transformers cannot do for packed weights"
    return None


def describe_router(adapter: MoEAdapter, config) -> str:
    parts = [adapter.router_score]
    if isinstance(adapter.renormalize, str):
        parts.append(f"renormalised if {adapter.renormalize}")
    elif adapter.renormalize:
        parts.append("renormalised")
    names = [name for name, _ in adapter.router_expert_tensors + adapter.block_expert_tensors]
    if any("correction" in n or "expert_bias" in n for n in names):
        parts.append("correction bias" + (" on softmax" if adapter.gates_use_softmax_bias else ""))
    if "bias" in names:
        parts.append("logit bias")
    if any("scale" in n for n in names):
        parts.append("per-expert scale")
    groups, _ = adapter.routing_groups(config)
    if adapter.group_keys is not None:
        parts.append(f"group-limited ({groups} groups)" if groups > 1 else "group-limited when n_group > 1")
    if adapter.router_output == "probs":
        parts.append("returns probabilities")
    return ", ".join(parts)


def describe_shared(adapter: MoEAdapter) -> str:
    if not adapter.shared_expert_attrs:
        return "none"
    if not adapter.moe_attr:
        return "dense MLP beside the experts: " + ", ".join(adapter.shared_expert_attrs)
    gated = [a for a in adapter.shared_expert_attrs if a.endswith("gate")]
    return ", ".join(a for a in adapter.shared_expert_attrs if a not in gated) + (" (sigmoid gate)" if gated else "")


def describe_outputs(model: nn.Module, adapter: MoEAdapter) -> str:
    """Outputs plain `from_pretrained` loads; everything else (non-uniform, novices, condensed) loads as remote code."""
    problem = unloadable_when_packed(model)
    if problem:
        return f"uniform prune, block drop (quantize refused: {problem})"
    if experts_stored_per_expert(model, adapter):
        return "uniform prune, block drop, quantize"
    return "uniform prune, block drop (quantize: experts fused 3-D on disk, packed one weight per expert, loads with trust_remote_code)"


def describe_notes(adapter: MoEAdapter, config) -> str:
    notes = []
    kinds = getattr(text_config(config), "layer_types", None)
    if isinstance(kinds, list) and len(set(kinds)) > 1 and any("linear" in str(k) or "mamba" in str(k) for k in kinds):
        notes.append("hybrid: " + " / ".join(sorted(set(map(str, kinds)))))
    if adapter.multimodal:
        notes.append("multimodal wrapper: calibration is text-only")
    if adapter.layer_state:
        notes.append("layers hand " + ", ".join(name for _, name in adapter.layer_state) + " to the next")
    if not adapter.moe_attr:
        notes.append("experts inside the decoder layer (no MoE-only drop)")
    return "; ".join(notes)


def family_row(model_type: str) -> FamilyRow:
    if model_type in REFUSED:
        return FamilyRow(model_type, False, REFUSED[model_type])
    try:
        config = probe_config(model_type)
        skeleton = build_skeleton(config)
        adapter = get_adapter(skeleton)
    except MoECompressError as refused:
        return FamilyRow(model_type, False, str(refused))
    except Exception as error:  # a default config transformers itself cannot build
        return FamilyRow(model_type, True, f"(default config does not build: {type(error).__name__})")
    return FamilyRow(
        model_type, True, "", describe_router(adapter, config), describe_shared(adapter), describe_outputs(skeleton, adapter),
        describe_notes(adapter, config),
    )


def compute_family_rows() -> list[FamilyRow]:
    """Build every row now (`listings.family_rows` keeps them)."""
    return [family_row(t) for t in sorted(set(standard_moe_model_types()) | set(REFUSED))]
