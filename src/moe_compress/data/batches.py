"""Fixed-length token batches from documents, deterministic for a seed.

Documents are tokenised, joined with the end-of-text token, and cut into non-overlapping
windows of `seq_len`; a seeded shuffle picks `samples` of them. Every window is full, so
there is no padding and no attention mask to get wrong.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from ..errors import MoECompressError
from .texts import load_texts


@dataclass(frozen=True)
class CalibrationSpec:
    source: str = "bundled"
    samples: int = 64
    seq_len: int = 256
    seed: int = 0
    batch_size: int = 8
    text_field: str = "text"
    split: str = "calib"

    def validate(self) -> None:
        for name in ("samples", "seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise MoECompressError(f"{name} must be a positive integer; got {getattr(self, name)}.")


def token_stream(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> torch.Tensor:
    separator = tokenizer.eos_token_id
    ids: list[int] = []
    # verbose=False: documents longer than the model's context are fine here, we cut windows.
    for encoded in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]:
        ids += encoded
        if separator is not None:
            ids.append(separator)
    return torch.tensor(ids, dtype=torch.long)


def windows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping full windows of the stream, [n, seq_len]."""
    count = stream.numel() // seq_len
    return stream[: count * seq_len].view(count, seq_len)


def calibration_batches(tokenizer: PreTrainedTokenizerBase | None, spec: CalibrationSpec) -> list[torch.Tensor]:
    spec.validate()
    if tokenizer is None:
        raise MoECompressError("this checkpoint has no tokenizer; calibration text cannot be tokenised. Save one beside the model.")
    stream = token_stream(tokenizer, load_texts(spec.source, spec.text_field, spec.split))
    chunks = windows(stream, spec.seq_len)
    if len(chunks) == 0:
        raise MoECompressError(
            f"calibration source {spec.source!r} has {stream.numel()} tokens, fewer than one sequence of "
            f"--seq-len {spec.seq_len}. Give more text or a smaller --seq-len."
        )
    generator = torch.Generator().manual_seed(spec.seed)
    picked = chunks[torch.randperm(len(chunks), generator=generator)[: spec.samples]]
    return list(picked.split(spec.batch_size))


def batches_fingerprint(batches: list[torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for batch in batches:
        digest.update(str(tuple(batch.shape)).encode())
        digest.update(batch.cpu().numpy().tobytes())
    return digest.hexdigest()[:16]
