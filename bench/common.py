"""Shared machinery for the benchmarks: evaluate compressed variants of a model uniformly.

Every variant is built from a fresh copy of the original model and measured the same way:
perplexity per bundled domain (test split, fixed windows), fidelity to the original on the same
windows (mean KL divergence of the next-token distributions, top-1 agreement), multiple-choice
accuracy on the project's lm-eval tasks (group `moec`), parameters, in-memory bytes,
compression time and the peak resident memory while compressing (the kernel's peak counter is
reset before each variant). Results are appended to a JSON file as they come, so a long run
can be resumed.
"""

from __future__ import annotations

import atexit
import copy
import functools
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MOE_COMPRESS_QUIET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from moe_compress import get_adapter, load_model, model_size  # noqa: E402
from moe_compress.evaluate.fidelity import FidelityTotals  # noqa: E402
from moe_compress.evaluate.lm_perplexity import next_token_nll  # noqa: E402
from moe_compress.evaluate.protocol import DEFAULT_PROTOCOL  # noqa: E402
from moe_compress.data import CalibrationSpec, bundled_domains, calibration_batches, load_texts, token_stream, windows  # noqa: E402

RESULTS = Path(__file__).parent / "results"
EVAL_BATCH = 8  # windows per forward pass, as `perplexity` and `fidelity` batch them


@dataclass
class EvalSettings:
    """How every variant is measured. Perplexity windows follow the product's evaluation
    protocol (`moe_compress.evaluate.protocol.DEFAULT_PROTOCOL`: 128 windows of 256 tokens per
    domain), so a bench table and an `eval` or `prune --eval` line are comparable."""

    seq_len: int = DEFAULT_PROTOCOL.seq_len
    ppl_windows: int = DEFAULT_PROTOCOL.windows  # per domain
    mc_limit: int | None = None  # questions per multiple-choice task (None: all)
    speed: bool = False
    mc: bool = True  # False: skip the multiple-choice tasks (rows then hold mc=None)


@dataclass
class Variant:
    """A named way to compress: `build(model, tokenizer)` compresses the given copy in place.

    It returns a dict of facts to record; a build whose result is a new model (a checkpoint
    written and reloaded, as for quantisation) returns it under the key "model".
    """

    name: str
    build: Callable
    tags: dict = field(default_factory=dict)


TASKS_DIR = Path(__file__).resolve().parent.parent / "src" / "moe_compress" / "evaluate" / "tasks"


@torch.no_grad()
def fast_multiple_choice(model, tokenizer, limit: int | None, batch_size: int = 32) -> dict[str, dict[str, float]]:
    """acc / acc_norm on our `moec` tasks, scored like lm-eval's multiple_choice, in big batches.

    lm-eval's HFLM runs one request batch at a time through its generic machinery, which on
    this 2-core machine takes ~10 minutes for the 960 requests of one evaluation; a benchmark
    grid of ~100 variants needs the same scores in seconds. Scoring rule (as lm-eval): the
    log-likelihood of each choice's tokens given the context (choice tokens = tokens of
    context+choice after the context's), acc = argmax, acc_norm = argmax of ll / len(choice).
    `bench/check_fast_mc.py` checks the two agree on the reference models.
    """
    results = {}
    for path in sorted(TASKS_DIR.glob("moec_*.jsonl")):
        items = [json.loads(line) for line in path.read_text().splitlines() if line.strip()][:limit]
        requests = []
        for item in items:
            context = tokenizer(item["context"], add_special_tokens=False)["input_ids"]
            for choice in item["choices"]:
                whole = tokenizer(item["context"] + choice, add_special_tokens=False)["input_ids"]
                requests.append((whole, len(context)))
        scores = [0.0] * len(requests)
        by_length = sorted(range(len(requests)), key=lambda i: len(requests[i][0]))  # little padding per batch
        for start in range(0, len(by_length), batch_size):
            chunk = by_length[start : start + batch_size]
            width = max(len(requests[i][0]) for i in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            for row, i in enumerate(chunk):
                ids[row, : len(requests[i][0])] = torch.tensor(requests[i][0])
            # only the positions that predict a choice token need the vocabulary projection
            first = min(requests[i][1] for i in chunk) - 1
            log_probs = torch.log_softmax(model(input_ids=ids, use_cache=False, logits_to_keep=width - first).logits.float(), dim=-1)
            for row, i in enumerate(chunk):
                tokens, context_len = requests[i]
                targets = torch.tensor(tokens[context_len:])
                positions = torch.arange(context_len - 1, len(tokens) - 1) - first
                scores[i] = float(log_probs[row, positions, targets].sum())
        correct = correct_norm = 0
        for index, item in enumerate(items):
            ll = scores[4 * index : 4 * index + 4]
            normed = [value / len(choice) for value, choice in zip(ll, item["choices"])]
            correct += int(max(range(4), key=ll.__getitem__) == item["label"])
            correct_norm += int(max(range(4), key=normed.__getitem__) == item["label"])
        results[path.stem] = {"acc": correct / len(items), "acc_norm": correct_norm / len(items)}
    results["moec"] = {k: sum(r[k] for r in results.values()) / len(results) for k in ("acc", "acc_norm")}
    return results


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def peak_rss() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
    return 0


def same_protocol(recorded: dict, settings: EvalSettings | None = None) -> bool:
    """Whether a results file was measured with the given perplexity windows (default: the protocol's)."""
    settings = settings or EvalSettings()
    return {k: recorded.get("settings", {}).get(k) for k in ("seq_len", "ppl_windows")} == {"seq_len": settings.seq_len, "ppl_windows": settings.ppl_windows}


class ReferenceLogProbs:
    """The original model's next-token log-probabilities of every evaluation window, on disk.

    Fidelity compares each variant with the original on the same windows; computing the
    original's side once and reading it back batch by batch saves a forward pass of the
    original per variant. The files are read with plain reads (never kept in memory or
    mapped), so they do not count in any variant's peak RSS.
    """

    def __init__(self, model, eval_sets: dict[str, torch.Tensor], batch_size: int):
        self.directory = Path(tempfile.mkdtemp(prefix="moec-bench-reference-"))
        atexit.register(shutil.rmtree, self.directory, True)
        self.batch_size = batch_size
        with torch.no_grad():
            for domain, data in eval_sets.items():
                with open(self.directory / domain, "wb") as handle:
                    for batch in data.split(batch_size):
                        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
                        handle.write(F.log_softmax(logits, dim=-1).numpy().tobytes())

    def read(self, domain: str, index: int, shape: torch.Size) -> torch.Tensor:
        """Batch `index` of `domain`, of the given [b, s, V] shape (batches are equal but the last)."""
        count = math.prod(shape)
        offset = index * self.batch_size * shape[1] * shape[2] * 4
        return torch.from_numpy(np.fromfile(self.directory / domain, dtype=np.float32, count=count, offset=offset).reshape(shape))


class Bench:
    def __init__(self, model_name: str, settings: EvalSettings, out: Path):
        self.model_name, self.settings, self.out = model_name, settings, out
        self.original, self.tokenizer = load_model(model_name)
        self.eval_sets = {
            d: windows(token_stream(self.tokenizer, load_texts(f"bundled:{d}", split="test")), settings.seq_len)[: settings.ppl_windows]
            for d in bundled_domains()
        }
        recorded = json.loads(out.read_text()) if out.is_file() else {}
        # Rows measured under other settings (an older evaluation protocol) are not mixed in: measured again.
        self.rows: list[dict] = recorded.get("rows", []) if same_protocol(recorded, settings) else []
        self.done = {row["variant"] for row in self.rows}
        self.speed_prompts = None

    @functools.cached_property
    def reference(self) -> ReferenceLogProbs:
        """Built on the first measurement: a resumed run whose rows are all recorded never pays for it."""
        return ReferenceLogProbs(self.original, self.eval_sets, EVAL_BATCH)

    def calibration(self, source: str = "bundled", samples: int = 64, seq_len: int = 256, seed: int = 0) -> list[torch.Tensor]:
        return calibration_batches(self.tokenizer, CalibrationSpec(source, samples, seq_len, seed))

    def measure(self, model) -> dict:
        size = model_size(model, get_adapter(model))
        row = {
            "params": size.total,
            "routed_params": size.routed_experts,
            "active_params": size.active_per_token,
            "bytes": size.bytes,
            **self._quality(model),
        }
        row["mc"] = fast_multiple_choice(model, self.tokenizer, self.settings.mc_limit) if self.settings.mc else None
        if self.settings.speed:
            from moe_compress.evaluate.speed import SpeedSettings, compare_speed, speed_prompts

            settings = SpeedSettings(batch=4, prompt_len=128, new_tokens=16, repeats=5)
            prompts = speed_prompts(self.tokenizer, model.config.vocab_size, settings)
            comparison = compare_speed(model, self.original, prompts, settings)
            row["speed"] = {"prefill_ratio": comparison.prefill_ratio, "decode_ratio": comparison.decode_ratio,
                            "prefill_tokens_per_s": comparison.model.prefill_tokens_per_s,
                            "decode_tokens_per_s": comparison.model.decode_tokens_per_s}
        return row

    @torch.no_grad()
    def _quality(self, model) -> dict:
        """Perplexity per domain and fidelity to the original, from one forward pass per window.

        The arithmetic is `moe_compress.perplexity`'s and `moe_compress.fidelity`'s (same batches,
        same float32 sums), with the original's side read from `self.reference`.
        """
        perplexities, fidelities = {}, {}
        for domain, data in self.eval_sets.items():
            nll, count, totals = 0.0, 0, FidelityTotals()
            for index, batch in enumerate(data.split(EVAL_BATCH)):
                logits = model(input_ids=batch, use_cache=False).logits
                batch_nll, predictions = next_token_nll(logits, batch)
                nll, count = nll + batch_nll, count + predictions
                log_probs = F.log_softmax(logits[:, :-1].float(), dim=-1)
                totals.add(log_probs, self.reference.read(domain, index, log_probs.shape))
            perplexities[domain] = math.exp(nll / count)
            fidelities[domain] = totals.result().to_dict()
        return {"perplexity": perplexities, "fidelity": fidelities}

    def run(self, variant: Variant) -> dict | None:
        if variant.name in self.done:
            return None
        model = copy.deepcopy(self.original) if variant.name != "original" else self.original
        reset_peak_rss()
        start = time.perf_counter()
        info = variant.build(model, self.tokenizer) or {}
        model = info.pop("model", model)
        seconds = time.perf_counter() - start
        peak = peak_rss()
        # a build's own facts win over the generic measurement (e.g. the logical parameter count
        # of a quantised model, whose reloaded packed weights count eight int4 values as one int32)
        row = {"variant": variant.name, **variant.tags, "compress_seconds": round(seconds, 2), "compress_peak_rss": peak,
               **self.measure(model), **info}
        self.rows.append(row)
        self.done.add(variant.name)
        self.save()
        print(f"{variant.name}: ppl {({k: round(v, 2) for k, v in row['perplexity'].items()})} mc {(row['mc'] or {}).get('moec', {}).get('acc')}", flush=True)
        return row

    def save(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps({"model": self.model_name, "settings": vars(self.settings), "rows": self.rows}, indent=1) + "\n")


def mean_ppl(row: dict) -> float:
    values = list(row["perplexity"].values())
    return sum(values) / len(values)


def mean_fidelity(row: dict, key: str) -> float | None:
    """Mean over domains of a fidelity measure ('kl' or 'top1_agreement'); None for rows recorded before it existed."""
    values = [f[key] for f in (row.get("fidelity") or {}).values()]
    return sum(values) / len(values) if values else None


def fidelity_columns() -> list[tuple[str, Callable[[dict], str]]]:
    """Table columns for the mean KL to the original and the top-1 agreement."""
    def show(key: str, digits: int) -> Callable[[dict], str]:
        return lambda r: "-" if mean_fidelity(r, key) is None else f"{mean_fidelity(r, key):.{digits}f}"

    return [("KL", show("kl", 4)), ("top-1 agree", show("top1_agreement", 3))]


def mc_column(key: str = "acc") -> tuple[str, Callable[[dict], str]]:
    """The `moec` accuracy column; '-' for rows measured without the multiple-choice tasks."""
    return (f"MC {key}", lambda r: f"{r['mc']['moec'][key]:.3f}" if r.get("mc") else "-")


def markdown_table(rows: list[dict], columns: list[tuple[str, Callable[[dict], str]]]) -> str:
    lines = ["| " + " | ".join(name for name, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fn(row) for _, fn in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


#: Panels of the quality-vs-size plots: the headline variants, and the robustness variants
#: (the same methods calibrated on one domain, or on more sequences) apart, so they do not hide them.
PANELS = ("main", "robustness")


def panel_of(row: dict) -> str:
    """The robustness set of bench/pruning.py: calibrated on one domain or on other than 32 sequences."""
    calibration, samples = row.get("calibration"), row.get("samples")
    return "robustness" if calibration not in (None, "all") or samples not in (None, 32) else "main"


def pareto_front(xy: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points no other point beats on both size and perplexity, by increasing size."""
    front, best = [], float("inf")
    for x, y in sorted(xy):
        if y < best:
            front.append((x, y))
            best = y
    return front


def _scatter_panels(points: dict[str, dict[str, dict[str, list[tuple[float, float]]]]], path: Path, xlabel: str, title: str) -> None:
    """Per model, a panel of the headline variants (with their Pareto front) and one of the robustness variants.

    `points[model][panel][family]`. Families named "<bench>: <name>" share a marker per bench
    (pruning circles, merging plus signs, structural squares, slimming triangles, ...) and take
    distinct colours within it; the legend sits beside each panel, outside the data.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = {"pruning": "o", "merging": "P", "structural": "s", "slimming": "^", "autoround": "v", "peers": "D", "original": "*"}
    palette = plt.get_cmap("tab20").colors
    panels = [panel for panel in PANELS if any(panel in by_panel for by_panel in points.values())]
    figure, axes = plt.subplots(len(panels), len(points), figsize=(12 * len(points), 6.5 * len(panels)), squeeze=False)
    for column, (model, by_panel) in enumerate(sorted(points.items())):
        colors: dict[str, object] = {}  # one colour per family in every panel of a model
        shade: dict[str, int] = {}
        for family in sorted({f for families in by_panel.values() for f in families}):
            group = "original" if family == "original" else family.split(":")[0] if ":" in family else ""
            colors[family] = "black" if group == "original" else palette[shade.get(group, 0) % len(palette)]
            shade[group] = shade.get(group, 0) + 1
        for row_index, panel in enumerate(panels):
            ax = axes[row_index][column]
            families = dict(by_panel.get(panel, {}))
            if "original" in by_panel.get("main", {}):  # the reference point in every panel
                families["original"] = by_panel["main"]["original"]
            everything = []
            xs = [x for xy in families.values() for x, _ in xy]
            # variants of one size share an x: spread the families sideways over 2 % of the axis at most
            step = 0.02 * (max(xs) - min(xs)) / len(families) if xs else 0.0
            for index, (family, xy) in enumerate(sorted(families.items())):
                group = "original" if family == "original" else family.split(":")[0] if ":" in family else ""
                offset = 0.0 if group == "original" else (index - len(families) / 2) * step
                ax.scatter([x + offset for x, _ in xy], [y for _, y in xy], label=family, s=70 if group == "original" else 30,
                           marker=markers.get(group, "o"), color=colors[family], edgecolors="none")
                everything += xy
            if panel == "main" and everything:
                front = pareto_front(everything)
                ax.step(*zip(*front), where="post", color="grey", linestyle="--", linewidth=1, label="Pareto front (smaller and better)")
            ax.set_xlabel(f"{xlabel}; families at one size are spread slightly sideways to stay visible")
            ax.set_ylabel("mean test perplexity over domains (log; lower is better)")
            ax.set_yscale("log")
            what = "headline variants" if panel == "main" else "robustness: calibrated on one domain or on 128/512 sequences"
            ax.set_title(f"{title}: {model} -- {what}", fontsize=10)
            ax.grid(True, which="both", alpha=0.25)
            ax.legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def quality_size_plot(rows_by_model: dict[str, list[dict]], path: Path, title: str) -> None:
    """Mean perplexity over domains vs parameters, one marker series per variant family."""
    points: dict = {}
    for model, rows in rows_by_model.items():
        for row in rows:
            family = "original" if row["variant"] == "original" else f"{row.get('plot_group', 'pruning')}: {row.get('family', row['variant'])}"
            points.setdefault(model, {}).setdefault(panel_of(row), {}).setdefault(family, []).append((row["params"] / 1e6, mean_ppl(row)))
    _scatter_panels(points, path, "parameters (M)", title)


def overview_plot(path: Path) -> None:
    """Every recorded variant of every bench (pruning and merging, structural, slimming and AutoRound)
    on one quality-vs-bytes plot per model. The peers bench is left out: its rows of ours repeat
    the pruning bench's, and the peer's checkpoint size reflects the float32 its runner loads in.

    x is the effective size in MiB (sparse matrices counted as bitmask + non-zeros, quantised
    checkpoints as stored), so pruning, merging, dropping, sparsity and quantisation share one
    axis. A row's `plot_group` tag (e.g. "merging", "autoround") overrides its bench's name in
    the legend and picks its marker. Only results measured under the current evaluation protocol
    are drawn: perplexities over other windows are not comparable.
    """
    points: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for result in sorted(RESULTS.glob("*_ref-*.json")):
        data = json.loads(result.read_text())
        if "rows" in data and not same_protocol(data):  # perplexities under other windows do not share an axis
            print(f"overview plot: {result.name} left out (measured under an older evaluation protocol)")
            continue
        bench_name = result.stem.split("_")[0]
        if bench_name == "peers":  # the same methods as pruning's rows; its sizes follow each tool's saved dtype
            continue
        for row in data.get("rows", []):
            if "perplexity" not in row:  # a run that failed (e.g. a peer's output that did not load)
                continue
            group = row.get("plot_group", bench_name)
            family = "original" if row["variant"] == "original" else f"{group}: {row.get('family', row['variant'])}"
            size = row.get("effective_bytes", row.get("checkpoint_bytes", row["bytes"])) / 2**20
            points.setdefault(data["model"], {}).setdefault(panel_of(row), {}).setdefault(family, []).append((size, mean_ppl(row)))
    if points:
        _scatter_panels(points, path, "effective size (MiB)", "quality vs size")
