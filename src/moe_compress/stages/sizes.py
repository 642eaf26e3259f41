"""What each part of a checkpoint weighs, and what each per-layer choice would weigh, without its weights.

The fit solver needs, per MoE layer, the bytes of every candidate (experts kept x bit width)
and the fixed rest. All of it comes from the shard headers (names, dtypes, shapes) and the
model's meta skeleton, whose adapter says which tensors are a layer's routed experts and
router; transformers' own key conversion (`StreamedWeights.targets`) ties each in-memory
tensor to the checkpoint keys it is read from. So a 1 T-parameter checkpoint costs seconds.
Parameter counts come from the same skeleton's shapes (tied weights once, as the loaded model counts them).

Counting rules, each the one the writer follows (checked against saved outputs in the tests):
* as stored ("16 bits"): a tensor's header bytes (numel x element size);
* pruning keeps `keep` of E identical experts, and of the router every tensor with an axis of
  one entry per expert (weight rows, DeepSeek's correction bias); the rest of the router stays;
* substituting (MoNE, `novices=True`) keeps every router row besides, and writes one vector of the
  hidden size per removed expert (in the experts' dtype) and a slot map of one int64 per router row
  (`runtime.attach_novices`) in each layer that removes any;
* 4 / 8 bits: `slimming.quantize` replaces each routed expert's 2-D `.weight` by
  compressed-tensors' pack-quantized tensors (see `packed_weight_bytes`); a fused 3-D expert
  tensor (gpt_oss, granitemoe) is stored as one such packed weight per expert, each slice
  oriented as a Linear weight (`sink.per_expert`); biases stay;
* scope "all" packs, besides, every other 2-D Linear `.weight` of the decoder layers (attention,
  shared experts, dense MLPs: `slimming.quantize.parameter_roles`), at the same group size
  when that size divides their widths too (`CheckpointSizes.others`, per decoder block).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import MoECompressError
from ..source.checkpoint import Checkpoint

if TYPE_CHECKING:
    from ..preflight import Structure

#: Bit widths a candidate may take; 16 means as stored (the checkpoint's own dtype).
BITS = (16, 8, 4)


def packed_weight_bytes(shape: tuple[int, ...], bits: int, group_size: int, scale_bytes: int, symmetric: bool = True) -> int:
    """Bytes of one [out, in] weight in compressed-tensors' pack-quantized format.

    From `PackedQuantizationCompressor.compress` / `pack_to_int32` (compressed-tensors 0.20):
    * weight_packed: int32, out x ceil(in x bits / 32) (dense packing, no padding bits);
    * weight_scale: out x (in / group_size) in the weight's dtype (one per row when group_size is 0);
    * weight_shape: int64 [2] = 16 bytes;
    * weight_zero_point (asymmetric only): packed along the rows, int32 ceil(out x bits / 32) x groups.
    """
    out, columns = shape
    groups = columns // group_size if group_size else 1
    size = out * math.ceil(columns * bits / 32) * 4 + out * groups * scale_bytes + 2 * 8
    if not symmetric:
        size += math.ceil(out * bits / 32) * groups * 4
    return size


@dataclass(frozen=True)
class LayerSizes:
    """One MoE layer: its routed experts and router, as the solver's candidates need them."""

    layer: int  # decoder layer index
    experts: int  # routed experts it has now
    expert_bytes: dict[int, int]  # bits -> bytes of one routed expert (16: as stored)
    router_per_expert: int  # router bytes that go with each kept expert (its row, its bias)
    router_fixed: int  # router bytes that stay whatever is kept
    expert_params: int = 0  # parameters of one routed expert
    router_params_per_expert: int = 0
    router_params_fixed: int = 0
    top_k: int = 0  # routed experts a token uses; 0: all that are kept (a condensed layer's constant router)
    rest_bytes: int = 0  # the rest of its MoE sub-layer (shared experts and their gate): dropped with it
    rest_params: int = 0
    novice_bytes: int = 0  # one novice vector (hidden size x the experts' element size): a MoNE-substituted expert's

    @property
    def router_bytes(self) -> int:
        return self.router_fixed + self.experts * self.router_per_expert

    def params(self, keep: int, used: int) -> int:
        """Parameters of its routed experts and router when it keeps `keep` experts, of which a token uses `used`."""
        return used * self.expert_params + keep * self.router_params_per_expert + self.router_params_fixed


@dataclass(frozen=True)
class CheckpointSizes:
    """A checkpoint's bytes, split into what the candidates change and the fixed rest."""

    total: int  # every tensor's header bytes
    group_size: int  # the quantizer's default group size for the routed experts
    layers: dict[int, LayerSizes] = field(default_factory=dict)  # MoE layers by decoder index
    blocks: dict[int, int] = field(default_factory=dict)  # every decoder layer's bytes (for block drop)
    # decoder block -> bits -> bytes of the weights scope "all" packs besides the routed experts (16: as stored);
    # {} where the experts' group size does not divide their widths (scope "all" would pick another group)
    others: dict[int, dict[int, int]] = field(default_factory=dict)
    params: int = 0  # every parameter (tied weights once)
    block_params: dict[int, int] = field(default_factory=dict)  # every decoder layer's parameters
    moe_droppable: bool = False  # the MoE sub-layer is a module of its own (layer drop can remove it: `MoEAdapter.require_separate_moe`)

    @property
    def fixed(self) -> int:
        """Embeddings, attention, norms, shared experts, dense layers, head, carried (MTP) layers."""
        return self.total - sum(layer.experts * layer.expert_bytes[16] + layer.router_bytes for layer in self.layers.values())

    @property
    def fixed_params(self) -> int:
        """The parameters of the same fixed rest."""
        return self.params - sum(layer.params(layer.experts, layer.experts) for layer in self.layers.values())


#: Bytes of one router row's entry in a substituted layer's slot map (`runtime.attach_novices`: int64).
SLOT_BYTES = 8


def candidate_bytes(layer: LayerSizes, keep: int, bits: int | Mapping[int, int], novices: bool = False) -> int:
    """Bytes of `layer`'s routed experts and router when it keeps `keep` experts at `bits` bits, or,
    mixed precision, with {width: how many of the kept experts take it} (`quantize(expert_bits=...)`);
    `novices`: the removed experts become novices (their router rows, vectors and the slot map stay)."""
    if not 0 <= keep <= layer.experts:
        raise MoECompressError(f"MoE layer {layer.layer} has {layer.experts} routed experts; cannot keep {keep}.")
    mix = dict(bits) if isinstance(bits, Mapping) else {bits: keep}
    wrong = [width for width in mix if width not in layer.expert_bytes]
    if wrong:
        raise MoECompressError(f"bit width must be one of {', '.join(map(str, BITS))}; got {wrong[0]}.")
    if sum(mix.values()) != keep:
        raise MoECompressError(f"MoE layer {layer.layer} keeps {keep} routed experts, but its widths count {sum(mix.values())}.")
    substituted = (layer.experts - keep) * (layer.router_per_expert + layer.novice_bytes) + layer.experts * SLOT_BYTES if novices and keep < layer.experts else 0
    return sum(count * layer.expert_bytes[width] for width, count in mix.items()) + keep * layer.router_per_expert + layer.router_fixed + substituted


def _expert_matrices(shape: tuple[int, ...], key: str, transposed: bool) -> tuple[int, tuple[int, int]] | None:
    """(how many, [out, in]) of the Linear weights quantize packs from a routed-expert key; None: stored as is.

    A 2-D `.weight` is one; a fused 3-D tensor ([E, out, in], or [E, in, out] where the family's
    experts are transposed) is E, one per expert; biases are neither.
    """
    if len(shape) == 2 and key.endswith(".weight"):
        return 1, (shape[0], shape[1])
    if len(shape) == 3 and not key.endswith("bias"):
        return shape[0], (shape[2], shape[1]) if transposed else (shape[1], shape[2])
    return None


def _quantized_bytes(checkpoint: Checkpoint, keys: list[str], bits: int, group_size: int, symmetric: bool, transposed: bool) -> int:
    """Bytes of routed-expert keys after `slimming.quantize`: their weights packed, everything else as stored."""
    total = 0
    for key in keys:
        info = checkpoint.tensors[key]
        matrices = _expert_matrices(tuple(info.shape), key, transposed)
        if matrices is None:
            total += checkpoint.nbytes(key)
        else:
            count, shape = matrices
            total += count * packed_weight_bytes(shape, bits, group_size, checkpoint.nbytes(key) // info.numel, symmetric)
    return total


def _other_weights(skeleton_model, adapter, weights) -> dict[int, list[str]]:
    """Decoder block -> the checkpoint keys of the 2-D weights scope "all" packs besides the routed experts."""
    from ..slimming.quantize import parameter_roles
    from ..source.residency import layers_prefix

    prefix = layers_prefix(skeleton_model, adapter) + "."
    found: dict[int, list[str]] = {}
    for name, role in parameter_roles(skeleton_model, adapter).items():
        if role in ("attention", "shared", "dense") and name.startswith(prefix):
            keys = [k for k in weights.targets.get(name, []) if k.endswith(".weight") and len(weights.checkpoint.tensors[k].shape) == 2]
            found.setdefault(int(name.removeprefix(prefix).split(".")[0]), []).extend(keys)
    return found


def _others(checkpoint: Checkpoint, keys: dict[int, list[str]], group: int, symmetric: bool) -> dict[int, dict[int, int]]:
    """Per block, the bytes of `keys` as stored and packed at each width (see `CheckpointSizes.others`)."""
    widths = {checkpoint.tensors[k].shape[1] for block in keys.values() for k in block}
    if not keys or any(group and width % group for width in widths):
        return {}

    def packed(key: str, bits: int) -> int:
        info = checkpoint.tensors[key]
        return packed_weight_bytes(tuple(info.shape), bits, group, checkpoint.nbytes(key) // info.numel, symmetric)

    return {block: {16: sum(checkpoint.nbytes(k) for k in block_keys)} | {bits: sum(packed(k, bits) for k in block_keys) for bits in BITS[1:]}
            for block, block_keys in sorted(keys.items())}


def checkpoint_sizes(model: str | Path, group_size: int | None = None, symmetric: bool = True, trust_remote_code: bool = False,
                     structure: Structure | None = None) -> CheckpointSizes:
    """The sizes of a local checkpoint (a directory or bundled name), from its config and shard headers.

    `group_size` and `symmetric` are the quantizer's (`quantize --scope experts`): None picks its
    default group, the largest of 128/64/32/16/8 dividing every routed expert's input width.
    `structure`: the checkpoint's skeleton where the caller has built it already (`preflight.skeleton`).
    """
    from ..source.residency import split_names
    from ..preflight import skeleton
    from ..runtime import ConstantRouter
    from ..slimming.quantize import choose_group_size

    from ..arch.adapter import text_config

    structure = structure or skeleton(model, "auto", trust_remote_code)
    weights = structure.weights
    if weights is None:
        raise MoECompressError(f"{model!r} is not a local checkpoint: its sizes are read from the shard headers. Download it first and pass the directory.")
    checkpoint, adapter, skeleton_model = weights.checkpoint, structure.adapter, structure.model

    def keys(module) -> list[str]:
        return [key for name in weights.state_names(module) for key in weights.targets.get(name, [])]

    _, per_layer, _ = split_names(skeleton_model, adapter, weights.targets)
    blocks = {index: sum(checkpoint.nbytes(k) for name in names for k in weights.targets[name]) for index, names in per_layer.items()}
    found: dict[int, tuple[int, list[str], list[str]]] = {}
    counted: dict[int, tuple[int, int, int, int]] = {}  # MoE layer -> parameters: per expert, router per expert, router fixed; top-k
    transposed = False
    for index, layer in enumerate(adapter.decoder_layers(skeleton_model)):
        block = adapter.moe_block(layer)
        if block is not None:
            count, router = adapter.num_experts(block), adapter.router(block)
            found[index] = (count, keys(adapter.experts(block)), keys(router))
            transposed = bool(getattr(adapter.experts(block), "is_transposed", False))
            rows = sum(p.numel() for p in router.parameters() if count in p.shape)
            top_k = 0 if isinstance(router, ConstantRouter) else adapter.top_k(skeleton_model.config)
            per_expert, router_params = _params(adapter.experts(block)) // count, _params(router)
            rest = [k for k in keys(block) if k not in found[index][1] and k not in found[index][2]]
            counted[index] = (per_expert, rows // count, router_params - rows, top_k, sum(checkpoint.nbytes(k) for k in rest),
                              _params(block) - per_expert * count - router_params)
    matrices = [_expert_matrices(tuple(checkpoint.tensors[k].shape), k, transposed) for _, experts, _ in found.values() for k in experts]
    widths = {shape[1] for found_matrix in matrices if found_matrix for _, shape in [found_matrix]}
    group = choose_group_size(group_size, widths) if widths else 0
    layers = {}
    for index, (count, experts, router) in found.items():
        per_bits = {16: sum(checkpoint.nbytes(k) for k in experts)}
        per_bits |= {bits: _quantized_bytes(checkpoint, experts, bits, group, symmetric, transposed) for bits in BITS[1:]}
        if any(size % count for size in per_bits.values()):
            raise MoECompressError(f"the routed experts of layer {index} differ in size; fit needs {count} experts of one shape.")
        rows = [k for k in router if count in checkpoint.tensors[k].shape]  # [E, hidden], [E], Ernie's [1, E] statistics
        per_expert = sum(checkpoint.nbytes(k) for k in rows)
        fixed = sum(checkpoint.nbytes(k) for k in router if k not in rows)
        element = checkpoint.nbytes(experts[0]) // checkpoint.tensors[experts[0]].numel
        layers[index] = LayerSizes(index, count, {bits: size // count for bits, size in per_bits.items()}, per_expert // count, fixed, *counted[index],
                                   novice_bytes=text_config(skeleton_model.config).hidden_size * element)
    block_params = {index: _params(layer) for index, layer in enumerate(adapter.decoder_layers(skeleton_model))}
    others = _others(checkpoint, _other_weights(skeleton_model, adapter, weights), group, symmetric)
    return CheckpointSizes(checkpoint.total_bytes(), group, layers, blocks, others, _params(skeleton_model), block_params, bool(adapter.moe_attr))


def _params(module) -> int:
    """Parameters of a (meta) module, tied weights once."""
    return sum(p.numel() for p in module.parameters())
