"""What a structural command reports after it saved: the plan, the size (and quality) table, the
protocol in force, the checkpoint line, and what was written and how to load it.

Each function records what was measured in the output (model card, summary) and returns the
blocks to show, in order: rich `Table`s and result lines ("" for a line with nothing to say).
"""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from ..evaluate.protocol import EvalProtocol
from ..text.format import human_bytes, human_count
from .tables import size_table, sparsity_table, uniform_table

Blocks = list[Table | str]


def saved_lines(out: Path, protocol: EvalProtocol | None = None, before: dict[str, float] | None = None,
                after: dict[str, float] | None = None) -> list[str]:
    """After every save: record measured quality in the output, then say what was written and how to load it."""
    from ..sink.model_card import loading_info, record_evaluation

    if after and protocol is not None and before:
        record_evaluation(out, protocol.describe(), {source: (before[source], value) for source, value in after.items()})
    info = loading_info(out)
    return [f"saved {out}: {info.describe()}; model card {out / 'README.md'}", "load it with:",
            *("    " + line for line in info.snippet(str(out)).splitlines())]


def compression_report(result, verb: str, model: str, out: Path, plan_out: Path | None = None, protocol: EvalProtocol | None = None,
                       before: dict[str, float] | None = None, after: dict[str, float] | None = None) -> Blocks:
    """Also writes the plan to `plan_out` when given. `before`/`after`: perplexity per source, when measured."""
    before, after = before or {}, after or {}
    if plan_out is not None:
        result.plan.save(plan_out)
    s = result.summary
    cached = " (statistics from cache)" if s.get("statistics_from_cache") else ""
    return [
        *([result.plan.table()] if result.plan is not None else []),
        size_table(f"{verb} {model} -> {out}", s, before, after),
        protocol.describe() if after and protocol else "",
        f"checkpoint: {human_bytes(s['checkpoint_bytes'])} in {out}; time {s['seconds']:.1f}s{cached}; peak memory {human_bytes(s['peak_rss_bytes'])}",
        *saved_lines(out, protocol, before, after),
    ]


def search_line(meta: dict) -> str:
    """`condense`: what its search cost and found (the plan's `meta`)."""
    resumed = " (resumed from a saved state)" if meta["resumed"] else ""
    return (f"search: {meta['evaluations']} candidate evaluations in {meta['search_seconds']}s{resumed}; "
            f"layer order {meta['order']}, JSD {[round(v, 5) for v in meta['order_jsd']]}")


def uniform_report(plans: dict, model: str, out: Path) -> Blocks:
    """--uniform: both plans side by side; the measured quality (if any) recorded in the output."""
    from ..sink.model_card import record_uniform

    sources = list(plans["uniform"].get("perplexity") or {})
    if sources:
        record_uniform(out, plans)
    unmeasured = (f"quality of both plans not measured: add --eval bundled to measure both (perplexity, KL against the original), "
                  f"or `moe-compress eval {out} --ppl bundled --compare {model}` the saved one")
    return [uniform_table(plans, sources), "" if sources else unmeasured, plans["global"].get("note", "")]


def sparsity_report(result, method: str, targets: list[str], model: str, out: Path, protocol: EvalProtocol,
                    before: dict[str, float], after: dict[str, float]) -> Blocks:
    """`slim`: the sparsity reached per target, perplexity before/after when measured, the checkpoint, how to load it."""
    s = result.summary
    return [
        sparsity_table(f"{method} {s['sparsity']} on {', '.join(targets)}: {model} -> {out}", s["reached"]),
        size_table(f"perplexity: {model} -> {out}", {}, before, after) if after else "",
        protocol.describe() if after else "",
        f"checkpoint: {human_bytes(s['checkpoint_bytes'])} in {out}; time {s['seconds']:.1f}s; peak memory {human_bytes(s['peak_rss_bytes'])}",
        *saved_lines(out, protocol, before, after),
    ]


def quantization_report(summary: dict, out: Path) -> Blocks:
    """`quantize`: the scheme, what it quantised, the checkpoint size before and after, how to load it."""
    s = summary
    scheme = f"{s['method']} {s['bits']}-bit (group {s['group_size'] or 'per channel'}, {'symmetric' if s['symmetric'] else 'asymmetric'})"
    return [f"{scheme} {s['quantized_matrices']} matrices, {human_count(s['quantized_params'])} weights; checkpoint "
            f"{human_bytes(s['checkpoint_bytes_before'])} -> {human_bytes(s['checkpoint_bytes'])} in {out}; time {s['seconds']:.1f}s",
            *saved_lines(out)]
