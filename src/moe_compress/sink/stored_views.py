"""A pruned layer's kept experts written straight from the buffer they were read into.

A streamed prune wrote each kept expert three times over: sliced out of the fused tensor
(`surgery.experts`, into fresh memory), split back into per-expert checkpoint tensors by
transformers' reverse conversion (`Chunk` makes each part contiguous: fresh memory again), then
copied into the shard writer's buffers. On the 2-layer Qwen3-30B-shaped prune of
bench/peers.py that was 1.4 s of a 24 s run, mostly first-touch page faults. Where the fused
tensor was read by `source.direct` -- experts stacked, gate and up concatenated: bytes moved,
nothing computed -- every tensor the reverse conversion would produce for a kept expert is a
contiguous run of rows of that expert in the read buffer, so the writer can take it from there.

Names and order stay transformers' own: its reverse conversion runs twice on stand-ins --
once on meta tensors shaped like the cut layer (the names, order and shapes it would write),
once on small integer tensors numbering each (kept expert, stored part) (which output holds
which part) -- and each output is then the matching view. Anything that does not come out as
a plain split falls back to cutting and converting as before: the bytes written are the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel


@dataclass(frozen=True)
class KeptExperts:
    """A fused expert tensor as read (`source`, all experts along axis 0), the experts kept (ascending) and the
    stored parts of one expert's rows: (row offset, rows) each, in the order the loader concatenated them."""

    source: torch.Tensor
    keep: tuple[int, ...]
    parts: tuple[tuple[int, int], ...]

    def cut(self) -> torch.Tensor:
        return self.source.index_select(0, torch.tensor(self.keep)).contiguous()

    def piece(self, kept: int, part: int) -> torch.Tensor:
        return self.source[self.keep[kept]].narrow(0, *self.parts[part])


class PrunedLayer(dict):
    """One layer's tensors under in-memory names, but for its routed experts, which are `experts` (by in-memory name)."""

    def __init__(self, tensors: dict[str, torch.Tensor], experts: dict[str, KeptExperts]):
        super().__init__({name: value for name, value in tensors.items() if name not in experts})
        self.experts = experts


def reverted(model: PreTrainedModel, tensors: dict[str, torch.Tensor], skip: set[str]) -> dict[str, torch.Tensor]:
    """`tensors` but `skip` under checkpoint names (transformers' `revert_weight_conversion`); a `PrunedLayer`'s kept
    experts as views."""
    from transformers.core_model_loading import revert_weight_conversion

    kept = {name: value for name, value in tensors.items() if name not in skip}
    if not isinstance(tensors, PrunedLayer):
        return revert_weight_conversion(model, kept)
    layer = PrunedLayer(kept, {name: value for name, value in tensors.experts.items() if name not in skip})
    views = _views(model, layer)
    if views is not None:
        return views
    return revert_weight_conversion(model, {**layer, **{name: experts.cut() for name, experts in layer.experts.items()}})


def _views(model: PreTrainedModel, layer: PrunedLayer) -> dict[str, torch.Tensor] | None:
    """The layer reverted with each kept expert's parts as views of its read buffer, or None where the reverse
    conversion is not a plain split of the stand-ins (the caller then cuts and converts)."""
    from transformers.core_model_loading import revert_weight_conversion

    def meta(value: torch.Tensor, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        return torch.empty(shape or value.shape, dtype=value.dtype, device="meta")

    others = {name: meta(value) for name, value in layer.items()}
    cut = {name: meta(kept.source, (len(kept.keep), *kept.source.shape[1:])) for name, kept in layer.experts.items()}
    expected = revert_weight_conversion(model, {**others, **cut})
    own = set(revert_weight_conversion(model, others))
    numbered, owners, first = {}, [], 0
    for name, kept in layer.experts.items():  # (kept expert, part) -> one number, unique across the layer's expert tensors
        count = len(kept.keep) * len(kept.parts)
        numbered[name] = torch.arange(first, first + count).view(len(kept.keep), len(kept.parts), *[1] * (kept.source.dim() - 2))
        owners.append((first, count, kept))
        first += count
    try:
        stand_ins = revert_weight_conversion(model, {**layer, **numbered})
    except (ValueError, RuntimeError, IndexError):  # an operation that is no split of these parts
        return None
    if list(stand_ins) != list(expected):
        return None
    views, seen = {}, set()
    for key, value in stand_ins.items():
        if key in own:
            views[key] = value
            continue
        if value.dtype != torch.int64 or value.numel() != 1:
            return None
        number = int(value.reshape(-1)[0])
        start, _, kept = next(owner for owner in owners if owner[0] <= number < owner[0] + owner[1])
        piece = kept.piece(*divmod(number - start, len(kept.parts)))
        if number in seen or tuple(piece.shape) != tuple(expected[key].shape):
            return None
        seen.add(number)
        views[key] = piece
    return views if len(seen) == first else None
