"""How a packed (quantised) checkpoint stores what transformers cannot load packed in the family's own layout.

Fused expert tensors are stored one 2-D weight per expert where the family fuses them on disk;
tensors whose stock conversion transformers cannot run after its dequantisation keep their
in-memory names (`unpackable_conversions`).

A packed (quantised) checkpoint needs every quantised weight to be a 2-D Linear weight: that
is what compressed-tensors packs and what transformers unpacks on load. Most families store
their experts that way already (transformers fuses the per-expert keys on load), but some
(gpt_oss, granitemoe, the Qwen3-VL-MoE, Gemma 4 and Aria wrappers, ...) store each projection
of all experts as one 3-D tensor, and no loader reads a packed 3-D tensor. For those, each
expert's slice is written as its own `<experts>.<e>.<projection>.weight`, [out, in] as a
Linear keeps it (a transposed family's [in, out] slice is transposed), and the checkpoint's
config lists the tensors so split (`per_expert_tensors` in `config.moe_compress`): the
generated modelling code then registers the conversion that stacks them back on load
(`MoECompressPerExpert...` in `templates/modeling_moe_compress.py.tmpl`), after transformers
has dequantised each expert the way it does for every family stored per expert.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from transformers import PreTrainedModel

from ..arch.adapter import MoEAdapter
from ..arch.structure import structure_spec
from .export import Group
from ..source.remote_code import EXPERT_BITS_KEY, PER_EXPERT_KEY
from ..source.residency import layers_prefix


def expert_key(name: str, expert: int) -> str:
    """The key of one expert's slice of the fused tensor `name` (`...experts.down_proj` -> `...experts.3.down_proj.weight`)."""
    owner, _, attr = name.rpartition(".")
    return f"{owner}.{expert}.{attr}.weight"


def split_experts(tensors: dict[str, torch.Tensor], fused: dict[str, bool]) -> dict[str, torch.Tensor]:
    """In-memory tensors with each one named in `fused` (name -> stored [E, in, out]) replaced by its experts' [out, in] slices."""
    split: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if name not in fused:
            split[name] = tensor
            continue
        for expert, value in enumerate(tensor):
            split[expert_key(name, expert)] = value.T if fused[name] else value
    return split


def unpackable_conversions(model: PreTrainedModel, names: Iterable[str], experts: set[str]) -> set[str]:
    """In-memory tensor names whose checkpoint form transformers could not load from a packed checkpoint.

    On load, transformers prepends its dequantisation to every weight conversion whose sources
    are `.weight` keys (to dequantise packed experts before it stacks them); that step only
    passes packed tensors on, so such a conversion of anything but the routed experts gets
    nothing (kimi_linear's q/k/v conv1d concatenation, minimax_m3_vl's gate/up concatenation)
    or the wrong shape. These tensors are stored under their in-memory names, which load as
    they are, without any conversion.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter

    reverse = [converter.reverse_transform() for converter in get_model_conversion_mapping(model, add_legacy=False)
               if isinstance(converter, WeightConverter) and all(s.endswith(".weight") for s in converter._original_source_patterns)]
    return {name for name in names if name not in experts and any(c.rename_source_key(name)[1] is not None for c in reverse)}


def stored_groups(groups: Iterable[Group], fused: dict[str, bool], own_names: set[str]) -> Iterator[Group]:
    """The writer's groups with the `fused` tensors split per expert and the `own_names` tensors kept under
    their in-memory names (groups already in checkpoint names pass)."""
    for tensors, in_checkpoint_names in groups:
        if in_checkpoint_names:
            yield tensors, True
            continue
        own = {name: tensors[name] for name in own_names & tensors.keys()}
        split = split_experts({name: t for name, t in tensors.items() if name not in own}, fused)
        del tensors  # one layer in memory at a time (see `sink.export.write_groups`)
        if own:
            yield own, True
        yield split, False
        del split, own


@contextmanager
def described_per_expert(
    model: PreTrainedModel, adapter: MoEAdapter, fused: dict[str, bool], widths: dict[int, tuple[int, ...]] | None = None,
) -> Iterator[None]:
    """While a checkpoint with the `fused` tensors split, or with experts of several bit widths, is saved, `model`'s config says so.

    The config gets (or keeps) the structure spec that makes the save write the generated
    modelling code, plus the split tensors named relative to a decoder layer with whether
    the experts module keeps them transposed, and `widths` (MoE layer -> each routed expert's
    bit width; `slimming.expert_bits`). The config is restored afterwards: the model itself
    still holds fused tensors, in full precision.
    """
    config = model.config
    before = getattr(config, "moe_compress", None)
    prefix = layers_prefix(model, adapter) + "."
    relative = {name.removeprefix(prefix).split(".", 1)[1]: transposed for name, transposed in fused.items()}
    spec = dict(before) if before else structure_spec(model, adapter, adapter.config_num_experts(config))
    if fused:
        spec[PER_EXPERT_KEY] = sorted([name, transposed] for name, transposed in relative.items())
    if widths:
        spec[EXPERT_BITS_KEY] = {str(layer): list(layer_widths) for layer, layer_widths in sorted(widths.items())}
    config.moe_compress = spec
    try:
        yield
    finally:
        if before is None:
            del config.moe_compress
        else:
            config.moe_compress = before
