"""`moe-compress eval` as a function: one model (or a compressed model and its original) measured
the same way -- perplexity, lm-eval accuracy, size, memory, speed, and fidelity to the original --
into the JSON-ready report the command prints and writes.

The command's own options are declared here (`EvaluationSettings`), beside the request they make;
importing this costs nothing (no torch): the command line reads them for its --help.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import progress
from ..described import described
from ..errors import MoECompressError, param, require_positive
from .protocol import DEFAULT_PROTOCOL, EvalProtocol

if TYPE_CHECKING:
    from ..loading import LoadSettings
    from .speed import SpeedSettings


@dataclass
class Evaluation:
    """What to measure and how: `sources` to measure perplexity on ('bundled' expands to each domain), `tasks`
    for lm-eval (comma-separated), `speed` None skips timing, `compare` names the original to evaluate beside `model`."""

    model: str
    sources: list[str] = field(default_factory=list)
    protocol: EvalProtocol = field(default_factory=EvalProtocol)
    tasks: str | None = None
    limit: int | None = None
    batch_size: int = 8
    speed: SpeedSettings | None = None
    compare: str | None = None
    dtype: str = "auto"
    device: str = "cpu"
    streaming: bool | str = "auto"
    trust_remote_code: bool = False
    threads: int | None = None  # recorded in the settings; set by the caller
    task_names: list[str] = field(default_factory=list, init=False)
    selection: Any = field(default=None, init=False)  # lm-eval's task selection (`harness.select_tasks`)

    def __post_init__(self) -> None:
        """The counts are checked when the request is made, before anything is read (the speed settings check theirs)."""
        self.protocol.validate()
        require_positive(batch_size=self.batch_size, limit=self.limit, threads=self.threads)

    def check(self) -> None:
        """Everything that can be wrong with the input fails here, before any model is loaded."""
        from ..source.load import load_config
        from .harness import parse_task_list, select_tasks
        from .protocol import expand_sources

        self.task_names = parse_task_list(self.tasks) if self.tasks is not None else []
        if self.task_names:
            with progress.step("loading lm-eval tasks"), progress.libraries_silenced():
                self.selection = select_tasks(self.task_names)
        if self.compare is not None:
            load_config(self.compare, self.trust_remote_code)
        self.sources = expand_sources(self.sources)

    def settings(self, streamed: bool) -> dict:
        return {
            "ppl": self.sources, "tasks": self.task_names, "limit": self.limit, "max_windows": self.protocol.windows,
            "batch_size": self.batch_size, "dtype": self.dtype, "device": self.device, "threads": self.threads,
            "speed": vars(self.speed) if self.speed else None, "streamed": streamed,
            "protocol": self.protocol.to_dict() if self.sources else None,
        }


@dataclass(frozen=True)
class EvaluationSettings:
    """What `eval` is asked to measure, as its options name it: the `Evaluation` it requests once the model and how
    to read it are given (`request`), and where the report goes besides the table (`json_out`)."""

    sources: list[str] | None = described(None, (
        "Text to measure perplexity on; repeatable. 'bundled' gives one result per bundled domain (test split)."))
    tasks: str | None = described(None, (
        "Comma-separated lm-evaluation-harness tasks or groups: 'moec' (our offline multiple-choice tasks on the bundled test split), "
        "its tasks, or any lm-eval task (those need the Hub)."))
    limit: int | None = described(None, "Score at most this many questions per task (the first ones).")
    speed: bool | None = described(None, (
        f"Measure prefill and decode throughput (tokens/s, greedy, KV cache). Default: on with {param('compare')}, off otherwise."))
    compare: str | None = described(None, (
        "An original model (same forms as MODEL): evaluate it the same way, show the changes, and time both interleaved in this process."))
    seq_len: int = described(DEFAULT_PROTOCOL.seq_len, "Tokens per perplexity window (windows do not overlap: the stride is the window).")
    max_windows: int = described(DEFAULT_PROTOCOL.windows, (
        "Perplexity windows per text source (the first ones of its test split; fewer if the text is shorter)."))
    batch_size: int = described(8, "Windows (perplexity) or requests (tasks) per forward pass.")
    speed_batch: int = described(4, "Prompts per batch when timing.")
    speed_prompt_len: int = described(128, "Prompt tokens per prompt when timing prefill (cut to fit the model's positions).")
    speed_new_tokens: int = described(32, "Tokens generated per prompt when timing decode.")
    speed_repeats: int = described(5, "Timed runs per model (after one warm-up); medians are reported.")
    json_out: Path | None = described(None, "Also write the results as JSON to this file.")

    def request(self, model: str, load: LoadSettings) -> Evaluation:
        """The `Evaluation` of `model` read as `load` says, every count checked (the speed settings' even when not timed).
        Speed is timed when asked, by default with a comparison (both models interleaved in one process)."""
        from ..libraries import import_model_libraries

        import_model_libraries()  # the first step of `eval` that reads anything: what follows imports them
        from .speed import SpeedSettings

        speed = SpeedSettings(self.speed_batch, self.speed_prompt_len, self.speed_new_tokens, self.speed_repeats)
        timed = self.compare is not None if self.speed is None else self.speed
        return Evaluation(model, self.sources or [], EvalProtocol(self.max_windows, self.seq_len), self.tasks, self.limit, self.batch_size,
                          speed if timed else None, self.compare, load.dtype, load.device, load.mode(), load.trust_remote_code, load.threads)


def _open(name: str, request: Evaluation):
    from ..source.open import open_model

    with progress.step(f"loading {name}"):
        return open_model(name, request.device, request.streaming, request.dtype, request.trust_remote_code)


def _checkpoint_bytes(name: str) -> int | None:
    """Weight-file bytes of a local or bundled checkpoint; None for a Hub id (nothing on disk here)."""
    from ..source.load import resolve_model
    from ..arch.size import checkpoint_bytes

    path = Path(resolve_model(name))
    return checkpoint_bytes(path) if path.is_dir() else None


def measure_model(name: str, loaded, tokenizer, request: Evaluation, weights=None, perplexities: bool = True) -> dict:
    """Everything `eval` reports for one model except speed (timed separately, so a comparison can interleave it)
    and, without `perplexities`, perplexity (a comparison measures it with fidelity, from the same forward)."""
    from ..arch import get_adapter
    from .harness import run_tasks
    from .lm_perplexity import perplexity
    from ..arch.size import model_size
    from .speed import peak_rss_bytes

    size = model_size(loaded, get_adapter(loaded))
    device = request.device
    report: dict = {
        "model": name,
        "perplexity": {
            s: perplexity(loaded, request.protocol.windows_of(tokenizer, s, loaded.config), request.batch_size, weights,
                          device, description=f"perplexity {s} ({name})").to_dict()
            for s in (request.sources if perplexities else [])
        },
        "tasks": {},
        "params": {"total": size.total, "routed": size.routed_experts, "active_per_token": size.active_per_token},
        "bytes_in_memory": size.bytes,
        "checkpoint_bytes": _checkpoint_bytes(name),
    }
    if request.selection is not None:
        with progress.step(f"lm-eval tasks {', '.join(request.selection.names)} ({name})"), progress.libraries_silenced():
            scores = run_tasks(loaded, tokenizer, request.selection, request.limit, request.batch_size, weights=weights, device=device)
        report["tasks"] = {t: s.to_dict() for t, s in scores.items()}
    report["peak_rss_bytes"] = peak_rss_bytes()
    return report


def add_fidelity(loaded, original, tokenizer, request: Evaluation, weights: tuple, report: dict) -> None:
    """Per source, KL(original || compressed) and top-1 agreement on the perplexity windows (teacher-forced) into
    report["fidelity"], and both models' perplexities from the same forward passes."""
    from .fidelity import compare

    if loaded.config.vocab_size != original.config.vocab_size:
        raise MoECompressError(
            f"{param('compare')}: vocabularies differ ({loaded.config.vocab_size} vs {original.config.vocab_size} tokens), so next-token distributions cannot be compared."
        )
    mine, theirs = weights
    report["fidelity"] = {}
    for s in request.sources:
        windows = request.protocol.windows_of(tokenizer, s, loaded.config)
        measured, report["perplexity"][s], report["original"]["perplexity"][s] = (
            r.to_dict() for r in compare(loaded, original, windows, request.batch_size, mine, theirs, request.device)
        )
        report["fidelity"][s] = measured


def comparison(mine: dict, theirs: dict, speed) -> dict:
    """Deltas of `mine` against `theirs`: ratios for costs and perplexity, differences for accuracies."""

    def ratio(a, b):
        return a / b if a is not None and b else None

    def delta(a, b):
        return a - b if a is not None and b is not None else None

    return {
        "perplexity_ratio": {s: ratio(r["perplexity"], theirs["perplexity"].get(s, {}).get("perplexity")) for s, r in mine["perplexity"].items()},
        "acc_delta": {t: delta(r["acc"], theirs["tasks"].get(t, {}).get("acc")) for t, r in mine["tasks"].items()},
        "acc_norm_delta": {t: delta(r["acc_norm"], theirs["tasks"].get(t, {}).get("acc_norm")) for t, r in mine["tasks"].items()},
        "params_ratio": {k: ratio(v, theirs["params"][k]) for k, v in mine["params"].items()},
        "checkpoint_bytes_ratio": ratio(mine["checkpoint_bytes"], theirs["checkpoint_bytes"]),
        "speed": {"prefill_ratio": speed.prefill_ratio, "decode_ratio": speed.decode_ratio} if speed is not None else None,
    }


def evaluate_models(request: Evaluation) -> dict:
    """Open and measure `request.model` (and `request.compare` beside it): the report `eval --json` writes."""
    request.check()
    from .speed import compare_speed, measure_speed, peak_rss_bytes, speed_prompts

    loaded, tokenizer, weights = _open(request.model, request)
    if request.speed and weights.streamed:
        raise MoECompressError("speed is measured on a model held in memory; pass --no-speed to evaluate a streamed model.")
    report = {"model": request.model, "seq_len": request.protocol.seq_len, "settings": request.settings(weights.streamed)}
    report |= measure_model(request.model, loaded, tokenizer, request, weights, perplexities=request.compare is None)
    original = None
    if request.compare is not None:
        original, original_tokenizer, original_weights = _open(request.compare, request)
        report["original"] = measure_model(request.compare, original, original_tokenizer, request, original_weights, perplexities=False)
        add_fidelity(loaded, original, tokenizer, request, (weights, original_weights), report)
    speed = None
    report["speed"] = None
    if request.speed:
        positions = getattr(loaded.config, "max_position_embeddings", None)
        prompts = speed_prompts(tokenizer, loaded.config.vocab_size, request.speed, positions)
        if original is not None:
            speed = compare_speed(loaded, original, prompts, request.speed)
            report["speed"], report["original"]["speed"] = speed.model.to_dict(), speed.original.to_dict()
        else:
            report["speed"] = measure_speed(loaded, prompts, request.speed).to_dict()
            report["peak_rss_bytes"] = peak_rss_bytes()
    elif original is not None:
        report["original"]["speed"] = None
    if original is not None:
        report["comparison"] = comparison(report, report["original"], speed)
    return report
