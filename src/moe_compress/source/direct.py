"""Reading a module's tensors from the checkpoint straight into their in-memory layout.

transformers' loader reads every per-expert tensor into a buffer of its own, stacks the
experts (`MergeModulelist`) and concatenates gate and up (`Concatenate`): three copies of a
fused expert tensor, each in freshly faulted pages, plus a fourth where the result had to be
realigned (`source.alignment`). On a Qwen3-30B-shaped layer that was 5.4 s of system time for
2.5 GB read, more than a third of the layer-streamed walk (bench/results/speed.md). Where a
target's conversion only moves bytes -- a renaming, or experts stacked and concatenated --
and the stored dtype is the compute dtype, the result is the stored bytes laid out anew: each
key is read once (`Checkpoint.read_into`) into its place in one buffer that torch allocated
(64-byte aligned) and that a `source.buffers.BufferPool` may have kept from the previous layer.
The bytes are those transformers would produce. Anything else (dtype casts, dequantisation,
other operations) goes through transformers' loader as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .checkpoint import Checkpoint

#: safetensors dtype names read without conversion
_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


@dataclass(frozen=True)
class DirectRead:
    """Where each checkpoint key of one target goes in its buffer.

    `parts`: (key, expert, row offset, rows) -- the key fills rows [offset, offset + rows) of
    `buffer[expert]` (a stacked target), or the whole buffer (`expert` None).
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    parts: tuple[tuple[str, int | None, int, int], ...]

    def views(self, buffer: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """(key, the contiguous part of `buffer` it is read into), in reading order."""
        return [(key, buffer if expert is None else buffer[expert].narrow(0, offset, rows)) for key, expert, offset, rows in self.parts]


def plan_direct(checkpoint: Checkpoint, keys: list[str], param: torch.Tensor, conversions: list, prefix: str, expected: dict) -> DirectRead | None:
    """How to read target `param` from `keys` without transformers' loader, or None where its conversion is more than moving bytes."""
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    if any(_DTYPES.get(checkpoint.tensors[key].dtype) != param.dtype for key in keys):
        return None
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    patterns: dict[str, list[str]] = {}
    for key in sorted(keys, key=dot_natural_key):  # the loader's order: experts by number
        _, pattern = rename_source_key(key, renamings, converters, prefix, expected)
        patterns.setdefault(pattern, []).append(key)
    shape = tuple(param.shape)
    if None in patterns:  # renamed only
        key = keys[0]
        return DirectRead(shape, param.dtype, ((key, None, 0, 0),)) if len(keys) == 1 and checkpoint.tensors[key].shape == shape else None
    converter = next(c for c in converters if next(iter(patterns)) in c.source_patterns)
    return _stacked(checkpoint, converter, patterns, shape, param.dtype)


def _stacked(checkpoint: Checkpoint, converter, patterns: dict[str, list[str]], shape: tuple[int, ...], dtype: torch.dtype) -> DirectRead | None:
    """Experts stacked (`MergeModulelist(dim=0)`), then, for several source patterns, concatenated along their rows (`Concatenate(dim=1)`)."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    operations = [(type(op), getattr(op, "dim", None)) for op in converter.operations]
    if operations not in ([(MergeModulelist, 0)], [(MergeModulelist, 0), (Concatenate, 1)]) or list(patterns) != [
        p for p in converter.source_patterns if p in patterns
    ]:
        return None
    if len(patterns) > 1 and len(operations) == 1:
        return None
    experts = len(next(iter(patterns.values())))
    parts, offset = [], 0
    for keys in patterns.values():
        stored = {checkpoint.tensors[key].shape for key in keys}
        if len(keys) != experts or len(stored) != 1:
            return None
        part = stored.pop()
        if not part or part[1:] != shape[2:]:
            return None
        parts += [(key, expert, offset, part[0]) for expert, key in enumerate(keys)]
        offset += part[0]
    return DirectRead(shape, dtype, tuple(parts)) if shape[:2] == (experts, offset) else None
