"""Weight-only 4/8-bit quantisation, written in the compressed-tensors format.

Why compressed-tensors and not llm-compressor: llm-compressor 0.14.0.1 (the newest release)
requires transformers<=5.17.0 and compressed-tensors==0.19.0, so it cannot be installed next
to our transformers 5.23. compressed-tensors 0.20.0 itself installs with our torch 2.13 and
transformers 5.23, and its "pack-quantized" format is what llm-compressor writes for W4A16 /
W8A16: vLLM serves it, and transformers loads it (the experts dequantised at load, other
Linears decompressed on the first forward) as long as compressed-tensors is installed.

How: the model is saved as usual (stock per-expert key layout, or with its generated remote
code), then every targeted 2-D weight in the shards is replaced by compressed-tensors'
packed int32 weights, per-group scales and shape, using its own qparam and packing
functions, and `quantization_config` is added to config.json with its own `ModelCompressor`.
Two ways to choose the integers (`method`):
  * "rtn": round-to-nearest with min-max ranges per group, no calibration data: enough for 8
    bits, and at 4 bits the simple baseline;
  * "autoround": AutoRound's calibrated rounding (`slimming.autoround`), from the pinned
    `auto-round` library (the design says not to write our own GPTQ).

Families that store routed experts as fused 3-D tensors on disk as well (gpt_oss, granitemoe,
the Qwen3-VL-MoE, Gemma 4 and Aria wrappers, ...: the families table says which) are packed
too, one 2-D weight per expert (`io.per_expert`): transformers gives compressed parameters
only to nn.Linear modules and reads no packed 3-D tensor, and no stock conversion of these
families reads per-expert keys, so their quantised checkpoint carries the generated modelling
code whose `MoECompressPerExpert...` class stacks the experts back on load
(`trust_remote_code=True`). A family whose own weight conversion transformers cannot run on
packed weights is refused before anything is read (`arch.table.unloadable_when_packed`).
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..arch.adapter import MoEAdapter
from ..arch.registry import get_adapter
from ..arch.table import unloadable_when_packed
from ..errors import MoECompressError
from ..io.export import model_groups, streamed_groups
from ..io.open import Streaming, open_model
from ..io.per_expert import described_per_expert, split_experts, stored_groups, unpackable_conversions
from ..io.output_lock import releases_outputs
from ..io.staging import discard_staging
from ..io.model_card import write_model_card
from ..io.provenance import read_provenance
from ..io.save import SUMMARY_FILE, check_output_dir, publish, save_compressed, staging_dir
from ..progress import step

QuantScope = Literal["all", "experts"]
SCOPES: dict[str, str] = {
    "all": "every Linear weight of the decoder layers (attention, routed and shared experts, dense MLPs); routers, embeddings and lm_head stay",
    "experts": "the routed experts only",
}
_AUTO_GROUPS = (128, 64, 32, 16, 8)
#: The summary's `experts_storage` for families that fuse experts on disk.
PER_EXPERT_STORAGE = "packed, one weight per expert (the family fuses them on disk: loads with trust_remote_code=True)"


@dataclass
class QuantizeResult:
    output_dir: Path
    summary: dict = field(default_factory=dict)


def _parameter_roles(model: PreTrainedModel, adapter: MoEAdapter) -> dict[str, str]:
    """In-memory parameter name -> role (experts, shared, attention, dense, router) for decoder weights."""
    names = {id(module): name for name, module in model.named_modules()}
    roles: dict[str, str] = {}

    def mark(module: nn.Module, role: str, linear_only: bool = True) -> None:
        base = names[id(module)]
        if not linear_only:
            for name, _ in module.named_parameters():
                roles.setdefault(f"{base}.{name}", role)
            return
        for sub_name, sub in module.named_modules():
            if isinstance(sub, nn.Linear):
                roles.setdefault(f"{base}.{sub_name}.weight".replace("..", "."), role)

    for layer in adapter.decoder_layers(model):
        block = adapter.moe_block(layer)
        if block is not None:
            mark(adapter.router(block), "router", linear_only=False)
            experts = adapter.experts(block)
            for name in ("gate_up_proj", "up_proj", "down_proj"):
                if isinstance(getattr(experts, name, None), torch.Tensor):
                    roles[f"{names[id(experts)]}.{name}"] = "experts"
            for attr in adapter.shared_expert_attrs:
                module = getattr(block, attr, None)
                if module is not None:
                    # a bare Linear among them is a gate (Qwen2-MoE's shared_expert_gate)
                    mark(module, "router" if isinstance(module, nn.Linear) else "shared")
        attention = getattr(layer, "self_attn", None)
        if attention is not None:
            mark(attention, "attention")
        mark(layer, "dense")  # whatever Linear is left: dense MLPs of non-MoE layers
    return roles


@dataclass(frozen=True)
class SavedTensor:
    """A checkpoint tensor: its role, stored shape, and the in-memory parameter it comes from."""

    role: str
    shape: tuple[int, ...]
    param: str


def _saved_keys(model: PreTrainedModel, roles: dict[str, str], own_names: set[str]) -> tuple[dict[str, SavedTensor], dict[str, bool]]:
    """(checkpoint key -> what it holds, fused expert tensors the checkpoint stores per expert -> transposed).

    Keys come from transformers' own save-time key conversion: fused in-memory experts become
    per-expert keys for most families. Expert tensors that conversion keeps 3-D are split per
    expert here (`io.per_expert`), before it renames them; `own_names` keep their in-memory
    names. Running it on meta tensors gives the names and shapes without copying any weights.
    """
    from transformers.core_model_loading import revert_weight_conversion

    params = dict(model.named_parameters())
    transposed = {f"{m}.{n}" for m, module in model.named_modules() if getattr(module, "is_transposed", False)
                  for n, p in module.named_parameters(recurse=False) if p.dim() == 3}
    saved: dict[str, SavedTensor] = {}
    fused: dict[str, bool] = {}
    for name, role in roles.items():
        if name not in params:
            continue
        meta = {name: params[name].detach().to("meta")}
        converted = meta if name in own_names else revert_weight_conversion(model, meta)
        if role == "experts" and any(tensor.dim() == 3 for tensor in converted.values()):
            fused[name] = name in transposed
            converted = revert_weight_conversion(model, split_experts(meta, fused))
        for key, tensor in converted.items():
            saved[key] = SavedTensor(role, tuple(tensor.shape), name)
    return saved, fused


def choose_group_size(group_size: int | None, columns: set[int]) -> int:
    """The group size to use: as given (0 = one scale per output row), or the largest that divides every width."""
    if group_size is None:
        for size in _AUTO_GROUPS:
            if all(c % size == 0 for c in columns):
                return size
        raise MoECompressError(
            f"no group size of {', '.join(map(str, _AUTO_GROUPS))} divides every input width ({sorted(columns)}); pass group_size=0 (per channel)."
        )
    bad = sorted(c for c in columns if group_size and c % group_size)
    if bad:
        raise MoECompressError(f"group_size {group_size} does not divide the input width of every quantised weight ({bad}); choose a divisor or 0.")
    return group_size


def _scheme(bits: int, group_size: int, symmetric: bool):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = QuantizationArgs(
        num_bits=bits, type="int", symmetric=symmetric,
        strategy="group" if group_size else "channel", group_size=group_size or None,
    )
    return QuantizationScheme(targets=["Linear"], weights=args)


def rtn_parameters(weight: torch.Tensor, scheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest scales and zero points of one 2-D weight: min-max per group (or output row),
    computed by compressed-tensors' own `calculate_qparams`."""
    from compressed_tensors.quantization.utils import calculate_qparams

    args = scheme.weights
    value = weight.float()
    if args.group_size:
        grouped = value.unflatten(-1, (value.shape[-1] // args.group_size, args.group_size))
        low, high = grouped.amin(dim=-1), grouped.amax(dim=-1)
    else:
        low, high = value.amin(dim=-1, keepdim=True), value.amax(dim=-1, keepdim=True)
    return calculate_qparams(low, high, args)


def compress_weight(weight: torch.Tensor, scheme, scale: torch.Tensor | None = None, zero_point: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One 2-D weight -> compressed-tensors' pack-quantized tensors (weight_packed, weight_scale, weight_shape[, zero point]).

    With `scale` (and `zero_point`) given -- calibrated rounding, whose rounded values `weight`
    already lies on that grid -- packing reproduces those integers; without, round-to-nearest.
    compressed-tensors' own packing, so the bytes are exactly its format.
    """
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.config import CompressionFormat

    if scale is None:
        scale, zero_point = rtn_parameters(weight, scheme)
    if zero_point is None:
        zero_point = torch.zeros_like(scale, dtype=torch.int8)
    state = {"weight": weight.float(), "weight_scale": scale.to(weight.dtype), "weight_zero_point": zero_point}
    compressor = BaseCompressor.get_value_from_registry(CompressionFormat.pack_quantized.value)
    # clone, not contiguous(): a contiguous view would keep its whole intermediate buffer alive
    return {k: v.clone() for k, v in compressor.compress(state, scheme).items()}


def _saved_rounding(
    model: PreTrainedModel, rounded: dict, fused: dict[str, bool], own_names: set[str],
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """Calibrated rounding of in-memory tensors -> (values, scale, zero point) per checkpoint key,
    named and split as the weights themselves are (`_saved_keys`)."""
    from transformers.core_model_loading import revert_weight_conversion

    saved = {}
    for name, entry in rounded.items():
        parts = [{name: t} if name in own_names else revert_weight_conversion(model, split_experts({name: t}, fused))
                 for t in (entry.value, entry.scale, entry.zero_point) if t is not None]
        for key in parts[0]:
            saved[key] = (parts[0][key], parts[1][key], parts[2][key] if len(parts) > 2 else None)
    return saved


class QuantizingTransform:
    """Rewrites each group of checkpoint tensors on its way to disk: every target `<module>.weight`
    becomes its compressed tensors; the rest passes.

    The same transform serves the in-memory and the streamed save, so both write the same bytes.
    It counts the bytes it was handed: the size the checkpoint would have had unquantised.
    """

    def __init__(self, targets: set[str], scheme, rounded: dict):
        self.targets, self.scheme, self.rounded = targets, scheme, rounded
        self.bytes_before = 0

    def __call__(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        rewritten: dict[str, torch.Tensor] = {}
        for key, tensor in tensors.items():
            self.bytes_before += tensor.numel() * tensor.element_size()
            if key in self.targets:
                module = key.removesuffix("weight")
                value, scale, zero_point = self.rounded.get(key, (tensor, None, None))
                rewritten.update({module + name: v for name, v in compress_weight(value, self.scheme, scale, zero_point).items()})
            else:
                rewritten[key] = tensor
        return rewritten


METHODS: dict[str, str] = {
    "rtn": "round-to-nearest per group (min-max), no calibration data",
    "autoround": "AutoRound (auto-round): rounding and clipping tuned per decoder block on calibration data",
}


def check_loadable_when_packed(model: PreTrainedModel, adapter: MoEAdapter) -> None:
    """Refuse a family whose quantised checkpoint transformers could not load (before any weight is read)."""
    problem = unloadable_when_packed(model)
    if problem:
        raise MoECompressError(f"a quantised {adapter.model_type} checkpoint would not load in transformers: {problem}; keep this model unquantised.")


def check_quantize_options(bits: int, scope: str, method: str, group_size: int | None) -> None:
    """The options every quantisation takes, checked before any model is read."""
    if bits not in (4, 8):
        raise MoECompressError(f"--bits must be 4 or 8; got {bits}.")
    if scope not in SCOPES:
        raise MoECompressError(f"--scope must be one of {', '.join(SCOPES)}; got {scope!r}.")
    if method not in METHODS:
        raise MoECompressError(f"--method must be one of {', '.join(METHODS)}; got {method!r}.")
    if group_size is not None and group_size < 0:
        raise MoECompressError(f"--group-size must be >= 0 (0: one scale per output row); got {group_size}.")


@releases_outputs
def quantize(
    model: PreTrainedModel | str | Path,
    out: str | Path,
    bits: int = 4,
    group_size: int | None = None,
    scope: str = "all",
    symmetric: bool = True,
    tokenizer: PreTrainedTokenizerBase | None = None,
    overwrite: bool = False,
    method: str = "rtn",
    calib=None,
    iters: int = 200,
    device: str = "cpu",
    trust_remote_code: bool = False,
    streaming: Streaming = "auto",
    dtype: str = "auto",
) -> QuantizeResult:
    """Save `model` with its weights quantised to `bits` (4 or 8), weight-only, as a compressed-tensors checkpoint.

    Args:
        model: an in-memory model (left unchanged) or a checkpoint directory / bundled name.
            A checkpoint is streamed as `streaming` says (see `io.open.open_model`):
            round-to-nearest then reads, quantises and writes one decoder layer at a time;
            AutoRound tunes blocks on an in-memory model.
        out: the output directory (written atomically).
        group_size: weights per scale along the input dimension; None picks the largest of
            128, 64, 32, 16, 8 that divides every quantised width; 0 = one scale per output row.
        scope: 'all' (every decoder Linear but routers) or 'experts' (routed experts only).
        symmetric: symmetric ranges (zero point 0; what W4A16 kernels expect) or asymmetric.
        method: 'rtn' (round-to-nearest) or 'autoround' (calibrated; needs `calib`, as for
            `compress`: default the bundled corpus, and the tokenizer; `iters` tuning steps per block).

    The checkpoint loads with `AutoModelForCausalLM.from_pretrained` (plus
    `trust_remote_code=True` for non-uniform models) wherever compressed-tensors is installed.
    """
    import time

    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    from ..evaluate.size import checkpoint_bytes

    start = time.perf_counter()
    check_quantize_options(bits, scope, method, group_size)
    out = Path(out)
    check_output_dir(out, overwrite, [model if isinstance(model, str | Path) else getattr(model, "name_or_path", None)])
    if method == "autoround" and streaming is True:
        raise MoECompressError("--method autoround tunes each block on a model held in memory; use --streaming off or auto (or --method rtn).")
    with step(f"loading {model}" if isinstance(model, str | Path) else "opening the model"):
        model, loaded_tokenizer, weights = open_model(model, device, False if method == "autoround" else streaming, dtype, trust_remote_code)
    tokenizer = tokenizer or loaded_tokenizer
    if getattr(model.config, "quantization_config", None):
        raise MoECompressError("this model is already quantised; quantise the full-precision model (slim and prune it first).")
    adapter = get_adapter(model)
    check_loadable_when_packed(model, adapter)
    roles = _parameter_roles(model, adapter)
    own_names = unpackable_conversions(model, model.state_dict(keep_vars=True), {n for n, role in roles.items() if role == "experts"})
    saved, fused = _saved_keys(model, roles, own_names)
    chosen = {"experts"} if scope == "experts" else {"experts", "shared", "attention", "dense"}
    targets = {k for k, t in saved.items() if t.role in chosen and len(t.shape) == 2 and k.endswith(".weight")}
    if not targets:
        raise MoECompressError(f"no weights to quantise in scope {scope!r}.")
    group = choose_group_size(group_size, {saved[k].shape[-1] for k in targets})
    scheme = _scheme(bits, group, symmetric)
    # Every Linear left in full precision: by checkpoint name (what vLLM matches) and by in-memory
    # module name (what compressed-tensors matches in transformers: vision towers, renamed modules, lm_head).
    quantized = {saved[k].param for k in targets}
    ignore = {k.removesuffix(".weight") for k, t in saved.items() if k not in targets and len(t.shape) == 2 and k.endswith(".weight")}
    ignore |= {name for name, module in model.named_modules() if isinstance(module, nn.Linear) and f"{name}.weight" not in quantized}
    config = QuantizationConfig(
        config_groups={"group_0": scheme}, format="pack-quantized",
        quantization_status=QuantizationStatus.COMPRESSED, ignore=sorted(ignore),
    )
    rounded, calibration = {}, None
    if method == "autoround":
        from ..engine.prepare import calibration_batches
        from .autoround import autoround

        if not group:
            raise MoECompressError("--method autoround needs a group size (AutoRound tunes per group); pass --group-size.")
        params = {saved[k].param: saved[k].role for k in targets}
        batches = calibration_batches("bundled" if calib is None else calib, tokenizer)
        in_memory, calibration = autoround(model, tokenizer, batches, params, bits, group, symmetric, iters, device)
        rounded = _saved_rounding(model, in_memory, fused, own_names)

    transform = QuantizingTransform(targets, scheme, rounded)
    groups = stored_groups(streamed_groups(weights, adapter, None) if weights.streamed else model_groups(model), fused, own_names)
    work = staging_dir(out, "quantize")
    try:
        with described_per_expert(model, adapter, fused) if fused else nullcontext():
            staged = save_compressed(model, work / "checkpoint", tokenizer, overwrite=True, groups=groups, transform=transform)
        made = read_provenance(staged)  # sealed with the config as saved: read it before the quantisation section is added
        ModelCompressor(quantization_config=config).update_config(str(staged))
        summary = {
            "stage": "quantize",
            "library": "compressed-tensors",
            "format": "pack-quantized",
            "method": method,
            "bits": bits,
            "group_size": group,
            "symmetric": symmetric,
            "scope": scope,
            "quantized_matrices": len(targets),
            "quantized_params": sum(saved[k].shape[-2] * saved[k].shape[-1] for k in targets),
            "experts_storage": PER_EXPERT_STORAGE if fused else "packed",
            "calibrated_keys": len(rounded),
            "autoround": calibration,
            "checkpoint_bytes_before": transform.bytes_before,
            "streamed": weights.streamed,
            "checkpoint_bytes": checkpoint_bytes(staged),
            "seconds": round(time.perf_counter() - start, 2),
        }
        (staged / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        write_model_card(staged, made)  # again: the card (and the provenance's seal) now describe the quantised checkpoint
        publish(staged, out, overwrite)
    finally:
        discard_staging(work)
    return QuantizeResult(out, summary)
