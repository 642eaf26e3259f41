"""Fidelity: how closely a compressed model follows the original, token by token.

Perplexity only says how well a model predicts the text; two models can score alike while
disagreeing everywhere. Here both models read the same windows (teacher forcing: the true
previous tokens, never their own samples) and at every predicted position we compare their
next-token distributions:
  * mean KL divergence KL(P_original || P_compressed) in nats, averaged over positions;
  * top-1 agreement: the share of positions where both models' most likely token is the same.
Positions are those perplexity scores (every token of a window but the first).

Both models' log-probabilities of the same windows must be at hand together. In memory that is
one batch at a time. A streamed model (`source.residency`) is read layer by layer for a whole chunk
of batches at once; a chunk holds as many windows as fit `chunk_bytes` of log-probabilities, so
a streamed comparison reads each checkpoint once per chunk.

The same log-probabilities also give both models' perplexities (`compare`): `eval --compare`
then runs one forward per window and model, not two (one for perplexity, one for fidelity).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from ..source.residency import Weights
from ..progress import track
from .lm_perplexity import PerplexityResult
from .streamed import streamed_logits


@dataclass(frozen=True)
class FidelityResult:
    kl: float  # mean KL(original || compressed) per predicted token, nats
    top1_agreement: float  # share of positions whose argmax tokens agree
    tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


def _log_probs(model: PreTrainedModel, batches: list[torch.Tensor], weights: Weights | None, device: str) -> list[torch.Tensor]:
    """Next-token log-probabilities [b, s-1, V] (float32, CPU) of each batch."""
    if weights is not None and weights.streamed:
        out: list[torch.Tensor] = [torch.empty(0)] * len(batches)

        def keep(index: int, logits: torch.Tensor) -> None:
            out[index] = F.log_softmax(logits[:, :-1].float(), dim=-1).cpu()

        streamed_logits(model, weights, batches, keep, device, "fidelity (layers)")
        return out
    model_device = next(model.parameters()).device
    return [F.log_softmax(model(input_ids=b.to(model_device), use_cache=False).logits[:, :-1].float(), dim=-1).cpu() for b in batches]


def _chunks(batches: list[torch.Tensor], vocab: int, streamed: bool, chunk_bytes: int) -> list[list[torch.Tensor]]:
    if not streamed:
        return [[b] for b in batches]
    chunks, current, size = [], [], 0
    for batch in batches:
        part = batch.numel() * vocab * 4
        if current and size + part > chunk_bytes:
            chunks.append(current)
            current, size = [], 0
        current.append(batch)
        size += part
    return chunks + ([current] if current else [])


class FidelityTotals:
    """Running sums of KL and argmax agreement over batches of next-token log-probabilities.

    Kept apart from `fidelity` so a caller that already holds both sides' log-probabilities
    (a benchmark reading the original's from disk) adds them without a second forward pass.
    Given the predicted tokens too, it sums both sides' negative log-likelihoods (perplexity).
    """

    def __init__(self) -> None:
        self.kl, self.agree, self.tokens = 0.0, 0, 0
        self.nll = [0.0, 0.0]  # mine, reference

    def add(self, mine: torch.Tensor, reference: torch.Tensor, targets: torch.Tensor | None = None) -> None:
        """Both [b, s, V] log-probabilities of the same positions; `targets` [b, s] the tokens they predict."""
        self.kl += float(F.kl_div(mine, reference, log_target=True, reduction="sum"))
        self.agree += int((mine.argmax(-1) == reference.argmax(-1)).sum())
        self.tokens += reference.shape[0] * reference.shape[1]
        if targets is not None:
            index = targets.to(mine.device)[..., None]
            for side, log_probs in enumerate((mine, reference)):
                self.nll[side] -= float(log_probs.gather(-1, index).sum())

    def result(self) -> FidelityResult:
        return FidelityResult(self.kl / max(self.tokens, 1), self.agree / max(self.tokens, 1), self.tokens)

    def perplexities(self, windows: int) -> tuple[PerplexityResult, PerplexityResult]:
        """(mine, reference) perplexity over the positions added with their targets."""
        means = [nll / max(self.tokens, 1) for nll in self.nll]
        return tuple(PerplexityResult(math.exp(mean), mean, self.tokens, windows) for mean in means)


@torch.no_grad()
def compare(
    model: PreTrainedModel,
    original: PreTrainedModel,
    windows: torch.Tensor,
    batch_size: int = 8,
    weights: Weights | None = None,
    original_weights: Weights | None = None,
    device: str = "cpu",
    chunk_bytes: int = 2**30,
) -> tuple[FidelityResult, PerplexityResult, PerplexityResult]:
    """Fidelity of `model` against `original` on token windows [n, seq_len], and both perplexities, from one forward each."""
    totals = FidelityTotals()
    streamed = any(w is not None and w.streamed for w in (weights, original_weights))
    vocab = model.config.vocab_size if streamed else 0
    for chunk in track(_chunks(list(windows.split(batch_size)), vocab, streamed, chunk_bytes), "fidelity"):
        references = _log_probs(original, chunk, original_weights, device)
        for batch, mine, reference in zip(chunk, _log_probs(model, chunk, weights, device), references):
            totals.add(mine, reference, batch[:, 1:])
    return totals.result(), *totals.perplexities(int(windows.shape[0]))


def fidelity(
    model: PreTrainedModel,
    original: PreTrainedModel,
    windows: torch.Tensor,
    batch_size: int = 8,
    weights: Weights | None = None,
    original_weights: Weights | None = None,
    device: str = "cpu",
    chunk_bytes: int = 2**30,
) -> FidelityResult:
    """KL divergence and top-1 agreement of `model` against `original` on token windows [n, seq_len]."""
    return compare(model, original, windows, batch_size, weights, original_weights, device, chunk_bytes)[0]
