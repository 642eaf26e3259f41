"""Fidelity: how closely a compressed model follows the original, token by token.

Perplexity only says how well a model predicts the text; two models can score alike while
disagreeing everywhere. Here both models read the same windows (teacher forcing: the true
previous tokens, never their own samples) and at every predicted position we compare their
next-token distributions:
  * mean KL divergence KL(P_original || P_compressed) in nats, averaged over positions;
  * top-1 agreement: the share of positions where both models' most likely token is the same.
Positions are those perplexity scores (every token of a window but the first).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from ..progress import track


@dataclass(frozen=True)
class FidelityResult:
    kl: float  # mean KL(original || compressed) per predicted token, nats
    top1_agreement: float  # share of positions whose argmax tokens agree
    tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


def _log_probs(model: PreTrainedModel, batch: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    logits = model(input_ids=batch.to(device), use_cache=False).logits[:, :-1].float()
    return F.log_softmax(logits, dim=-1).cpu()


@torch.no_grad()
def fidelity(model: PreTrainedModel, original: PreTrainedModel, windows: torch.Tensor, batch_size: int = 8) -> FidelityResult:
    """KL divergence and top-1 agreement of `model` against `original` on token windows [n, seq_len]."""
    total_kl, agree, tokens = 0.0, 0, 0
    for batch in track(list(windows.split(batch_size)), "fidelity"):
        reference = _log_probs(original, batch)
        mine = _log_probs(model, batch)
        total_kl += float(F.kl_div(mine, reference, log_target=True, reduction="sum"))
        agree += int((mine.argmax(-1) == reference.argmax(-1)).sum())
        tokens += reference.shape[0] * reference.shape[1]
    return FidelityResult(total_kl / max(tokens, 1), agree / max(tokens, 1), tokens)
