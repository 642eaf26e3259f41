"""Perplexity on fixed-length windows.

Text is tokenised into one stream (documents joined by the end-of-text token) and cut into
non-overlapping windows of `seq_len` tokens. Each window is scored independently: its first
token has no context and is not predicted, so a window contributes seq_len - 1 predictions.
Perplexity = exp(total negative log-likelihood / number of predictions).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from ..progress import track


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # predicted tokens
    windows: int

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def perplexity(model: PreTrainedModel, windows: torch.Tensor, batch_size: int = 8) -> PerplexityResult:
    """Perplexity of `model` on token windows of shape [n, seq_len]."""
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for batch in track(list(windows.split(batch_size)), "perplexity"):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        targets = batch[:, 1:]
        total_nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"))
        total_tokens += targets.numel()
    mean = total_nll / max(total_tokens, 1)
    return PerplexityResult(math.exp(mean), mean, total_tokens, int(windows.shape[0]))
