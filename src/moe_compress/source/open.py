"""Open a model for a stage: in memory when it fits comfortably, streamed from its checkpoint when not.

`streaming="auto"` streams unless `IN_MEMORY_PEAK` times the checkpoint's weights fit in the memory
that is available -- RAM (no more than the container's cgroup limit leaves, see
`source.memory_limit`), or the GPU's free memory when computing on a GPU (an in-memory
model is moved to the device whole) -- and always for a pre-quantised (FP8, MXFP4) checkpoint. Streaming computes the same numbers (a test compares
every statistic and every written byte); it only reads each layer from disk when it is used,
so it is slower on models that would have fit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..errors import MoECompressError
from .alignment import align_weights
from .checkpoint import Checkpoint
from .origin import origin_checkpoint
from .load import load_model, load_streamed, resolve_model
from .memory_limit import cgroup_available_bytes
from .residency import InMemoryWeights, StreamedWeights, Weights

Streaming = bool | Literal["auto"]


def available_bytes(device: str | torch.device) -> int:
    """Free memory on `device`: for the CPU, the host's available RAM or what the cgroup limit leaves, whichever is less."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    host = int(psutil.virtual_memory().available)
    limited = cgroup_available_bytes()
    return host if limited is None else min(host, limited)


#: What an in-memory run peaks at, in checkpoints: 2.3-2.7x measured (bench/results/scale.md, 8.7-10 GiB
#: for a 3.7 GiB checkpoint). `auto` loads whole only when that much is free, so a model that would not
#: fit streams instead of being killed for memory (a checkpoint at 45 % of the free memory was).
IN_MEMORY_PEAK = 2.5


def should_stream(name_or_path: str | Path, streaming: Streaming, device: str | torch.device) -> bool:
    if streaming != "auto":
        return bool(streaming)
    source = Path(resolve_model(name_or_path))
    if not source.is_dir():
        return False  # a Hub id: from_pretrained downloads and loads it
    if _pre_quantised(source):
        return True  # dequantised layer by layer; written back in its own format where the plan allows
    return Checkpoint(source).total_bytes() * IN_MEMORY_PEAK > available_bytes(device)


def _pre_quantised(source: Path) -> bool:
    try:
        return bool(json.loads((source / "config.json").read_text()).get("quantization_config"))
    except (OSError, ValueError, AttributeError):
        return False


def open_model(
    model: PreTrainedModel | Weights | str | Path, device: str = "cpu", streaming: Streaming = "auto", dtype: str = "auto",
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None, Weights]:
    """(model or its meta skeleton, tokenizer or None, where its weights live).

    A name or path is opened as `streaming` says; an in-memory model or an already open
    model (`Weights`, e.g. the CLI's, opened before its "before" measurements) is used as it is. See `source.load` for `trust_remote_code`.
    """
    if streaming not in (True, False, "auto"):
        raise MoECompressError(f"streaming must be true, false or 'auto'; got {streaming!r}.")
    if isinstance(model, StreamedWeights | InMemoryWeights):
        return model.model, None, model
    if not isinstance(model, (str, Path)):
        if streaming is True:
            raise MoECompressError("streaming reads a checkpoint from disk: pass its path instead of an in-memory model.")
        align_weights(model)  # as if opened from its checkpoint (source.alignment): the same numbers either way
        return model, None, InMemoryWeights(model)
    if should_stream(model, streaming, device):
        weights, tokenizer = load_streamed(model, dtype, trust_remote_code)
        return weights.model, tokenizer, weights
    loaded, tokenizer = load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    return loaded, tokenizer, InMemoryWeights(loaded, origin_checkpoint(loaded))


__all__ = ["StreamedWeights", "Streaming", "available_bytes", "open_model", "should_stream"]
