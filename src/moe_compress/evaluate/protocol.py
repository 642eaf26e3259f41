"""The evaluation protocol: how much held-out text a perplexity is measured on, defined once.

Every command that reports perplexity (`prune --eval`, `slim --eval`, `eval`, a recipe's
`evaluate`, `scripts/demo.sh`) uses `DEFAULT_PROTOCOL` unless told otherwise, and prints the
protocol in force beside its numbers, so two tables are comparable by construction.

The default: per text source (each bundled domain is one source), the first 128 windows of
256 tokens of the test split, cut without overlap (stride = window = 256), each window scored
on its own. That is 32,768 tokens (32,640 predictions) per source.

Why this size. The bundled test splits hold 272 (manpages), 292 (pydoc) and 309 (dictionary)
windows of 256 tokens -- about 70-79 k tokens per domain -- so 128 windows use under half of
the smallest and every domain gives the full amount. The spread a choice of windows causes was
measured on ref-mixtral (`scripts/eval_protocol_noise.py`): over random sets of n windows, the
relative standard deviation of a domain's perplexity falls from 5-9 % at 16 windows (the old
bench setting, 4 k tokens) to 2-3 % at 128, and that of the pruned/original perplexity ratio
-- what method comparisons rest on -- from 0.5-0.9 % to under 0.25 %, below the gaps between
the methods being compared. 256 windows would halve the cost-free part of the noise no further
than about 1.4x while doubling every evaluation's time and no longer fitting manpages'
272 windows with room to spare.

Windows are non-overlapping: every token is predicted once, with 0 to 255 tokens of context.
A source with fewer windows than asked is used whole (the result records how many windows and
tokens it was scored on).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import MoECompressError, OptionError

if TYPE_CHECKING:  # the CLI reads the defaults for its --help: this module imports nothing heavy
    import torch
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class EvalProtocol:
    """Perplexity windows: `windows` of `seq_len` tokens per source, from `split`, without overlap."""

    windows: int = 128
    seq_len: int = 256
    split: str = "test"

    @property
    def stride(self) -> int:
        return self.seq_len  # non-overlapping windows

    @property
    def tokens_per_source(self) -> int:
        return self.windows * self.seq_len

    def validate(self) -> EvalProtocol:
        """This protocol, if both counts are positive integers."""
        for name, value in (("protocol.windows", self.windows), ("protocol.seq_len", self.seq_len)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise OptionError(name, f"must be a positive integer; got {value!r}.")
        return self

    def describe(self) -> str:
        """One line saying what a perplexity in this run means."""
        default = "" if self == DEFAULT_PROTOCOL else f" (the default is {DEFAULT_PROTOCOL.windows} x {DEFAULT_PROTOCOL.seq_len})"
        return f"perplexity protocol: {self.short()}{default}"

    def short(self) -> str:
        return (
            f"{self.windows} windows x {self.seq_len} tokens per source ({self.tokens_per_source:,} tokens; "
            f"bundled text: its {self.split} split), no overlap (stride {self.stride})"
        )

    def windows_of(
        self, tokenizer: PreTrainedTokenizerBase | None, source: str, config: object = None, option: str = "protocol.seq_len"
    ) -> torch.Tensor:
        """The protocol's windows of `source` ([n, seq_len] token ids); an error if it holds not even one."""
        from ..data.batches import check_seq_len, read_windows

        if tokenizer is None:
            raise MoECompressError("this checkpoint has no tokenizer, so text cannot be evaluated.")
        if config is not None:
            check_seq_len(self.seq_len, config, option)
        chunks = read_windows(tokenizer, source, self.seq_len, self.windows, split=self.split)
        if len(chunks) == 0:
            raise MoECompressError(f"evaluation text {source!r} is shorter than one window of {self.seq_len} tokens.")
        return chunks

    def to_dict(self) -> dict:
        return {"windows": self.windows, "seq_len": self.seq_len, "stride": self.stride, "split": self.split,
                "tokens_per_source": self.tokens_per_source}


DEFAULT_PROTOCOL = EvalProtocol()


def expand_sources(sources: list[str] | str) -> list[str]:
    """'bundled' stands for one source per bundled domain, so results come per domain."""
    from ..data.texts import bundled_domains

    sources = [sources] if isinstance(sources, str) else list(sources)
    return [one for source in sources for one in ([f"bundled:{d}" for d in bundled_domains()] if source == "bundled" else [source])]
