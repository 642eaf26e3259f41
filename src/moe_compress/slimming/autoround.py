"""Calibrated weight rounding with AutoRound (Intel's `auto-round`, SignRound).

Round-to-nearest rounds every weight on its own. AutoRound instead tunes, per decoder block,
how each weight rounds (up or down) and each group's clipping range by signed gradient
descent so that the block's output on calibration tokens stays close to the full-precision
block's; it needs no Hessian and keeps the standard int-per-group format, so the result is
written exactly like our round-to-nearest checkpoints (compressed-tensors pack-quantized,
`slimming.quantize`) and loads wherever those do.

How it is driven: AutoRound runs on a copy of the model (it rewrites the copy: transformers'
fused 3-D experts become one `nn.Linear` per expert and projection). Each of the copy's
Linears is traced back to the tensor it came from -- a plain Linear by name, an expert
projection by matching its weight to a slice of the fused tensor (`_origin`), so no family's
fusion layout has to be known here. After tuning, every Linear carries its rounded weight,
scales and zero points; they are put back in the original tensors' layout, and the writer
turns them into packed integers with compressed-tensors.

Experts that calibration routes few or no tokens to get little or no gradient: their
rounding stays at AutoRound's starting point, round-to-nearest with its own min-max scales,
which is a correct quantisation, made without data. `all_experts` tunes every block with
calibration routed to every expert instead (our variant: `slimming.autoround_experts`).
Matrices AutoRound leaves out (a dimension not divisible by 32, which its kernels need) are
rounded to nearest by the writer, and counted in the summary.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..errors import MoECompressError, OptionError
from .autoround_experts import experts_to_route, tune_every_expert

#: The pinned release this integration was written and tested against (see pyproject.toml).
AUTOROUND_VERSION = "0.16.1"


@dataclass
class Rounded:
    """One tensor's quantisation: rounded values (same shape as the tensor) and per-group parameters.

    `scale` / `zero_point` have the tensor's shape with the input axis divided by the group size
    (the input axis is the last one, or the middle one of a transposed fused expert tensor).
    `zero_point` is None for symmetric quantisation; it uses compressed-tensors' signed convention.
    """

    value: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None


@dataclass(frozen=True)
class _Origin:
    """Where an AutoRound Linear's weight lives in the original model."""

    param: str
    expert: int | None = None
    rows: torch.Tensor | None = None  # rows of the expert's [out, in] view (None: all)
    transposed: bool = False


def _row_candidates(count: int) -> list[torch.Tensor]:
    full = torch.arange(count)
    return [full, full[: count // 2], full[count // 2 :], full[0::2], full[1::2]]


def _expert_view(param: torch.Tensor, expert: int, transposed: bool) -> torch.Tensor:
    """One expert's slice as [out, in], the orientation of an nn.Linear weight."""
    value = param[expert]
    return value.T if transposed else value


def _origin(name: str, linear: nn.Linear, originals: dict[str, torch.Tensor], fused: dict[str, tuple[list[str], bool]]) -> _Origin | None:
    """The original tensor (and expert, rows) an AutoRound Linear was cut from, found by exact value."""
    if f"{name}.weight" in originals:
        return _Origin(f"{name}.weight")
    parent, _, _ = name.rpartition(".")
    experts_path, _, index = parent.rpartition(".")
    if experts_path not in fused or not index.isdigit():
        return None
    names, transposed = fused[experts_path]
    weight = linear.weight.detach()
    for param_name in names:
        view = _expert_view(originals[param_name], int(index), transposed)
        if view.shape[1] != weight.shape[1]:
            continue
        for rows in _row_candidates(view.shape[0]):
            if rows.numel() == weight.shape[0] and torch.equal(view[rows], weight):
                return _Origin(param_name, int(index), rows, transposed)
    return None


def _ct_zero_point(zp: torch.Tensor | int, bits: int, symmetric: bool, shape: torch.Size) -> torch.Tensor | None:
    """AutoRound's unsigned zero point -> compressed-tensors' signed one (None when symmetric)."""
    if symmetric:
        return None
    return (torch.as_tensor(zp).reshape(shape) - 2 ** (bits - 1)).to(torch.int8)


def autoround(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    batches: list[torch.Tensor],
    targets: dict[str, str],
    bits: int,
    group_size: int,
    symmetric: bool = True,
    iters: int = 200,
    device: str = "cpu",
    all_experts: bool = False,
) -> tuple[dict[str, Rounded], dict]:
    """Tune the rounding of `targets` (in-memory parameter names -> role) with AutoRound.

    Returns, per tuned tensor, its rounded values and quantisation parameters (tensors with
    parts AutoRound left out are not returned: the writer rounds them to nearest), and a
    summary of what was tuned. `model` itself is not modified. `all_experts`: each block is
    tuned with every token routed to every expert, equally weighted (`slimming.autoround_experts`).
    """
    try:
        from auto_round import AutoRound
        from auto_round.algorithms.quantization.sign_round.config import SignRoundConfig
        from auto_round.modeling.fused_moe.moe_experts_interface import prepare_model_for_moe_quantization
    except ImportError as exc:  # pragma: no cover - auto-round is a pinned dependency
        raise OptionError("method", f"autoround needs auto-round=={AUTOROUND_VERSION} (pip install auto-round=={AUTOROUND_VERSION}): {exc}") from None
    if tokenizer is None:
        raise MoECompressError("AutoRound needs the model's tokenizer; this checkpoint has none (use {param('method')} rtn).")
    if not batches:
        raise MoECompressError("AutoRound needs calibration batches.")
    if iters < 1:
        raise MoECompressError(f"iters must be a positive integer; got {iters}.")
    os.environ.setdefault("AR_LOG_LEVEL", "WARNING" if os.environ.get("MOE_COMPRESS_QUIET") else "INFO")

    originals = {name: p.detach() for name, p in model.named_parameters() if name in targets}
    fused: dict[str, tuple[list[str], bool]] = {}
    for module_name, module in model.named_modules():
        names = [f"{module_name}.{n}" for n, p in module.named_parameters(recurse=False) if p.dim() == 3 and f"{module_name}.{n}" in targets]
        if names:
            fused[module_name] = (names, bool(getattr(module, "is_transposed", False)))

    work = copy.deepcopy(model)
    routed = experts_to_route(work) if all_experts else {}
    prepare_model_for_moe_quantization(work)
    origins: dict[str, _Origin] = {}
    skip: dict[str, dict] = {}
    for name, module in work.named_modules():
        if isinstance(module, nn.Linear):
            found = _origin(name, module, originals, fused)
            if found is None:
                skip[name] = {"bits": 16, "data_type": "fp"}  # routers, gates, embeddings, out-of-scope Linears
            else:
                origins[name] = found
    samples = sum(int(b.shape[0]) for b in batches)
    runner = AutoRound(
        work, tokenizer=tokenizer, scheme=f"W{bits}A16", alg_configs=SignRoundConfig(iters=iters), dataset=batches,
        nsamples=samples, seqlen=int(batches[0].shape[1]), batch_size=int(batches[0].shape[0]), group_size=group_size,
        sym=symmetric, layer_config=skip, device_map=device, enable_torch_compile=False,
        amp=False,  # tune in the model's own dtype (AutoRound would otherwise cast to bf16 first)
    )
    if routed:
        tune_every_expert(runner, work, routed)
    runner.quantize()

    rounded: dict[str, Rounded] = {}
    tuned, left_out = 0, []
    for name, module in runner.model.named_modules():
        origin = origins.get(name)
        if origin is None:
            continue
        if not hasattr(module, "scale"):
            left_out.append(name)
            continue
        tuned += 1
        entry = rounded.get(origin.param)
        if entry is None:
            original = originals[origin.param]
            groups = (original.shape[-2] if origin.transposed else original.shape[-1]) // group_size
            scale_shape = list(original.shape)
            scale_shape[-2 if origin.transposed else -1] = groups
            entry = rounded[origin.param] = Rounded(
                original.clone(), torch.full(scale_shape, float("nan"), dtype=original.dtype),
                None if symmetric else torch.zeros(scale_shape, dtype=torch.int8),
            )
        weight = module.weight.detach().to(entry.value.dtype)
        scale = module.scale.detach().reshape(weight.shape[0], -1).to(entry.value.dtype)
        zero_point = _ct_zero_point(module.zp, bits, symmetric, scale.shape)
        if origin.expert is None:
            entry.value.copy_(weight)
            entry.scale.copy_(scale)
            if zero_point is not None:
                entry.zero_point.copy_(zero_point)
            continue
        for target, part in ((entry.value, weight), (entry.scale, scale), (entry.zero_point, zero_point)):
            if target is not None:
                view = _expert_view(target, origin.expert, origin.transposed)
                view[origin.rows] = part
    incomplete = [name for name, entry in rounded.items() if torch.isnan(entry.scale).any()]
    for name in incomplete:  # a fused tensor some of whose slices AutoRound left out: the writer rounds it whole
        del rounded[name]
    summary = {"library": f"auto-round {AUTOROUND_VERSION}", "iters": iters, "tuned_matrices": tuned,
               "left_to_round_to_nearest": sorted(left_out), "calibration_sequences": samples,
               **({"routed_to_every_expert": len(routed)} if all_experts else {})}
    return rounded, summary
