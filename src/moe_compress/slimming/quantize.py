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
Mixed precision (`expert_bits`, round-to-nearest): MoE layers, or single routed experts, at
their own width -- 4, 8 or 16 (as stored) -- one config group per width (`slimming.expert_bits`).

Families that store routed experts as fused 3-D tensors on disk as well (gpt_oss, granitemoe,
the Qwen3-VL-MoE, Gemma 4 and Aria wrappers, ...: the families table says which) are packed
too, one 2-D weight per expert (`sink.per_expert`): transformers gives compressed parameters
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
from ..errors import MoECompressError, OptionError, param
from ..sink.export import model_groups, streamed_groups
from ..source.open import Streaming, open_model
from ..sink.per_expert import described_per_expert, split_experts, stored_groups, unpackable_conversions
from ..source.residency import layers_prefix
from ..sink.output_lock import releases_outputs
from ..sink.staging import discard_staging
from ..sink.model_card import write_model_card
from ..sink.provenance import read_provenance
from ..sink.save import SUMMARY_FILE, check_output_dir, publish, save_compressed, staging_dir
from ..progress import step
from ..arch.structure import experts_per_layer
from .expert_bits import ExpertBits, bit_groups, bits_histogram, check_expert_bits, key_widths, resolve_expert_bits
from ..packing import QuantizingTransform, quant_scheme

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


def parameter_roles(model: PreTrainedModel, adapter: MoEAdapter) -> dict[str, str]:
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
    expert here (`sink.per_expert`), before it renames them; `own_names` keep their in-memory
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


def _target_widths(
    model: PreTrainedModel, adapter: MoEAdapter, saved: dict[str, SavedTensor], targets: set[str], bits: int, expert_bits: ExpertBits | None,
) -> tuple[dict[str, int], dict[int, tuple[int, ...]] | None]:
    """(every in-scope checkpoint weight -> its width, 16 = left as stored; each MoE layer's expert widths, or None without `expert_bits`)."""
    widths = dict.fromkeys(targets, bits)
    if expert_bits is None:
        return widths, None
    per_expert = resolve_expert_bits(expert_bits, experts_per_layer(model, adapter), len(adapter.decoder_layers(model)), bits)
    prefix = layers_prefix(model, adapter) + "."
    experts = {k: int(saved[k].param.removeprefix(prefix).split(".")[0]) for k in targets if saved[k].role == "experts"}
    return widths | key_widths(experts, per_expert), per_expert


def _quantization_config(
    widths: dict[str, int], saved: dict[str, SavedTensor], ignore: set[str], mixed: bool, bits: int, group: int, symmetric: bool,
):
    """Uniform: one config group (`targets: ["Linear"]`, everything else ignored). Mixed: one group per width,
    targeting its experts by `re:` pattern (`expert_bits.bit_groups`); the 16-bit experts are ignored by pattern."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    if not mixed:
        groups = {"group_0": quant_scheme(next(iter(widths.values())), group, symmetric)}
    else:
        experts = {k: w for k, w in widths.items() if saved[k].role == "experts"}
        targets, left = bit_groups(experts, bits, others=len(experts) < len(widths))
        groups = {f"group_{i}": quant_scheme(width, group, symmetric, names) for i, (width, names) in enumerate(targets.items())}
        ignore = {name for name in ignore if f"{name}.weight" not in experts} | set(left)
    return QuantizationConfig(config_groups=groups, format="pack-quantized", quantization_status=QuantizationStatus.COMPRESSED, ignore=sorted(ignore))


METHODS: dict[str, str] = {
    "rtn": "round-to-nearest per group (min-max), no calibration data",
    "autoround": "AutoRound (auto-round): rounding and clipping tuned per decoder block on calibration data",
}


def check_quantizable(model: PreTrainedModel, adapter: MoEAdapter) -> None:
    """Refuse a model already quantised, or of a family whose quantised checkpoint transformers could not
    load (from the structure: before any weight is read)."""
    if getattr(model.config, "quantization_config", None):
        raise MoECompressError("this model is already quantised; quantise the full-precision model (slim and prune it first).")
    problem = unloadable_when_packed(model)
    if problem:
        raise MoECompressError(f"a quantised {adapter.model_type} checkpoint would not load in transformers: {problem}; keep this model unquantised.")


def check_quantize_options(bits: int, scope: str, method: str, group_size: int | None, expert_bits: ExpertBits | None = None,
                           calibrate_all_experts: bool = False) -> None:
    """The options every quantisation takes, checked before any model is read."""
    if bits not in (4, 8):
        raise OptionError("bits", f"must be 4 or 8; got {bits}.")
    if scope not in SCOPES:
        raise OptionError("scope", f"must be one of {', '.join(SCOPES)}; got {scope!r}.")
    if method not in METHODS:
        raise OptionError("method", f"must be one of {', '.join(METHODS)}; got {method!r}.")
    if group_size is not None and group_size < 0:
        raise OptionError("group_size", f"must be >= 0 (0: one scale per output row); got {group_size}.")
    if expert_bits is not None:
        check_expert_bits(expert_bits)
        if method != "rtn":
            raise MoECompressError(f"expert_bits (per-layer or per-expert widths) is written with method 'rtn'; got {method!r}.")
    if calibrate_all_experts and method == "rtn":
        raise OptionError("calibrate_all_experts", f"needs calibration, and {param('method')} rtn reads no data; use {param('method')} autoround.")


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
    expert_bits: ExpertBits | None = None,
    calibrate_all_experts: bool = False,
) -> QuantizeResult:
    """Save `model` with its weights quantised to `bits` (4 or 8), weight-only, as a compressed-tensors checkpoint.

    Args:
        model: an in-memory model (left unchanged) or a checkpoint directory / bundled name.
            A checkpoint is streamed as `streaming` says (see `source.open.open_model`):
            round-to-nearest then reads, quantises and writes one decoder layer at a time;
            AutoRound tunes blocks on an in-memory model.
        out: the output directory (written atomically).
        group_size: weights per scale along the input dimension; None picks the largest of
            128, 64, 32, 16, 8 that divides every quantised width; 0 = one scale per output row.
        scope: 'all' (every decoder Linear but routers) or 'experts' (routed experts only).
        symmetric: symmetric ranges (zero point 0; what W4A16 kernels expect) or asymmetric.
        method: 'rtn' (round-to-nearest) or 'autoround' (calibrated; needs `calib`, as for
            `compress`: default the bundled corpus, and the tokenizer; `iters` tuning steps per block).
        expert_bits: mixed precision for the routed experts (method 'rtn'): decoder layer index ->
            the width of all its routed experts, or {expert index: width} for some of them; widths
            are 4, 8 or 16 (left as stored). Experts not named take `bits`; the rest follows `scope`.
            Experts of several widths make the checkpoint carry the generated modelling code
            (`slimming.expert_bits` says why): it then loads with `trust_remote_code=True`.
        calibrate_all_experts: method 'autoround' only: tune each block with every calibration token
            routed to every expert, equally weighted (our variant, `slimming.autoround_experts`; the
            saved routing is the model's), so no expert keeps round-to-nearest for want of tokens.
            Without it, the experts calibration never reached are listed in the summary
            ("unreached_experts") for the quality guard.

    The checkpoint loads with `AutoModelForCausalLM.from_pretrained` (plus
    `trust_remote_code=True` for non-uniform models) wherever compressed-tensors is installed.
    """
    import time

    from compressed_tensors.compressors import ModelCompressor

    from ..arch.size import checkpoint_bytes

    start = time.perf_counter()
    check_quantize_options(bits, scope, method, group_size, expert_bits, calibrate_all_experts)
    out = Path(out)
    check_output_dir(out, overwrite, [model if isinstance(model, str | Path) else getattr(model, "name_or_path", None)])
    if method == "autoround" and streaming is True:
        raise OptionError("method", f"autoround tunes each block on a model held in memory; use {param('streaming')} off or auto (or {param('method')} rtn).")
    with step(f"loading {model}" if isinstance(model, str | Path) else "opening the model"):
        model, loaded_tokenizer, weights = open_model(model, device, False if method == "autoround" else streaming, dtype, trust_remote_code)
    tokenizer = tokenizer or loaded_tokenizer
    adapter = get_adapter(model)
    check_quantizable(model, adapter)
    roles = parameter_roles(model, adapter)
    own_names = unpackable_conversions(model, model.state_dict(keep_vars=True), {n for n, role in roles.items() if role == "experts"})
    saved, fused = _saved_keys(model, roles, own_names)
    chosen = {"experts"} if scope == "experts" else {"experts", "shared", "attention", "dense"}
    in_scope = {k for k, t in saved.items() if t.role in chosen and len(t.shape) == 2 and k.endswith(".weight")}
    all_widths, per_expert = _target_widths(model, adapter, saved, in_scope, bits, expert_bits)
    widths = {k: w for k, w in all_widths.items() if w != 16}
    targets = set(widths)
    if not targets:
        raise MoECompressError(f"no weights to quantise in scope {scope!r}" + (" (expert_bits leaves every expert at 16 bits)." if expert_bits else "."))
    group = choose_group_size(group_size, {saved[k].shape[-1] for k in targets})
    mixed = len(set(all_widths.values())) > 1
    # Every Linear left in full precision: by checkpoint name (what vLLM matches) and by in-memory
    # module name (what compressed-tensors matches in transformers: vision towers, renamed modules, lm_head).
    quantized = {saved[k].param for k in targets}
    ignore = {k.removesuffix(".weight") for k, t in saved.items() if k not in targets and len(t.shape) == 2 and k.endswith(".weight")}
    ignore |= {name for name, module in model.named_modules() if isinstance(module, nn.Linear) and f"{name}.weight" not in quantized}
    config = _quantization_config(all_widths, saved, ignore, mixed, bits, group, symmetric)
    rounded, calibration, unreached = {}, None, None
    if method == "autoround":
        from ..engine.prepare import calibration_batches
        from ..walk.observer import observe_expert_statistics
        from ..walk.statistics import unreached_experts
        from .autoround import autoround

        if not group:
            raise OptionError("method", f"autoround needs a group size (AutoRound tunes per group); pass {param('group_size')}.")
        params = {saved[k].param: saved[k].role for k in targets}
        batches = calibration_batches("bundled" if calib is None else calib, tokenizer)
        in_memory, calibration = autoround(model, tokenizer, batches, params, bits, group, symmetric, iters, device, calibrate_all_experts)
        # AutoRound tunes an expert by the gradient of its routed tokens: one calibration never reached kept round-to-nearest
        # (unless every token was routed to every expert)
        unreached = [] if calibrate_all_experts else [
            f"{layer}:{expert}" for layer, expert in unreached_experts(observe_expert_statistics(model, adapter, batches, ("selected",), device))]
        rounded = _saved_rounding(model, in_memory, fused, own_names)

    schemes = {width: quant_scheme(width, group, symmetric) for width in set(widths.values())}
    transform = QuantizingTransform({k: schemes[w] for k, w in widths.items()}, rounded)
    groups = stored_groups(streamed_groups(weights, adapter, None) if weights.streamed else model_groups(model), fused, own_names)
    work = staging_dir(out, "quantize")
    try:
        with described_per_expert(model, adapter, fused, per_expert if mixed else None) if fused or mixed else nullcontext():
            staged = save_compressed(model, work / "checkpoint", tokenizer, overwrite=True, groups=groups, transform=transform)
        made = read_provenance(staged)  # sealed with the config as saved: read it before the quantisation section is added
        ModelCompressor(quantization_config=config).update_config(str(staged))
        summary = {
            "stage": "quantize",
            "library": "compressed-tensors",
            "format": "pack-quantized",
            "method": method,
            "bits": bits,
            **({"expert_bits": {layer: bits_histogram(w) for layer, w in per_expert.items()}} if per_expert is not None else {}),
            "group_size": group,
            "symmetric": symmetric,
            "scope": scope,
            "quantized_matrices": len(targets),
            "quantized_params": sum(saved[k].shape[-2] * saved[k].shape[-1] for k in targets),
            "experts_storage": PER_EXPERT_STORAGE if fused else "packed",
            "calibrated_keys": len(rounded),
            "autoround": calibration,
            **({"calibrate_all_experts": True} if calibrate_all_experts else {}),
            **({"unreached_experts": unreached} if method == "autoround" else {}),  # what the quality guard names
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
