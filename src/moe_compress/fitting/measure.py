"""Each candidate built and compared with the original on held-out windows, window by window.

The comparison is the one `evaluate.fidelity.compare` makes, on held-out windows (the evaluation
protocol's test split of each bundled domain, never the calibration text): mean KL(original ||
candidate) per predicted token, top-1 agreement, and both perplexities. It is kept per window
(`WindowScores`) so that `fitting.race` can stop a candidate early on the windows it has seen,
and so that a candidate's figures on the full set do not depend on the slices it was measured in.

What it costs, and why it is cheap: the candidates' forwards on the held-out windows dominate a
fit (on ref-mixtral, 16 windows of 256 tokens per domain: about 3 s per forward pass over them).
So the original's log-probabilities are computed once (`Reference`), not once per candidate, when
they take at most `REFERENCE_BYTES`; a quantised candidate is rounded in memory
(`fitting.simulate`: the same logits as its packed checkpoint reloaded, bit for bit) instead of
being written and loaded back; and the race measures most candidates on a first slice only.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..evaluate.fidelity import float_log_softmax, kl_sum
from ..evaluate.protocol import EvalProtocol, expand_sources
from ..source.allocator import activation_heap
from ..stages.base import StageContext
from ..stages.quantize import Quantize
from .search import Candidate
from .simulate import simulate, simulated
from .workspace import Workspace

#: The most bytes of the original's log-probabilities and probabilities kept for every candidate's comparison; above,
#: each candidate recomputes them.
REFERENCE_BYTES = 2 * 2**30
#: Log-probabilities per forward batch: windows per batch = this / (seq_len x vocab x 4 bytes), at least 1.
BATCH_BYTES = 2**28


def held_out_windows(tokenizer: PreTrainedTokenizerBase | None, config, windows: int, seq_len: int) -> tuple[torch.Tensor, int]:
    """(`windows` windows of `seq_len` tokens from the test split of every bundled domain, the number of domains).
    Interleaved -- the first window of each domain, then the second of each, ... -- so that every
    prefix a race stops at covers the domains alike."""
    protocol = EvalProtocol(windows, seq_len)
    per_domain = [protocol.windows_of(tokenizer, source, config, "fit's evaluation length") for source in expand_sources("bundled")]
    order = [d[i] for i in range(max(len(d) for d in per_domain)) for d in per_domain if i < len(d)]
    return torch.stack(order), len(per_domain)


def next_token_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Float32 log-probabilities of every position but the last (the ones that predict a token), on the CPU."""
    return float_log_softmax(logits[:, :-1])


def _log_probs(model: PreTrainedModel, batch: torch.Tensor, workspace: Workspace, keep: bool = False) -> torch.Tensor:
    """`next_token_log_probs` of `model` on `batch`, in `workspace` (`Workspace.log_probs`; `keep`: a tensor of their own).
    The forward's activations come from the heap where the mmap threshold is pinned (`source.allocator.activation_heap`:
    a streamed load in the same process pinned it, and each layer's blocks faulted in anew otherwise); the logits are
    freed inside it, so that what the heap kept goes back when it ends."""
    device = next(model.parameters()).device
    with activation_heap():
        return workspace.log_probs(model(input_ids=batch.to(device), use_cache=False).logits, keep)


@dataclass(frozen=True)
class ReferenceSide:
    """The original's side of a batch's comparison, what every candidate is compared with: its log-probabilities [b, s, V],
    its most likely token per position and its negative log-likelihood per window, found once, not per candidate; and,
    where memory allows a second [b, s, V] tensor, the probabilities (the exponentials are most of a KL's cost)."""

    log_probs: torch.Tensor
    top: torch.Tensor
    nll: list[float]
    probs: torch.Tensor | None = None

    @classmethod
    def of(cls, log_probs: torch.Tensor, targets: torch.Tensor, keep_probs: bool = False) -> ReferenceSide:
        """`targets` [b, s]: the tokens the positions predict."""
        return cls(log_probs, log_probs.argmax(-1), (-log_probs.gather(-1, targets[..., None]).sum((1, 2))).tolist(),
                   log_probs.exp() if keep_probs else None)

    def kl(self, mine: torch.Tensor, window: int, workspace: Workspace | None = None) -> float:
        """KL(original || mine) summed over window `window`'s positions: `F.kl_div(mine, log_probs, log_target=True)`'s sum,
        bit for bit, with or without the kept probabilities (with them, the product in `workspace`'s block)."""
        if self.probs is None:
            return kl_sum(mine[window], self.log_probs[window])
        return (workspace or Workspace()).kl(self.probs[window], self.log_probs[window], mine[window])


@dataclass
class WindowScores:
    """Per held-out window: KL summed over its predicted tokens, top-1 agreements, tokens, and both sides' negative log-likelihoods."""

    kl: list[float] = field(default_factory=list)
    agree: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    nll: list[float] = field(default_factory=list)
    nll_reference: list[float] = field(default_factory=list)

    def add(self, mine: torch.Tensor, reference: ReferenceSide, targets: torch.Tensor, workspace: Workspace | None = None) -> None:
        """`mine`: [b, s, V] log-probabilities of the positions `reference` holds, `targets` [b, s] the tokens they predict
        (`workspace`: where each window's KL takes its product, `ReferenceSide.kl`)."""
        agree = (mine.argmax(-1) == reference.top).sum(-1).tolist()
        nll = (-mine.gather(-1, targets[..., None]).sum((1, 2))).tolist()
        for w in range(mine.shape[0]):
            self.kl.append(reference.kl(mine, w, workspace))
            self.tokens.append(int(mine.shape[1]))
        self.agree += agree
        self.nll += nll
        self.nll_reference += reference.nll

    def extend(self, other: WindowScores) -> None:
        for name in ("kl", "agree", "tokens", "nll", "nll_reference"):
            getattr(self, name).extend(getattr(other, name))

    @property
    def windows(self) -> int:
        return len(self.kl)

    def mean_kl(self, windows: int | None = None) -> float:
        """KL per predicted token over the first `windows` windows (all without)."""
        return sum(self.kl[:windows]) / max(sum(self.tokens[:windows]), 1)

    def summary(self) -> dict:
        """What `evaluate.fidelity.compare` gives over these windows."""
        tokens = max(sum(self.tokens), 1)
        return {"kl": self.mean_kl(), "top1": sum(self.agree) / tokens, "perplexity": math.exp(sum(self.nll) / tokens),
                "original_perplexity": math.exp(sum(self.nll_reference) / tokens)}


def window_batches(windows: torch.Tensor, vocab: int, bounds: list[int] | None = None) -> tuple[list[torch.Tensor], list[list[int]]]:
    """The windows in forward batches of at most `BATCH_BYTES` of float32 log-probabilities, none across a slice's
    end (`bounds`, cumulative windows), and the batch indices of each slice: every path that measures the same
    windows forwards the same batches, so its figures are the same floats."""
    size = max(1, BATCH_BYTES // (windows.shape[1] * vocab * 4))
    batches, slices, start = [], [], 0
    for stop in bounds or [windows.shape[0]]:
        pieces = list(windows[start:stop].split(size))
        slices.append(list(range(len(batches), len(batches) + len(pieces))))
        batches += pieces
        start = stop
    return batches, slices


def _side(original: PreTrainedModel, batch: torch.Tensor, keep_probs: bool, workspace: Workspace) -> ReferenceSide:
    return ReferenceSide.of(_log_probs(original, batch, workspace, keep=True), batch[:, 1:], keep_probs)


@dataclass
class Reference:
    """The held-out windows in forward batches, grouped in slices (`slices`: batch indices per slice, the race's
    steps), with the original's side of each batch (`ReferenceSide`; None: too large to keep, recomputed per comparison),
    and the blocks every comparison writes its log-probabilities and KL products in (`fitting.workspace`)."""

    batches: list[torch.Tensor]
    sides: list[ReferenceSide] | None
    slices: list[list[int]]
    workspace: Workspace = field(default_factory=Workspace)

    @classmethod
    @torch.no_grad()
    def of(cls, original: PreTrainedModel, windows: torch.Tensor, bounds: list[int] | None = None) -> Reference:
        """`bounds`: where each slice ends, in windows (the last at every window; one slice without)."""
        vocab = original.config.get_text_config().vocab_size
        batches, slices = window_batches(windows, vocab, bounds)
        kept, workspace = 2 * windows.shape[0] * (windows.shape[1] - 1) * vocab * 4 <= REFERENCE_BYTES, Workspace()
        return cls(batches, [_side(original, b, True, workspace) for b in batches] if kept else None, slices, workspace)

    @property
    def windows(self) -> int:
        return sum(b.shape[0] for b in self.batches)

    def slice_windows(self, number: int) -> int:
        return sum(self.batches[i].shape[0] for i in self.slices[number])

    @torch.no_grad()
    def scores(self, model: PreTrainedModel, original: PreTrainedModel, slices: range | None = None) -> WindowScores:
        """`model` against the original on the windows of `slices` (all without), window by window."""
        scores = WindowScores()
        for number in slices if slices is not None else range(len(self.slices)):
            for i in self.slices[number]:
                reference = self.sides[i] if self.sides is not None else _side(original, self.batches[i], False, self.workspace)
                scores.add(_log_probs(model, self.batches[i], self.workspace), reference, self.batches[i][:, 1:], self.workspace)
        return scores

    def compare(self, model: PreTrainedModel, original: PreTrainedModel) -> dict:
        """KL, top-1 agreement and both perplexities of `model` against the original on every window, as
        `evaluate.fidelity.compare` gives them."""
        return self.scores(model, original).summary()


def build(
    candidate: Candidate,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    batches: list[torch.Tensor],
    group: int,
    scratch: Path,
    device: str = "cpu",
) -> PreTrainedModel:
    """`candidate`'s stages applied to a copy of `model` (a quantisation the way `fitting.simulate` covers, in
    memory at group size `group` unless the stage names its own); `model` is left as it was."""
    current = copy.deepcopy(model)
    for position, stage in enumerate(candidate.stages, 1):
        if isinstance(stage, Quantize) and simulated(stage):
            simulate(current, stage, stage.group_size if stage.group_size is not None else group)
            continue
        place = scratch / f"stage-{position}"
        place.mkdir(parents=True, exist_ok=True)
        current = stage.run(StageContext(current, tokenizer, batches, device, place)).model
    return current
