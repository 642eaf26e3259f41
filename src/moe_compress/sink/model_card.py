"""Say what a saved checkpoint is: how to load it, and a model card (`README.md`) beside it.

Every save writes the card, so every command's output explains itself to whoever finds it:
the source model, what was done (method, budget, what each layer kept), the size before and
after, the quality when it was measured, how to load it -- a stock checkpoint, or one that
needs `trust_remote_code=True` (model and tokenizer are told apart), or compressed-tensors --
and the command line that made it, with the moe-compress version.

The card is rendered from the files in the directory (config, tokenizer config, plan, summary,
recipe report) and from the provenance record saved beside it (`sink.provenance`: source, command,
earlier steps, sealed with the checkpoint it describes); so it can be rendered again after
something is added (`record_evaluation`, or the quantize stage rewriting the config), and a chain
of runs (prune, then slim, then quantize) keeps the commands of every step. A source's earlier
steps come from its own provenance record when that verifies, never from its card: a card is
text whoever published the model wrote. A source that looks made by moe-compress without a
record that verifies (an output of a version before records were kept, say) gets no earlier
steps, and the card says so.

Every string that comes from a file or from the source (its name and path, `model_type`, plan
and summary fields, commands) is escaped for Markdown and HTML (`text.markdown`), and the
YAML front matter is written through `huggingface_hub.ModelCard`. Nothing in the card depends on
time, timings or how the weights were read, so the same run streamed and in memory writes the
same bytes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

import yaml
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.repocard import metadata_load

from .. import __version__
from ..errors import warn
from ..invocation import command_line
from ..plan import layer_action
from ..text.fit_card import FIT_REPORT_FILE, fit_card_lines
from ..text.format import human_bytes, human_count, percent_change
from ..text.markdown import code, fence, text
from .provenance import API, PROVENANCE_FILE, read_provenance, write_provenance
from .rewrite import rewrite_text

CARD_FILE = "README.md"
PLAN_FILE = "moe_compress_plan.json"
SUMMARY_FILE = "moe_compress_summary.json"
REPORT_FILE = "report.json"
TAG = "moe-compress"  # every card is tagged so on the Hub


@dataclass(frozen=True)
class LoadingInfo:
    """What loading a saved checkpoint needs."""

    remote_code: bool  # the model's classes come from files in the checkpoint (auto_map)
    tokenizer_remote_code: bool
    has_tokenizer: bool
    quantization: str | None  # e.g. "compressed-tensors": a library that must be installed

    def describe(self) -> str:
        """One line: stock or remote code, for model and tokenizer."""
        model = "needs trust_remote_code=True (generated modelling code in the checkpoint)" if self.remote_code else "stock transformers checkpoint (no trust_remote_code)"
        if not self.has_tokenizer:
            tokenizer = "no tokenizer saved"
        else:
            tokenizer = (
                "tokenizer needs trust_remote_code=True" if self.tokenizer_remote_code
                else "tokenizer is stock (pass trust_remote_code=True to it too: AutoTokenizer reads the model's config)" if self.remote_code
                else "tokenizer is stock"
            )
        needs = f"; needs {self.quantization} installed" if self.quantization else ""
        return f"{model}; {tokenizer}{needs}"

    def snippet(self, path: str) -> str:
        """Python that loads it, with exactly the flags it needs."""
        where = json.dumps(path)
        model_flag = ", trust_remote_code=True" if self.remote_code else ""
        lines = ["from transformers import AutoModelForCausalLM" + (", AutoTokenizer" if self.has_tokenizer else "")]
        lines.append(f"model = AutoModelForCausalLM.from_pretrained({where}{model_flag})")
        if self.has_tokenizer:
            # AutoTokenizer reads config.json too, and asks before importing the config class it names.
            tokenizer_flag = ", trust_remote_code=True" if self.tokenizer_remote_code or self.remote_code else ""
            lines.append(f"tokenizer = AutoTokenizer.from_pretrained({where}{tokenizer_flag})")
        return "\n".join(lines)


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def loading_info(directory: str | Path) -> LoadingInfo:
    directory = Path(directory)
    config = _json(directory / "config.json")
    tokenizer = _json(directory / "tokenizer_config.json")
    quantization = config.get("quantization_config") or {}
    method = quantization.get("quant_method") if isinstance(quantization, dict) else None
    return LoadingInfo(
        remote_code=bool(config.get("auto_map")),
        tokenizer_remote_code=bool(tokenizer.get("auto_map")),
        has_tokenizer=(directory / "tokenizer_config.json").is_file() or (directory / "tokenizer.json").is_file(),
        quantization="compressed-tensors" if method == "compressed-tensors" else method,
    )


# ---- provenance ---------------------------------------------------------------------------
def _source_name(source: str | Path | None) -> str | None:
    """A bundled model by its name, anything else as given."""
    if source is None:
        return None
    from ..source.locate import BUNDLED_MODELS

    path = Path(str(source))
    try:
        if path.resolve().parent == BUNDLED_MODELS.resolve():
            return path.name
    except OSError:
        pass
    return str(source)


def _card_claims_moe_compress(card: Path) -> bool:
    """Whether a card's front matter says moe-compress made the checkpoint (every card it writes is
    tagged so; before provenance files, the front matter held a `moe_compress` record)."""
    try:
        data = metadata_load(card) if card.is_file() else None
    except (OSError, ValueError, yaml.YAMLError):
        return False
    tags = data.get("tags") if isinstance(data, dict) else None
    return isinstance(data, dict) and ("moe_compress" in data or isinstance(tags, list) and TAG in tags)


def _earlier_steps(source: str | Path | None) -> tuple[list[str], str]:
    """The commands that made `source` and how they are known (`provenance.SOURCE_KINDS`): from its
    provenance file when that verifies, never from its card, which whoever published it wrote."""
    directory = Path(str(source)) if source is not None else None
    if directory is None or not directory.is_dir():
        return [], "none"
    made = read_provenance(directory)
    if made is not None:
        return [*made["history"], made["command"]], "verified"
    if (directory / PROVENANCE_FILE).exists():
        return [], "unverified"  # read_provenance said why
    if _card_claims_moe_compress(directory / CARD_FILE):
        warn(f"{directory / CARD_FILE} says moe-compress made {directory}, but there is no {PROVENANCE_FILE} to check that against "
             "(an older moe-compress wrote it, or someone else did); the steps that made it are not listed in the new model card.")
        return [], "unverified"
    return [], "none"


def provenance(source: str | Path | None) -> dict:
    """Where a checkpoint saved now comes from: the source, this command, and the steps that
    made the source if it is itself a moe-compress output (`_earlier_steps`)."""
    history, known = _earlier_steps(source)
    return {"version": __version__, "source": _source_name(source), "command": command_line() or API, "history": history,
            "source_provenance": known}


# ---- the card ---------------------------------------------------------------------------
def _ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    parts, start = [], None
    for i, layer in enumerate(layers):
        if start is None:
            start = layer
        if i + 1 == len(layers) or layers[i + 1] != layer + 1:
            parts.append(str(start) if start == layer else f"{start}-{layer}")
            start = None
    return ", ".join(parts)


def plan_lines(plan: dict) -> list[str]:
    """What a plan does, in a few bullet lines (the full plan is in moe_compress_plan.json).

    `plan` is the file as read, of any format (a checkpoint written by an older moe-compress
    gets its card rendered again), and is not validated: the card shows what it can."""
    method = [f"method {code(plan.get('method', 'manual'))}"]
    if plan.get("ratio") is not None:
        method.append(f"ratio {text(plan['ratio'])}")
    if plan.get("budget"):
        method.append(f"{text(plan['budget'])} budget")
    lines = [", ".join(method)]
    layers = [(lp, layer_action(lp)) for lp in plan.get("layers") or []]
    dropped = [lp["layer"] for lp, action in layers if action == "drop_moe"]
    condensed = [lp for lp, action in layers if action == "condense"]
    novices = [lp for lp, action in layers if action == "novices"]
    pruned = [lp for lp, action in layers if action in ("keep", "novices", "merge")]
    if dropped:
        lines.append(f"MoE sub-layers dropped (attention kept): {_ranges(sorted(dropped))}")
    if plan.get("dropped_blocks"):
        lines.append(f"decoder blocks dropped: {_ranges(sorted(plan['dropped_blocks']))}")
    for lp in condensed:
        lines.append(f"layer {lp['layer']} condensed: no router, shared experts plus experts {text(lp['keep'] or 'none')} with constant weights")
    by_count: dict[tuple[int, int], list[int]] = {}
    for lp in pruned:
        if len(lp["keep"]) != lp["num_experts"]:
            by_count.setdefault((len(lp["keep"]), lp["num_experts"]), []).append(lp["layer"])
    for (kept, total), where in sorted(by_count.items(), key=lambda item: item[1][0]):
        lines.append(f"{kept} of {total} routed experts kept in layer{'s' if len(where) > 1 else ''} {_ranges(where)}")
    if novices:
        count = sum(lp["num_experts"] - len(lp["keep"]) for lp in novices)
        lines.append(f"{count} removed experts replaced by novice vectors (their router rows stay)")
    return lines


def _stage_lines(summary: dict) -> list[str]:
    """What a slimming, quantisation or fine-tuning step did, from its summary."""
    stage = summary.get("stage")
    if stage == "slim":
        reached = ", ".join(f"{text(kind)} {100 * row['sparsity']:.2f}%" for kind, row in (summary.get("reached") or {}).items())
        targets = ", ".join(text(target) for target in summary.get("targets") or [])
        return [f"weight sparsity: {code(summary.get('method'))} {text(summary.get('sparsity'))} on {targets}"
                + (f" (reached: {reached})" if reached else "")]
    if stage == "quantize":
        group = text(summary.get("group_size") or "per output channel")
        symmetric = "symmetric" if summary.get("symmetric") else "asymmetric"
        return [f"weights quantised to {text(summary.get('bits'))} bits (round-to-nearest, group {group}, {symmetric}, "
                f"scope {text(summary.get('scope'))}), {text(summary.get('library'))} {code(summary.get('format'))} format"]
    if "finetune" in summary:
        report = summary["finetune"]
        return [f"condensed layers fine-tuned: {text(report.get('steps'))} steps, {report.get('trainable_parameters', 0):,} trainable parameters, "
                f"training loss {report.get('first_loss', float('nan')):.4f} -> {report.get('last_loss', float('nan')):.4f}"]
    return []


def _size_table(summary: dict, weights_bytes: int) -> list[str]:
    rows = ["| | before | after | change |", "|---|---:|---:|---:|"]
    for label, key in (("parameters", "params"), ("active parameters per token", "active_params")):
        before, after = summary.get(f"{key}_before"), summary.get(f"{key}_after")
        if before and after:
            rows.append(f"| {label} | {human_count(before)} | {human_count(after)} | {percent_change(after, before)} |")
    if summary.get("bytes_before") and summary.get("bytes_after"):
        rows.append(f"| bytes in memory | {human_bytes(summary['bytes_before'])} | {human_bytes(summary['bytes_after'])} | "
                    f"{percent_change(summary['bytes_after'], summary['bytes_before'])} |")
    before_ckpt = summary.get("checkpoint_bytes_before")
    rows.append(f"| checkpoint (weight files) | {human_bytes(before_ckpt) if before_ckpt else '-'} | {human_bytes(weights_bytes)} | "
                f"{percent_change(weights_bytes, before_ckpt) if before_ckpt else '-'} |")
    return rows


def _quality_lines(summary: dict, report: dict) -> list[str]:
    evaluation = summary.get("evaluation")
    if evaluation:
        lines = [text(evaluation.get("protocol_line", "")), "", "| text | before | after | change |", "|---|---:|---:|---:|"]
        for source, row in evaluation.get("perplexity", {}).items():
            lines.append(f"| perplexity {text(source)} | {row['before']:.3f} | {row['after']:.3f} | {percent_change(row['after'], row['before'])} |")
        return lines
    if report.get("rows"):
        from ..text.composition import stage_report_markdown
        lines = ["Measured after every stage of the recipe:", "", stage_report_markdown(report).rstrip()]
        for row in report["rows"]:
            lines += _guard_lines(row.get("guard"))
        return lines
    return ["Not measured in this run: `moe-compress eval <this directory> --ppl bundled --compare <source>` measures it."]


def _guard_lines(guard: dict | None) -> list[str]:
    from ..text.guard_card import guard_lines

    if not guard:
        return []
    return ["", f"Quality guard after {text(guard['stage'])}: not run ({text(guard['skipped'])})."] if "skipped" in guard else ["", *guard_lines(guard)]


def _tag(model_type: str) -> list[str]:
    """The model type as a Hub tag, when it is a plain name (a tag is a search key, not text)."""
    return [model_type] if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", model_type) else []


def _provenance_lines(made: dict, config: dict) -> list[str]:
    """The commands that made the checkpoint, and what is known about the steps before them."""
    lines = [fence("\n".join([*made["history"], made["command"]]), "bash"), ""]
    if made["source_provenance"] == "unverified":
        lines += ["Its source looks like an earlier moe-compress output, but has no provenance record that matches its weights "
                  f"({PROVENANCE_FILE}: written before moe-compress kept one, copied from another checkpoint, or edited), "
                  "so the steps that made the source are not listed.", ""]
    lines.append(f"moe-compress {text(made['version'])}; transformers {text(config.get('transformers_version', 'unknown'))}.")
    return lines


def kept_range(outcome: dict) -> str:
    """A plan's experts kept per MoE layer in a few words: '5 each, 20 in all' or '3-7, 20 in all'."""
    counts = list(outcome["kept_per_layer"].values())
    each = f"{min(counts)} each" if min(counts) == max(counts) else f"{min(counts)}-{max(counts)}"
    return f"{each}, {sum(counts)} in all"


def uniform_lines(summary: dict) -> list[str]:
    """`--uniform`: the global plan beside the uniform one it was rounded to, so the card shows what serveability cost."""
    plans = summary.get("uniform")
    if not plans:
        return []
    sources = list(plans["uniform"].get("perplexity") or {})
    head = "| plan | experts kept per MoE layer | parameters |" + "".join(f" perplexity {text(s)} | KL {text(s)} |" for s in sources)
    lines = ["", "A global budget's plan rounded to the same expert count in every MoE layer (this checkpoint), "
             "beside the global plan (not saved), KL(original || plan) in nats per token:", "", head, "|---|---|---:|" + "---:|---:|" * len(sources)]
    for name, label in (("global", "global budget"), ("uniform", "uniform (saved)")):
        row = plans[name]
        cells = [(f"{row['perplexity'][s]:.3f}", f"{row['kl'][s]:.4f}") if row.get("perplexity") else ("-", "-") for s in sources]
        lines.append(f"| {label} | {kept_range(row)} | {human_count(row['params_after'])} |" + "".join(f" {p} | {k} |" for p, k in cells))
    if plans["global"].get("note"):
        lines += ["", text(plans["global"]["note"])]
    return lines


def render(directory: Path, made: dict) -> str:
    """The card's Markdown for the checkpoint in `directory`: the front matter through
    `huggingface_hub.ModelCard`, every string from a file or the source escaped (`text.markdown`)."""
    config = _json(directory / "config.json")
    summary = _json(directory / SUMMARY_FILE)
    plan = _json(directory / PLAN_FILE)
    report = _json(directory / REPORT_FILE)
    info = loading_info(directory)
    from ..arch.size import checkpoint_bytes

    model_type = str((config.get("moe_compress") or {}).get("base_model_type") or config.get("model_type", "unknown"))
    front = ModelCardData(library_name="transformers", tags=[TAG, "mixture-of-experts", *_tag(model_type)])
    work = [*plan_lines(plan)] if plan else []
    work += _stage_lines(summary)
    if report.get("recipe"):
        stages = ", ".join(text(next(iter(stage))) for stage in report["recipe"].get("stages", []))
        work.insert(0, f"recipe with stages: {stages} (plans in `plans/`, report in `report.md`)")
    source = made["source"] or "an in-memory model"
    out = [""]
    out.append(f"# {text(Path(source).name or source)}, compressed with moe-compress\n")
    out.append(f"A {code(model_type)} Mixture-of-Experts model compressed from {code(source)} with moe-compress {text(made['version'])}.\n")
    out.append("## What was done\n")
    out += [f"- {line}" for line in work] or ["- saved unchanged"]
    out.append("")
    out.append("## Size\n")
    out += _size_table(summary, checkpoint_bytes(directory))
    out.append("")
    out.append("## Quality\n")
    out += _quality_lines(summary, report)
    out += uniform_lines(summary)
    out += _guard_lines(summary.get("guard"))
    fit = _json(directory / FIT_REPORT_FILE)
    out += ["", "## Budget search\n", *fit_card_lines(fit)] if "candidates" in fit else []
    out.append("")
    out.append("## How to load\n")
    shown = replace(info, quantization=text(info.quantization) if info.quantization else None).describe()
    out.append(shown[0].upper() + shown[1:] + ".\n")
    out.append(fence(info.snippet("."), "python") + "\n")
    out.append('Replace "." by the path of this directory.\n')
    out.append("## How it was made\n")
    out += _provenance_lines(made, config)
    # ModelCard parses the front matter back as the Hub will; from_template is not used: it runs the body through Jinja.
    return str(ModelCard(f"---\n{front.to_yaml()}\n---\n" + "\n".join(out) + "\n"))


def write_model_card(directory: str | Path, made: dict | None = None) -> Path:
    """Write (or rewrite) `directory/README.md` and the provenance record beside it, sealed with the
    checkpoint as it is now (`sink.provenance`); `made` defaults to the record already there when it
    verifies, else to an in-memory source (the warning says why)."""
    directory = Path(directory)
    card = directory / CARD_FILE
    made = made if made is not None else read_provenance(directory) or provenance(None)
    write_provenance(directory, made)
    rewrite_text(card, render(directory, made))
    return card


def record_evaluation(directory: str | Path, protocol_line: str, perplexity: dict[str, tuple[float, float]]) -> None:
    """Add before/after perplexities to a saved checkpoint's summary, and render its card again."""
    directory = Path(directory)
    summary_path = directory / SUMMARY_FILE
    summary = _json(summary_path)
    summary["evaluation"] = {
        "protocol_line": protocol_line,
        "perplexity": {source: {"before": before, "after": after} for source, (before, after) in perplexity.items()},
    }
    _write_summary(directory, summary)


def record_guard(directory: str | Path, guard: dict) -> None:
    """Add the quality guard's result (`evaluate.guard`) to a saved checkpoint's summary, and render its card again."""
    _write_summary(Path(directory), _json(Path(directory) / SUMMARY_FILE) | {"guard": guard})


def record_uniform(directory: str | Path, plans: dict) -> None:
    """Replace a saved checkpoint's `uniform` summary (both plans, with their measured quality), and render its card again."""
    directory = Path(directory)
    _write_summary(directory, _json(directory / SUMMARY_FILE) | {"uniform": plans})


def _write_summary(directory: Path, summary: dict) -> None:
    rewrite_text(directory / SUMMARY_FILE, json.dumps(summary, indent=2, default=str) + "\n")
    write_model_card(directory)
