"""The start every stage shares: check the device and the output, open the model, build the calibration batches."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..arch.registry import get_adapter
from ..data.batches import CalibrationSpec, calibration_batches as batches_of, check_seq_len
from ..errors import MoECompressError
from ..finite import require_finite_weights
from ..source.load import check_device
from ..source.open import Streaming, open_model
from ..source.residency import InMemoryWeights, StreamedWeights, Weights
from ..sink.save import check_output_dir

Calibration = CalibrationSpec | str | list[torch.Tensor]


def calibration_batches(calib: Calibration, tokenizer: PreTrainedTokenizerBase | None, config: object = None) -> list[torch.Tensor]:
    """Token batches from any calibration form; with `config`, windows must fit the model's positions."""
    if isinstance(calib, list):
        if not calib or not all(isinstance(b, torch.Tensor) and b.dim() == 2 for b in calib):
            raise MoECompressError("calibration batches must be a non-empty list of [batch, seq_len] token-id tensors.")
        if config is not None:
            check_seq_len(max(b.shape[1] for b in calib), config, "calibration sequence length")
        return calib
    spec = calib if isinstance(calib, CalibrationSpec) else CalibrationSpec(source=str(calib))
    spec.validate()
    if config is not None:
        check_seq_len(spec.seq_len, config)
    return batches_of(tokenizer, spec)


def source_of(model: PreTrainedModel | Weights | str | Path) -> str | Path | None:
    """Where a model was read from: what an output may not overwrite."""
    if isinstance(model, str | Path):
        return model
    if isinstance(model, StreamedWeights | InMemoryWeights):
        return model.checkpoint.directory if model.checkpoint is not None else getattr(model.model, "name_or_path", None)
    return getattr(model, "name_or_path", None)


def prepare(model, tokenizer, out, overwrite, device, streaming: Streaming = False, dtype: str = "auto", trust_remote_code: bool = False, inputs=()):
    """Shared start of every stage: check the device and the output first, open the model if
    given a name, and refuse non-finite weights of an in-memory model (`load_model` checks
    those it loads)."""
    check_device(device)
    if out is not None:
        check_output_dir(out, overwrite, [source_of(model), *inputs])
    if isinstance(model, PreTrainedModel):
        require_finite_weights(model)
    model, loaded_tokenizer, weights = open_model(model, device, streaming, dtype, trust_remote_code)
    if weights.streamed and out is None:
        raise MoECompressError("a streamed run keeps no model in memory: give an output directory (out=...) to write the result to.")
    return model, tokenizer or loaded_tokenizer, get_adapter(model), weights


