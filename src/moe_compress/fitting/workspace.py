"""The float32 blocks of fit's measurement written again for every batch, kept from one batch to the next.

Why: glibc serves a block above its mmap threshold (32 MiB at most by its own adjustment, 128 KiB
where a streamed load pinned it, `source.allocator`) with a mapping of its own, faulted in page by
page when first written and unmapped when freed. A batch's float32 log-probabilities (up to
`measure.BATCH_BYTES`: 8.4 MB a window at an 8 k vocabulary), the float32 logits they are taken from
and the product in each window's KL were such blocks, made anew for every batch of every candidate
(on ref-mixtral at 50 % of its bytes, with the threshold pinned as fit's sizing then left it: 4.3 M
page faults and 7 s of system time in a 21 s fit). Written into the same blocks each time, they
fault in once per fit.

The figures are the same floats: the same kernels on tensors of the same shapes (`log_softmax` with
a dtype converts its input and then takes the log-softmax of that, which is what `log_probs` does in
two steps; a KL's difference and product are taken element by element), pinned by
tests/test_fit_workspace.py against the measurement's straightforward expressions.
"""

from __future__ import annotations

import math

import torch

from ..evaluate.fidelity import float_log_softmax


class Workspace:
    """Named float32 blocks on the CPU, grown to the largest shape asked for; what one holds lasts until the next call
    for the same name. At most 2 x `measure.BATCH_BYTES` and one window's [positions, vocab] block in all."""

    def __init__(self) -> None:
        self._blocks: dict[str, torch.Tensor] = {}

    def block(self, name: str, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        """A contiguous float32 tensor of `shape` at the start of block `name` (its values whatever the block held)."""
        size = math.prod(shape)
        block = self._blocks.get(name)
        if block is None or block.numel() < size:
            self._blocks.pop(name, None)  # the smaller block goes before the larger one is made
            block = self._blocks[name] = torch.empty(size, dtype=torch.float32)
        return block[:size].view(shape)

    def log_probs(self, logits: torch.Tensor, keep: bool = False) -> torch.Tensor:
        """`measure.next_token_log_probs(logits)`, the same floats: in block "log_probs" (valid until the next call), or
        with `keep` in a tensor of its own. Logits on an accelerator take `next_token_log_probs`'s own path (its
        log-softmax runs there)."""
        positions = logits[:, :-1]
        if positions.device.type != "cpu":
            return float_log_softmax(positions)
        converted = self.block("logits", positions.shape).copy_(positions)
        return torch.log_softmax(converted, -1, out=None if keep else self.block("log_probs", positions.shape))

    def kl(self, probs: torch.Tensor, log_probs: torch.Tensor, mine: torch.Tensor) -> float:
        """sum probs * (log_probs - mine) over one window's [positions, vocab]: `measure.ReferenceSide.kl`'s float with
        the original's probabilities kept, its difference and product written in block "kl"."""
        difference = torch.sub(log_probs, mine, out=self.block("kl", mine.shape))
        return float(difference.mul_(probs).sum())
