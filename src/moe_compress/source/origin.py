"""Which checkpoint an in-memory model was loaded from, and what of it its save must carry over.

Recorded on the model by the loader (`source.load.load_model`) and read by the writer (`sink.export`):
the checkpoint's tensors transformers did not load (e.g. multi-token-prediction layers) and the
plans applied since, through which those tensors go on the way out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import PreTrainedModel

from ..plan import Plan
from .checkpoint import Checkpoint


@dataclass
class Origin:
    """The checkpoint an in-memory model was loaded from, with what its save must carry over.

    `plans` are the plans applied since loading, in order: carried tensors go through each.
    """

    checkpoint: Checkpoint
    carried: list[str]
    num_layers: int
    plans: list[Plan] = field(default_factory=list)


ORIGIN = "_moe_compress_origin"


def record_origin(model: PreTrainedModel, checkpoint: Checkpoint) -> None:
    """Remember which of `checkpoint`'s tensors `model` did not load, so a save carries them."""
    from ..arch.registry import get_adapter
    from .residency import checkpoint_targets

    _, carried = checkpoint_targets(model, checkpoint)
    setattr(model, ORIGIN, Origin(checkpoint, carried, len(get_adapter(model).decoder_layers(model))))


def origin_checkpoint(model: PreTrainedModel) -> Checkpoint | None:
    """The checkpoint `model` was loaded from (None if it was not loaded by `source.load.load_model`).

    Only as long as nothing has changed the model since is it still the checkpoint's content.
    """
    origin: Origin | None = getattr(model, ORIGIN, None)
    return origin.checkpoint if origin is not None else None
