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

from ..io.residency import Weights
from ..progress import track
from .streamed import streamed_logits


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # predicted tokens
    windows: int

    def to_dict(self) -> dict:
        return asdict(self)


def next_token_nll(logits: torch.Tensor, batch: torch.Tensor) -> tuple[float, int]:
    """(summed negative log-likelihood, predictions) of windows `batch` [b, s] under their logits [b, s, V].

    Shared with callers that hold the logits already (a benchmark computing fidelity from the
    same forward pass), so every perplexity in the project is the same float32 sum.
    """
    targets = batch[:, 1:].to(logits.device)
    logits = logits[:, :-1].float()
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")), targets.numel()


@torch.no_grad()
def perplexity(
    model: PreTrainedModel, windows: torch.Tensor, batch_size: int = 8, weights: Weights | None = None, device: str = "cpu",
    description: str = "perplexity",
) -> PerplexityResult:
    """Perplexity of `model` on token windows of shape [n, seq_len].

    With streamed `weights`, the windows go through the model layer by layer (see
    `evaluate.streamed`); the numbers are the same as in memory. `description` names the
    progress bar (e.g. the text source being measured).
    """
    batches = list(windows.split(batch_size))
    totals = [0.0, 0]

    def add(_index: int, logits: torch.Tensor, batch: torch.Tensor) -> None:
        nll, predictions = next_token_nll(logits, batch)
        totals[0] += nll
        totals[1] += predictions

    if weights is not None and weights.streamed:
        streamed_logits(model, weights, batches, lambda i, logits: add(i, logits, batches[i]), device, f"{description}, layer by layer")
    else:
        model_device = next(model.parameters()).device
        for index, batch in enumerate(track(batches, description)):
            add(index, model(input_ids=batch.to(model_device), use_cache=False).logits, batch)
    mean = totals[0] / max(totals[1], 1)
    return PerplexityResult(math.exp(mean), mean, totals[1], int(windows.shape[0]))
