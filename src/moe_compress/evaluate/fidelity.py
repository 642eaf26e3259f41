"""Fidelity: how closely a compressed model follows the original, token by token.

Perplexity only says how well a model predicts the text; two models can score alike while
disagreeing everywhere. Here both models read the same windows (teacher forcing: the true
previous tokens, never their own samples) and at every predicted position we compare their
next-token distributions:
  * mean KL divergence KL(P_original || P_compressed) in nats, averaged over positions;
  * top-1 agreement: the share of positions where both models' most likely token is the same.
Positions are those perplexity scores (every token of a window but the first).

Both models' log-probabilities of the same positions must be at hand together. A streamed model
(`source.residency`) first walks every window through its decoder layers, each layer read from its
checkpoint once (`streamed.BatchLogits`: the last layer's outputs of all windows are small, windows x
seq_len x hidden); then both heads turn one batch at a time into logits, and the log-probabilities are
made and compared a block of positions at a time, each block at most `chunk_bytes` of float32 per side
(`LOG_PROB_BYTES`: at Qwen3's 152 k-token vocabulary one batch of 8 windows of 512 tokens would be 2.3 GiB).

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
from .streamed import BatchLogits


@dataclass(frozen=True)
class FidelityResult:
    kl: float  # mean KL(original || compressed) per predicted token, nats
    top1_agreement: float  # share of positions whose argmax tokens agree
    tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


#: The most bytes of float32 log-probabilities made at once per model: 441 positions at a 152 k-token vocabulary.
LOG_PROB_BYTES = 256 * 2**20


def position_blocks(windows: int, positions: int, vocab: int, budget: int) -> list[tuple[slice, slice]]:
    """(windows, positions) slices covering a [windows, positions, vocab] float32 tensor, each block within
    `budget` bytes: whole windows while one fits (one block when the batch does), else parts of one window,
    one position at least."""
    window = max(positions, 1) * vocab * 4
    if window <= budget:
        step = budget // window
        return [(slice(w, w + step), slice(None)) for w in range(0, windows, step)]
    step = max(1, budget // (vocab * 4))
    return [(slice(w, w + 1), slice(p, p + step)) for w in range(windows) for p in range(0, positions, step)]


def float_log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Float32 log-probabilities on the CPU. `log_softmax` converts while it reads: the same floats as converting the
    logits first, without writing and reading them once more (a third of its time at a bf16 model's logits)."""
    return F.log_softmax(logits, dim=-1, dtype=torch.float32).cpu()


def kl_sum(mine: torch.Tensor, reference: torch.Tensor, consume: bool = False) -> float:
    """sum exp(reference) * (reference - mine): `F.kl_div(mine, reference, log_target=True, reduction="sum")`, the same
    expression and so the same float, with fewer blocks alive. kl_div makes three temporaries beside its two inputs (exp,
    difference, product: 0.43 GiB at 255 positions of a 152 k-token vocabulary); here the product is made in the
    exponentials' place, and with `consume` those are made in `reference`'s place: one temporary."""
    difference = reference - mine
    exponentials = reference.exp_() if consume else reference.exp()
    return float(exponentials.mul_(difference).sum())


class FidelityTotals:
    """Running sums of KL and argmax agreement over batches of next-token log-probabilities.

    Kept apart from `fidelity` so a caller that already holds both sides' log-probabilities
    (a benchmark reading the original's from disk) adds them without a second forward pass.
    Given the predicted tokens too, it sums both sides' negative log-likelihoods (perplexity).
    """

    def __init__(self) -> None:
        self.kl, self.agree, self.tokens = 0.0, 0, 0
        self.nll = [0.0, 0.0]  # mine, reference

    def add(self, mine: torch.Tensor, reference: torch.Tensor, targets: torch.Tensor | None = None, consume: bool = False) -> None:
        """Both [b, s, V] log-probabilities of the same positions; `targets` [b, s] the tokens they predict. `consume`:
        `reference` is this call's to overwrite (a contiguous tensor made for it), which saves a block (`kl_sum`)."""
        self.agree += int((mine.argmax(-1) == reference.argmax(-1)).sum())
        self.tokens += reference.shape[0] * reference.shape[1]
        if targets is not None:
            index = targets.to(mine.device)[..., None]
            for side, log_probs in enumerate((mine, reference)):
                self.nll[side] -= float(log_probs.gather(-1, index).sum())
        self.kl += kl_sum(mine, reference, consume)

    def add_logits(self, mine: torch.Tensor, reference: torch.Tensor, batch: torch.Tensor, budget: int = LOG_PROB_BYTES) -> None:
        """Both models' logits [b, s, V] of the token windows `batch` [b, s]: each position but the last predicts the next
        token; their log-probabilities are made and added a block of positions at a time (`position_blocks`)."""
        for windows, positions in position_blocks(batch.shape[0], batch.shape[1] - 1, mine.shape[-1], budget):
            targets = batch[windows, 1:][:, positions]
            self.add(float_log_softmax(mine[windows, :-1][:, positions]), float_log_softmax(reference[windows, :-1][:, positions]), targets, True)

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
    chunk_bytes: int = LOG_PROB_BYTES,
) -> tuple[FidelityResult, PerplexityResult, PerplexityResult]:
    """Fidelity of `model` against `original` on token windows [n, seq_len], and both perplexities, from one forward each
    (streamed: one walk over each checkpoint's layers); `chunk_bytes`: the most float32 log-probabilities per model at once."""
    batches = list(windows.split(batch_size))
    reference = BatchLogits.walk(original, batches, original_weights, device, "fidelity, reference (layers)")
    mine = BatchLogits.walk(model, batches, weights, device, "fidelity (layers)")
    totals = FidelityTotals()
    with reference.head() as reference_logits, mine.head(like=reference) as mine_logits:
        for index, batch in enumerate(track(batches, "fidelity")):
            totals.add_logits(mine_logits(index), reference_logits(index), batch, chunk_bytes)
    return totals.result(), *totals.perplexities(int(windows.shape[0]))


def fidelity(
    model: PreTrainedModel,
    original: PreTrainedModel,
    windows: torch.Tensor,
    batch_size: int = 8,
    weights: Weights | None = None,
    original_weights: Weights | None = None,
    device: str = "cpu",
    chunk_bytes: int = LOG_PROB_BYTES,
) -> FidelityResult:
    """KL divergence and top-1 agreement of `model` against `original` on token windows [n, seq_len]."""
    return compare(model, original, windows, batch_size, weights, original_weights, device, chunk_bytes)[0]
