"""Refuse checkpoints whose headers lie: a dtype the parameter cannot have, FP8 weights without their scales.

Both checks read headers only, so they cost nothing at any scale, and both run before a
single weight is used: a header that calls F32 bytes I32 (the same width, so safetensors
accepts it) makes every value a ~1e9 integer, and a missing FP8 scale leaves a weight that
transformers cannot dequantise. What the bytes themselves hold is checked as they are read
(`Checkpoint.first_read` when streaming, `check_loaded` for a model loaded whole).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers import PreTrainedModel

from ..errors import MoECompressError, warn
from ..finite import check_read, require_finite
from .checkpoint import Checkpoint, zero_checked, zero_filled
from .residency import checkpoint_targets

#: safetensors dtypes that hold integers: bytes a float parameter can only come from if they encode
#: something (a quantised checkpoint's packed weights or exponent scales), never as plain values.
INTEGER_DTYPES = frozenset({"BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64"})


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def check_dtypes(model: PreTrainedModel, checkpoint: Checkpoint, targets: dict[str, list[str]], carried: list[str], quantized: bool) -> None:
    """Refuse a checkpoint tensor stored as integers where the model expects floating-point values.

    The expected dtype is the model's own parameter (built from the config's dtype); a tensor
    no parameter takes (carried, e.g. multi-token-prediction layers) is held to the config's
    dtype when it is a weight or bias. In a pre-quantised checkpoint, integer tensors under a
    name of their own (`..._blocks`, `weight_packed`) are encodings the quantizer decodes and
    are allowed; integer buffers stay integers everywhere.
    """
    state = model.state_dict(keep_vars=True)
    for name, keys in targets.items():
        expected = state[name].dtype
        if not expected.is_floating_point:
            continue
        for key in keys:
            stored = checkpoint.tensors[key].dtype
            if stored in INTEGER_DTYPES and not (quantized and _leaf(key) != _leaf(name)):
                _refuse(key, checkpoint, f"{name} is a {str(expected).removeprefix('torch.')} parameter")
    if quantized:
        return
    for key in carried:
        if checkpoint.tensors[key].dtype in INTEGER_DTYPES and _leaf(key) in ("weight", "bias"):
            _refuse(key, checkpoint, f"the config's dtype is {str(model.dtype).removeprefix('torch.')}")


def _refuse(key: str, checkpoint: Checkpoint, expectation: str) -> None:
    info = checkpoint.tensors[key]
    raise MoECompressError(
        f"checkpoint tensor {key} is stored as {info.dtype} in {info.shard.name}, but {expectation}: the shard's header names "
        "the wrong dtype (its bytes would be read as integers). Re-download or re-save the checkpoint."
    )


def _scale_names(key: str) -> list[str]:
    """Where an FP8 weight's inverse scale may be stored (transformers renames the other spellings)."""
    names = [f"{key}_scale_inv"]
    if key.endswith(".weight"):
        stem = key[: -len("weight")]
        names += [f"{stem}scale", f"{stem}qscale_weight"]
    return names


def check_fp8_scales(checkpoint: Checkpoint, quantization_config: dict) -> None:
    """Every FP8 weight of a fine-grained FP8 checkpoint has its scale, shaped by `weight_block_size`.

    transformers' dequantiser fails on either with a traceback (one scale missing) or a dtype
    error deep inside a matmul (all missing); the weight named here, with the fix, is the error.
    """
    if quantization_config.get("quant_method") != "fp8":
        return
    block = quantization_config.get("weight_block_size")
    missing = []
    for key, info in checkpoint.tensors.items():
        if info.dtype not in ("F8_E4M3", "F8_E5M2") or len(info.shape) < 2:
            continue
        scale = next((name for name in _scale_names(key) if name in checkpoint.tensors), None)
        if scale is None:
            missing.append(key)
            continue
        rows, cols = info.shape[-2:]
        stack = info.shape[:-2]
        found = checkpoint.tensors[scale].shape
        if block:
            expected = (*stack, math.ceil(rows / block[0]), math.ceil(cols / block[1]))
            fits = found == expected
        else:  # one scale per matrix
            expected, fits = stack or (1,), math.prod(found) == math.prod(stack)
        if not fits:
            raise MoECompressError(
                f"FP8 weight {key} {list(info.shape)} has scale {scale} of shape {list(found)}, but weight_block_size {block} "
                f"needs {list(expected)}: the scales do not belong to these weights. Re-download or re-convert the checkpoint."
            )
    if missing:
        others = f" (nor do {len(missing) - 1} other FP8 weights)" if len(missing) > 1 else ""
        raise MoECompressError(
            f"FP8 weight {missing[0]} has no scale {missing[0]}_scale_inv{others}, so it cannot be dequantised. "
            "Re-download the checkpoint (a shard may be missing or from another revision)."
        )


@torch.no_grad()
def check_loaded(model: PreTrainedModel, checkpoint: Checkpoint, shown_as: str, quantized: bool) -> None:
    """A model loaded whole from `checkpoint`: its headers' dtypes, then what it read, as a streamed run checks it.

    Each tensor read from the checkpoint gets `finite.check_read` (NaN/Inf, magnitude); the
    first all-zero weight matrix is warned about, and a shard whose tensors all loaded as
    zeros is refused. Tensors the model computes itself (rotary tables) are only checked to be finite.
    """
    targets, carried = checkpoint_targets(model, checkpoint)
    check_dtypes(model, checkpoint, targets, carried, quantized)
    zero: list[str] = []
    zero_shards: set[Path] = set()
    nonzero_shards: set[Path] = set()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if name not in targets:
            require_finite(tensor, f"weight {name} of {shown_as}")
            continue
        peaks = check_read(tensor, f"weight {name} of {shown_as}")
        if peaks is None:
            continue
        shards = {checkpoint.tensors[key].shard for key in targets[name]}
        if any(peaks):
            nonzero_shards |= shards
        if not all(peaks) and zero_checked(name, tensor):
            zero += [f"{name}[{i}]" if len(peaks) > 1 else name for i, peak in enumerate(peaks) if peak == 0]
            zero_shards |= shards
    filled = sorted(zero_shards - nonzero_shards)
    if filled:
        raise zero_filled(filled[0])
    if zero:
        more = f" (and {len(zero) - 1} more)" if len(zero) > 1 else ""
        warn(
            f"weight {zero[0]} of {shown_as} is all zeros{more}, which a trained model's weights never are: "
            "its shard may be damaged; re-download it if the output looks wrong."
        )
