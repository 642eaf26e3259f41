"""Each candidate measured end to end: its stages run on a copy of the model, then compared with the original.

The comparison is `evaluate.fidelity.compare` on held-out windows (the evaluation protocol's test
split of each bundled domain, never the calibration text): mean KL(original || candidate) per
predicted token, top-1 agreement, and both perplexities, from one forward per window and model.
A quantised candidate is measured as saved and reloaded (the quantize stage hands back its
checkpoint), so its numbers are those of the bytes that would be written.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..evaluate.fidelity import compare
from ..evaluate.protocol import EvalProtocol, expand_sources
from ..source.checkpoint import Checkpoint
from ..stages.base import StageContext
from .search import Candidate


def held_out_windows(tokenizer: PreTrainedTokenizerBase | None, config, windows: int, seq_len: int) -> torch.Tensor:
    """`windows` windows of `seq_len` tokens from the test split of every bundled domain, stacked."""
    protocol = EvalProtocol(windows, seq_len)
    return torch.cat([protocol.windows_of(tokenizer, source, config, "fit's evaluation length") for source in expand_sources("bundled")])


def measure(
    candidate: Candidate,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    batches: list[torch.Tensor],
    windows: torch.Tensor,
    scratch: Path,
    device: str = "cpu",
) -> dict:
    """Run `candidate`'s stages on a copy of `model` and compare the result with `model`; fills `candidate.measured`."""
    start = time.perf_counter()
    current, checkpoint = copy.deepcopy(model), None
    for position, stage in enumerate(candidate.stages, 1):
        place = scratch / f"stage-{position}"
        place.mkdir(parents=True, exist_ok=True)
        outcome = stage.run(StageContext(current, tokenizer, batches, device, place))
        current, checkpoint = outcome.model, outcome.checkpoint
    fidelity, mine, original = compare(current, model, windows, device=device)
    candidate.measured = {
        "kl": fidelity.kl,
        "top1": fidelity.top1_agreement,
        "perplexity": mine.perplexity,
        "original_perplexity": original.perplexity,
        # tensor bytes as written where a stage wrote a checkpoint; otherwise the exact prediction (a prune's output, saved at the end)
        "saved_bytes": Checkpoint(checkpoint).total_bytes() if checkpoint is not None else candidate.bytes,
        "seconds": round(time.perf_counter() - start, 2),
    }
    return candidate.measured
