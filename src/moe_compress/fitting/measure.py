"""Each candidate measured end to end: its stages applied to a copy of the model, then compared with the original.

The comparison is the one `evaluate.fidelity.compare` makes, on held-out windows (the evaluation
protocol's test split of each bundled domain, never the calibration text): mean KL(original ||
candidate) per predicted token, top-1 agreement, and both perplexities.

What it costs, and why it is cheap: the candidates' forwards on the held-out windows dominate a
fit (on ref-mixtral, 16 windows of 256 tokens per domain: about 3 s per forward pass over them).
So the original's log-probabilities are computed once (`Reference`), not once per candidate, when
they take at most `REFERENCE_BYTES`; and a quantised candidate is rounded in memory
(`fitting.simulate`: the same logits as its packed checkpoint reloaded, bit for bit) instead of
being written and loaded back. Each candidate then costs one copy of the model and one forward
pass over the windows.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..evaluate.fidelity import FidelityTotals, compare
from ..evaluate.protocol import EvalProtocol, expand_sources
from ..stages.base import StageContext
from ..stages.quantize import Quantize
from .search import Candidate
from .simulate import simulate, simulated

#: The most bytes of the original's log-probabilities kept for every candidate's comparison; above, each candidate recomputes them.
REFERENCE_BYTES = 2 * 2**30
#: Log-probabilities per forward batch: windows per batch = this / (seq_len x vocab x 4 bytes), at least 1.
BATCH_BYTES = 2**28


def held_out_windows(tokenizer: PreTrainedTokenizerBase | None, config, windows: int, seq_len: int) -> torch.Tensor:
    """`windows` windows of `seq_len` tokens from the test split of every bundled domain, stacked."""
    protocol = EvalProtocol(windows, seq_len)
    return torch.cat([protocol.windows_of(tokenizer, source, config, "fit's evaluation length") for source in expand_sources("bundled")])


def _log_probs(model: PreTrainedModel, batch: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return F.log_softmax(model(input_ids=batch.to(device), use_cache=False).logits[:, :-1].float(), dim=-1).cpu()


@dataclass
class Reference:
    """The held-out windows in forward batches, with the original's log-probabilities of each (None: too large to keep)."""

    batches: list[torch.Tensor]
    log_probs: list[torch.Tensor] | None

    @classmethod
    @torch.no_grad()
    def of(cls, original: PreTrainedModel, windows: torch.Tensor) -> Reference:
        vocab = original.config.get_text_config().vocab_size
        size = max(1, BATCH_BYTES // (windows.shape[1] * vocab * 4))
        batches = list(windows.split(size))
        kept = windows.shape[0] * (windows.shape[1] - 1) * vocab * 4 <= REFERENCE_BYTES
        return cls(batches, [_log_probs(original, b) for b in batches] if kept else None)

    @torch.no_grad()
    def compare(self, model: PreTrainedModel, original: PreTrainedModel) -> dict:
        """KL, top-1 agreement and both perplexities of `model` against the original, as `evaluate.fidelity.compare` gives them."""
        if self.log_probs is None:
            fidelity, mine, reference = compare(model, original, torch.cat(self.batches), batch_size=self.batches[0].shape[0])
        else:
            totals = FidelityTotals()
            for batch, reference_log_probs in zip(self.batches, self.log_probs):
                totals.add(_log_probs(model, batch), reference_log_probs, batch[:, 1:])
            fidelity, (mine, reference) = totals.result(), totals.perplexities(sum(b.shape[0] for b in self.batches))
        return {"kl": fidelity.kl, "top1": fidelity.top1_agreement, "perplexity": mine.perplexity, "original_perplexity": reference.perplexity}


def measure(
    candidate: Candidate,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    batches: list[torch.Tensor],
    reference: Reference,
    group: int,
    scratch: Path,
    device: str = "cpu",
) -> dict:
    """Apply `candidate`'s stages to a copy of `model` (a quantisation the way `fitting.simulate` covers, in
    memory at group size `group` unless the stage names its own) and compare it with `model`; fills `candidate.measured`."""
    current = copy.deepcopy(model)
    for position, stage in enumerate(candidate.stages, 1):
        if isinstance(stage, Quantize) and simulated(stage):
            simulate(current, stage, stage.group_size if stage.group_size is not None else group)
            continue
        place = scratch / f"stage-{position}"
        place.mkdir(parents=True, exist_ok=True)
        current = stage.run(StageContext(current, tokenizer, batches, device, place)).model
    candidate.measured = reference.compare(current, model)
    return candidate.measured
