"""What a model costs to run: prefill and decode throughput, peak memory.

Timings on a shared machine drift by tens of percent from minute to minute, so a number for the
compressed model alone says little. `compare_speed` therefore runs the compressed model and the
original in the same process, alternating them round by round (A B, B A, A B, ... so neither
always goes first), and reports medians and the median of the per-round ratios: noise that hits
both halves of a round cancels in its ratio.

On CPU, more torch threads than free cores makes every step wait for a descheduled thread: on
a busy 2-core machine ref-mixtral decoded at ~9 tokens/s with 2 threads (runs spread 4x) and
~160 tokens/s with 1. `eval --threads` sets the count; the JSON records it.
"""

from __future__ import annotations

import inspect
import math
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..data.texts import bundled_domains, load_texts
from ..errors import require_positive
from ..progress import track


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass(frozen=True)
class SpeedSettings:
    batch: int = 4
    prompt_len: int = 128
    new_tokens: int = 32
    repeats: int = 5
    warmup: int = 1  # untimed runs before the calibration run
    min_seconds: float = 0.2  # each timed measurement repeats its work until it lasts at least this long

    def __post_init__(self) -> None:
        require_positive(**{f"speed.{name}": getattr(self, name) for name in ("batch", "prompt_len", "new_tokens", "repeats")})


@dataclass
class SpeedResult:
    """Median throughput of one model, with every run kept for inspection."""

    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    prefill_runs: list[float] = field(default_factory=list)
    decode_runs: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SpeedComparison:
    model: SpeedResult
    original: SpeedResult
    prefill_ratio: float  # model / original, median of per-round ratios (> 1: model is faster)
    decode_ratio: float

    def to_dict(self) -> dict:
        return {"model": self.model.to_dict(), "original": self.original.to_dict(), "prefill_ratio": self.prefill_ratio, "decode_ratio": self.decode_ratio}


def speed_prompts(
    tokenizer: PreTrainedTokenizerBase | None, vocab_size: int, settings: SpeedSettings, max_positions: int | None = None
) -> torch.Tensor:
    """[batch, prompt_len] token ids: bundled test text when there is a tokenizer, else seeded random ids.

    Real text matters for MoE models: routing (and so which experts run) depends on the tokens.
    Prompt k comes from domain k mod 3, so the batch mixes domains. Only a few documents are
    tokenised. The prompt is shortened so that prompt + new tokens fit the model's position limit.
    """
    length = settings.prompt_len
    if max_positions:
        length = max(1, min(length, max_positions - settings.new_tokens))
    domains = bundled_domains()
    if tokenizer is not None and domains:
        corpora = [load_texts(f"bundled:{d}", split="test") for d in domains]
        separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        prompts = []
        for k in range(settings.batch):
            texts, ids = corpora[k % len(corpora)], []
            for text in texts[k // len(corpora) :]:
                ids += tokenizer(text, add_special_tokens=False)["input_ids"] + separator
                if len(ids) >= length:
                    prompts.append(ids[:length])
                    break
        if len(prompts) == settings.batch:
            return torch.tensor(prompts, dtype=torch.long)
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (settings.batch, length), generator=generator)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prefill_kwargs(model: PreTrainedModel) -> dict:
    """Ask for the last position's logits only, as a server does; full-vocab logits per token are not prefill work."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


@torch.inference_mode()
def _one_run(model: PreTrainedModel, prompts: torch.Tensor, new_tokens: int, reps: tuple[int, int] = (1, 1)) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) of the prompt batch.

    Prefill builds the KV cache of the prompts; decode then generates `new_tokens` greedy tokens
    one step at a time from it. Each is repeated `reps` times and timed in total, so that a
    fast model is not timed on a few milliseconds, where scheduler noise dominates.
    """
    device = next(model.parameters()).device
    prompts = prompts.to(device)
    kwargs = _prefill_kwargs(model)
    _sync(device)
    start = time.perf_counter()
    for _ in range(reps[0]):
        out = model(input_ids=prompts, use_cache=True, **kwargs)
    _sync(device)
    prefill_s = time.perf_counter() - start
    decode_s = 0.0
    for _ in range(reps[1]):
        out = model(input_ids=prompts, use_cache=True, **kwargs)
        cache, next_ids = out.past_key_values, out.logits[:, -1:].argmax(-1)
        _sync(device)
        start = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=next_ids, past_key_values=cache, use_cache=True)
            cache, next_ids = out.past_key_values, out.logits[:, -1:].argmax(-1)
        _sync(device)
        decode_s += time.perf_counter() - start
    return reps[0] * prompts.numel() / max(prefill_s, 1e-9), reps[1] * prompts.shape[0] * new_tokens / max(decode_s, 1e-9)


def _warm_up(model: PreTrainedModel, prompts: torch.Tensor, settings: SpeedSettings) -> tuple[int, int]:
    """Run the warm-up, then one calibration run (first calls pay one-off costs), and return how
    often prefill and decode must repeat so that each timed measurement lasts `min_seconds`."""
    for _ in range(settings.warmup):
        _one_run(model, prompts, settings.new_tokens)
    prefill_rate, decode_rate = _one_run(model, prompts, settings.new_tokens)
    prefill_s = prompts.numel() / prefill_rate
    decode_s = prompts.shape[0] * settings.new_tokens / decode_rate
    return tuple(min(1000, max(1, math.ceil(settings.min_seconds / t))) for t in (prefill_s, decode_s))  # type: ignore[return-value]


def _result(runs: list[tuple[float, float]]) -> SpeedResult:
    prefill, decode = [r[0] for r in runs], [r[1] for r in runs]
    return SpeedResult(statistics.median(prefill), statistics.median(decode), prefill, decode)


def measure_speed(model: PreTrainedModel, prompts: torch.Tensor, settings: SpeedSettings = SpeedSettings()) -> SpeedResult:
    """Median prefill and decode throughput of `model` over `settings.repeats` runs (after warm-up)."""
    reps = _warm_up(model, prompts, settings)
    return _result([_one_run(model, prompts, settings.new_tokens, reps) for _ in track(range(settings.repeats), "speed")])


def compare_speed(
    model: PreTrainedModel, original: PreTrainedModel, prompts: torch.Tensor, settings: SpeedSettings = SpeedSettings()
) -> SpeedComparison:
    """Throughput of `model` against `original`, interleaved in this process (see module docstring)."""
    my_reps, their_reps = _warm_up(model, prompts, settings), _warm_up(original, prompts, settings)
    mine: list[tuple[float, float]] = []
    theirs: list[tuple[float, float]] = []
    for round_ in track(range(settings.repeats), "speed (interleaved)"):
        if round_ % 2 == 0:
            mine.append(_one_run(model, prompts, settings.new_tokens, my_reps))
            theirs.append(_one_run(original, prompts, settings.new_tokens, their_reps))
        else:
            theirs.append(_one_run(original, prompts, settings.new_tokens, their_reps))
            mine.append(_one_run(model, prompts, settings.new_tokens, my_reps))
    prefill_ratio = statistics.median(a[0] / b[0] for a, b in zip(mine, theirs))
    decode_ratio = statistics.median(a[1] / b[1] for a, b in zip(mine, theirs))
    return SpeedComparison(_result(mine), _result(theirs), prefill_ratio, decode_ratio)
