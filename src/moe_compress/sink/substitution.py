"""MoNE written in the expert-substitution format that vLLM PR #50415 reads and llm-compressor PR #2906 writes.

The checkpoint keeps its family's architecture (model type, class, config): every router keeps all
its rows, each retained expert is stored one tensor per projection under its *original* id, and
each substituted expert (a MoNE novice) is one [hidden] constant, named in config.json's
`compression_config.transform_config.expert_substitution` (`runtime.substitution_block`). A
serving engine that reads the block adds router weight x constant for a substituted route and runs
the retained experts compactly; nothing of moe-compress is needed there. transformers loads it
with `trust_remote_code=True` through the generated `MoECompressSubstituted...` class.

The in-memory model is the one MoNE always builds (kept experts compact, `novice_vectors` and the
`expert_slot` map on the experts module); `SubstitutionTransform` lays its checkpoint tensors out
in this format on their way to disk: kept experts renumbered to their original ids, the novice
vectors split into one named constant per expert, the slot map (structure) left out. The router
semantics of the format are MoNE's own (see `runtime.ROUTER_SEMANTICS`), so the reloaded model
computes exactly what the in-memory one does.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from transformers import PreTrainedModel

from ..arch.adapter import MoEAdapter
from ..arch.table import experts_stored_per_expert
from ..errors import MoECompressError
from ..runtime import is_substitution, replacement_name, substitution_block
from ..source.remote_code import EXPERT_BITS_KEY, PER_EXPERT_KEY
from ..source.residency import layers_prefix

NOVICE_VECTORS = "novice_vectors"
EXPERT_SLOT = "expert_slot"


def check_substitutable(model: PreTrainedModel, adapter: MoEAdapter, rewritten: bool = False) -> None:
    """Refuse what the format cannot hold: it keeps the family's architecture and full-precision experts, and
    serving engines read its retained experts one tensor each (vLLM refuses fused expert tensors).
    `rewritten`: the save rewrites the tensors on their way to disk (quantisation packs them)."""
    spec = model.config.moe_compress
    original = spec["original_num_experts"]
    for index, layer in spec["layers"].items():
        novices = layer.get("novices") or []
        plain = layer.get("router") == original and layer.get("experts", 0) + len(novices) == original
        if layer.get("dropped") or layer.get("condensed") or not plain:
            raise MoECompressError(
                f"the expert-substitution output keeps the family's architecture, but MoE layer {index} is not a MoNE layer "
                f"({layer}): only MoNE plans (and layers they leave whole) can be written in it; use the default output."
            )
    if rewritten or spec.get(PER_EXPERT_KEY) or spec.get(EXPERT_BITS_KEY) or getattr(model.config, "quantization_config", None):
        raise MoECompressError("the expert-substitution output holds unquantised experts (vLLM refuses quantised ones); "
                               "quantise the default MoNE output instead.")
    if not experts_stored_per_expert(model, adapter):
        raise MoECompressError(f"{adapter.model_type} stores its routed experts fused on disk, and the expert-substitution format "
                               "(vLLM) reads retained experts one tensor each; use the default output for this family.")


def experts_checkpoint_paths(model: PreTrainedModel, adapter: MoEAdapter) -> dict[int, str]:
    """Each MoE layer's experts module, named as the family's checkpoints name it (transformers' save-time
    renaming of the in-memory name, asked on a meta tensor: Mixtral's `mlp` is `block_sparse_moe` on disk)."""
    from transformers.core_model_loading import revert_weight_conversion

    prefix, experts_path = layers_prefix(model, adapter), model.config.moe_compress["experts_path"]
    paths = {}
    for index in (int(i) for i, layer in model.config.moe_compress["layers"].items() if layer.get("novices")):
        name = f"{prefix}.{index}.{experts_path}.{NOVICE_VECTORS}"
        (stored,) = revert_weight_conversion(model, {name: torch.empty(0, device="meta")})
        paths[index] = stored.removesuffix(f".{NOVICE_VECTORS}")
    return paths


class SubstitutionTransform:
    """Checkpoint tensors of a MoNE model -> the substitution layout (see the module docstring)."""

    def __init__(self, spec: dict, paths: dict[int, str]):
        self.layouts = []
        for index, path in paths.items():
            layer = spec["layers"][str(index)]
            kept = [e for e in range(layer["router"]) if e not in set(layer["novices"])]
            self.layouts.append((path, re.compile(rf"^{re.escape(path)}\.(\d+)\."), kept, layer["novices"]))

    def __call__(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        laid_out = dict(tensors)
        for path, expert_key, kept, novices in self.layouts:
            if f"{path}.{NOVICE_VECTORS}" not in laid_out:
                continue  # another group: a layer's tensors come in one group
            vectors = laid_out.pop(f"{path}.{NOVICE_VECTORS}")
            laid_out.pop(f"{path}.{EXPERT_SLOT}")
            renamed = {}
            for key, tensor in laid_out.items():
                found = expert_key.match(key)
                renamed[expert_key.sub(f"{path}.{kept[int(found.group(1))]}.", key, count=1) if found else key] = tensor
            laid_out = renamed
            for row, expert in enumerate(novices):
                laid_out[replacement_name(path, expert)] = vectors[row].contiguous()
        return laid_out


def substitution_output(model: PreTrainedModel, rewritten: bool = False) -> tuple[SubstitutionTransform, dict] | None:
    """The transform and config block that write `model` in the substitution format, if its structure asks for
    it (None otherwise); refused when the format cannot hold it (`check_substitutable`)."""
    from ..arch.registry import get_adapter

    if not is_substitution(getattr(model.config, "moe_compress", None)):
        return None
    adapter = get_adapter(model)
    check_substitutable(model, adapter, rewritten)
    paths = experts_checkpoint_paths(model, adapter)
    return SubstitutionTransform(model.config.moe_compress, paths), substitution_block(model.config.moe_compress, paths)


def write_substitution_config(directory: Path, block: dict) -> None:
    """Declare the substitution in the saved config.json, where vLLM and llm-compressor look for it."""
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.setdefault("compression_config", {}).setdefault("transform_config", {})["expert_substitution"] = block
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
