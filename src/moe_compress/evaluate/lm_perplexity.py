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
from transformers import PreTrainedModel

from ..source.residency import Weights
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


def next_token_nll(logits: torch.Tensor, batch: torch.Tensor, rows: int = 256) -> tuple[float, int]:
    """(summed negative log-likelihood, predictions) of windows `batch` [b, s] under their logits [b, s, V].

    Shared with callers that hold the logits already (a benchmark computing fidelity from the
    same forward pass), so every perplexity in the project is the same float32 sum.

    NLL = logsumexp(logits) - logits[target], in float32, `rows` positions at a time through one
    reused buffer: `F.cross_entropy(logits.float())` made two fresh full-vocabulary float32
    copies of every batch (67 MB each for 8 windows x 256 tokens x 8 k tokens; 1.2 GB at a 152 k
    vocabulary), and faulting their pages in cost as much system time as a quarter of the
    forward pass (`bench/speed.py`).
    """
    targets = batch[:, 1:].to(logits.device)
    predicted = logits.shape[1] - 1
    buffer = torch.empty((min(rows, predicted), logits.shape[-1]), dtype=torch.float32, device=logits.device)
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for window in range(logits.shape[0]):
        for start in range(0, predicted, rows):
            part = buffer[: min(rows, predicted - start)]
            part.copy_(logits[window, start : start + part.shape[0]])
            picked = part.gather(1, targets[window, start : start + part.shape[0], None]).squeeze(1)
            top = part.amax(-1, keepdim=True)
            total += (part.sub_(top).exp_().sum(-1).log_() + top.squeeze(1) - picked).sum()
    return float(total), targets.numel()


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
