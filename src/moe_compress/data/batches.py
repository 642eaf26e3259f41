"""Fixed-length token batches from documents, deterministic for a seed.

Documents are tokenised, joined with the end-of-text token, and cut into non-overlapping
windows of `seq_len`; a seeded shuffle picks `samples` of them. Every window is full, so
there is no padding and no attention mask to get wrong.

How much text is read (calibration): only what the requested windows need.
  * The target is ``OVERSAMPLE`` (4) x samples x seq_len tokens: four times what is used, so
    the seeded shuffle still chooses among many windows rather than taking the first ones.
  * Documents are read and tokenised in source order, a few at a time, and each contributes
    at most ``max(MIN_CHARS, CHARS_PER_TOKEN x target)`` characters (8 characters per token is
    twice the usual English BPE rate, so even a single-document source reaches the target).
    A 30 MB single-line file is therefore never tokenised whole.
  * Reading stops once the target is reached and at least ``MIN_CHARS`` (1 MiB) of text has
    been read. Below that floor a source is used whole, exactly as if everything had been
    tokenised, so small corpora (the bundled ones) give the same windows as before.
  * A source that ends before `samples` windows is an error, never a silent shortfall.
Evaluation windows (`read_windows`) are the first windows of a source, so reading stops as
soon as they are complete; the result equals cutting the fully tokenised source.
Held-out windows (`held_out_windows`, for the quality guard) are the windows calibration read
but the shuffle did not pick: disjoint from the calibration windows, from the same text.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from ..errors import MoECompressError, OptionError, param
from .texts import iter_documents

OVERSAMPLE = 4
MIN_CHARS = 1 << 20
CHARS_PER_TOKEN = 8
_GROUP_CHARS = 1 << 18  # documents tokenised per call: batching keeps the fast tokenizer fast
SAMPLES, SEQ_LEN = param("samples"), param("seq_len")  # named in messages about too little text


#: torch's generators take seeds below 2**64; a larger one would fail deep inside torch.
MAX_SEED = 2**64 - 1


def check_seed(seed: object) -> None:
    """A seed every generator here accepts: an integer from 0 to `MAX_SEED`."""
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        raise MoECompressError(f"seed must be an integer from 0 to 2**64 - 1; got {seed!r}.")


@dataclass(frozen=True)
class CalibrationSpec:
    source: str = "bundled"
    samples: int = 64
    seq_len: int = 256
    seed: int = 0
    batch_size: int = 8
    text_field: str = "text"
    split: str = "calib"

    def validate(self) -> None:
        for name in ("samples", "seq_len", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise OptionError(name, f"must be a positive integer; got {value!r}.")
        check_seed(self.seed)
        for name in ("source", "text_field", "split"):
            if not isinstance(getattr(self, name), str):
                raise OptionError(name, f"must be a string; got {getattr(self, name)!r}.")

    @property
    def target_tokens(self) -> int:
        return OVERSAMPLE * self.samples * self.seq_len


def check_seq_len(seq_len: int, config: object, option: str = "seq_len") -> None:
    """Refuse windows longer than the model's positions.

    Refused rather than warned: positions past `max_position_embeddings` were never trained
    (rotary models extrapolate badly, learned position tables fail outright), so statistics
    and perplexities measured there describe no real use of the model.
    """
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and seq_len > limit:
        raise OptionError(
            option, f"{seq_len} is longer than the model's {limit} positions (max_position_embeddings); "
            f"results past them are meaningless. Use {param(option)} {limit} or less."
        )


def _groups(texts: Iterable[str], group_chars: int) -> Iterable[list[str]]:
    group: list[str] = []
    size = 0
    for text in texts:
        group.append(text)
        size += len(text)
        if size >= group_chars:
            yield group
            group, size = [], 0
    if group:
        yield group


def token_stream(
    tokenizer: PreTrainedTokenizerBase, texts: Iterable[str], stop_tokens: int | None = None, min_chars: int = 0
) -> torch.Tensor:
    """Token ids of `texts`, each followed by the end-of-text token.

    With `stop_tokens`, reading stops at the first document boundary where that many tokens
    and at least `min_chars` characters have been read (documents are tokenised a few at a time).
    """
    separator = tokenizer.eos_token_id
    ids: list[int] = []
    chars = 0
    # Small groups when little is needed, so that reading stops close to where it may.
    group_chars = _GROUP_CHARS if stop_tokens is None else max(1, min(_GROUP_CHARS, CHARS_PER_TOKEN * stop_tokens))
    for group in _groups(texts, group_chars):
        # verbose=False: documents longer than the model's context are fine here, we cut windows.
        for text, encoded in zip(group, tokenizer(group, add_special_tokens=False, verbose=False)["input_ids"]):
            ids += encoded
            if separator is not None:
                ids.append(separator)
            chars += len(text)
            if stop_tokens is not None and len(ids) >= stop_tokens and chars >= min_chars:
                return torch.tensor(ids, dtype=torch.long)
    return torch.tensor(ids, dtype=torch.long)


def windows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping full windows of the stream, [n, seq_len]."""
    count = stream.numel() // seq_len
    return stream[: count * seq_len].view(count, seq_len)


def read_windows(
    tokenizer: PreTrainedTokenizerBase, source: str, seq_len: int, max_windows: int | None = None,
    split: str = "test", text_field: str = "text",
) -> torch.Tensor:
    """The first `max_windows` windows of `source` (all of them when None), reading no further."""
    stop = None if max_windows is None else max_windows * seq_len
    chunks = windows(token_stream(tokenizer, iter_documents(source, text_field, split), stop), seq_len)
    return chunks if max_windows is None else chunks[:max_windows]


def _shuffled_windows(tokenizer: PreTrainedTokenizerBase | None, spec: CalibrationSpec) -> torch.Tensor:
    """Every window of the text calibration reads, in the seeded shuffle's order: calibration
    takes the first `spec.samples`, held-out checks the ones after them."""
    spec.validate()
    if tokenizer is None:
        raise MoECompressError("this checkpoint has no tokenizer; calibration text cannot be tokenised. Save one beside the model.")
    target = spec.target_tokens
    documents = iter_documents(spec.source, spec.text_field, spec.split, max_chars=max(MIN_CHARS, CHARS_PER_TOKEN * target))
    stream = token_stream(tokenizer, documents, stop_tokens=target, min_chars=MIN_CHARS)
    chunks = windows(stream, spec.seq_len)
    if len(chunks) == 0:
        raise MoECompressError(
            f"calibration source {spec.source!r} has {stream.numel()} tokens, fewer than one sequence of "
            f"{SEQ_LEN} {spec.seq_len}. Give more text or a smaller {SEQ_LEN}."
        )
    if len(chunks) < spec.samples:
        raise MoECompressError(
            f"calibration source {spec.source!r} has {stream.numel()} tokens: {len(chunks)} sequence(s) of {SEQ_LEN} "
            f"{spec.seq_len}, fewer than the {spec.samples} requested ({SAMPLES}). Give more text, or lower {SAMPLES} or {SEQ_LEN}."
        )
    generator = torch.Generator().manual_seed(spec.seed)
    return chunks[torch.randperm(len(chunks), generator=generator)]


def calibration_batches(tokenizer: PreTrainedTokenizerBase | None, spec: CalibrationSpec) -> list[torch.Tensor]:
    """`spec.samples` windows picked by a seeded shuffle, in batches (see the module docstring)."""
    return list(_shuffled_windows(tokenizer, spec)[: spec.samples].split(spec.batch_size))


def held_out_windows(tokenizer: PreTrainedTokenizerBase | None, spec: CalibrationSpec, count: int) -> torch.Tensor:
    """Up to `count` windows [n, seq_len] of the calibration text that calibration with `spec` did not use.

    They are the windows the seeded shuffle puts right after the `spec.samples` it picked: cut from
    the same token stream without overlap, so they share no token with the calibration windows
    while coming from the same text (a quality check on them measures what calibration could not
    have fitted). Calibration reads `OVERSAMPLE` times what it uses, so a source at least that
    long leaves (OVERSAMPLE - 1) x samples of them.
    """
    rest = _shuffled_windows(tokenizer, spec)[spec.samples : spec.samples + count]
    if len(rest) == 0:
        raise MoECompressError(
            f"calibration source {spec.source!r} holds only the {spec.samples} windows calibration uses ({SAMPLES}), "
            f"so none is left to check quality on. Give more text or lower {SAMPLES}."
        )
    return rest


def batches_fingerprint(batches: list[torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for batch in batches:
        digest.update(str(tuple(batch.shape)).encode())
        digest.update(batch.cpu().numpy().tobytes())
    return digest.hexdigest()[:16]
