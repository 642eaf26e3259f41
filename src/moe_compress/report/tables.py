"""The result tables the commands print, built from the reports the library returns (rich `Table`s).

Kept out of the CLI so that a notebook or script gets the same tables from the same data.
"""

from __future__ import annotations

from rich.table import Table

from ..text.format import human_bytes, human_count, percent_change

_PARTS = ("attention", "routed_experts", "shared_experts", "router", "other")


def structure_tables(report: dict) -> list[Table]:
    """`inspect`: one row per decoder layer, then the parameters by part (`arch.size.structure_report`)."""
    table = Table(title=f"{report['model']} ({report['model_type']}), top-k {report['top_k']}, {len(report['layers'])} layers")
    for column in ("layer", "kind", "routed experts", "shared-expert modules"):
        table.add_column(column, justify="right")
    for row in report["layers"]:
        table.add_row(str(row["layer"]), row["kind"], str(row["experts"] or "-"), str(row["shared_modules"] or "-"))
    size = report["size"]
    params = Table(title="parameters")
    params.add_column("part")
    params.add_column("count", justify="right")
    params.add_column("share", justify="right")
    for part in _PARTS:
        params.add_row(part.replace("_", " "), f"{size[part]:,}", f"{100 * size[part] / size['total']:.1f}%")
    params.add_row("total", f"{size['total']:,}", "100%")
    params.add_row("active per token", f"{size['active_per_token']:,}", f"{100 * size['active_per_token'] / size['total']:.1f}%")
    params.add_row("bytes in memory", human_bytes(size["bytes"]), "")
    return [table, params]


def size_table(title: str, summary: dict, before: dict[str, float], after: dict[str, float]) -> Table:
    """Parameters, active parameters and bytes before/after, and perplexity per source when measured."""
    table = Table(title=title)
    for column in ("", "before", "after", "change"):
        table.add_column(column, justify="right" if column else "left")
    for label, key, show in (("parameters", "params", human_count), ("active params/token", "active_params", human_count),
                             ("bytes in memory", "bytes", human_bytes)):
        if f"{key}_before" in summary:
            first, last = summary[f"{key}_before"], summary[f"{key}_after"]
            table.add_row(label, show(first), show(last), percent_change(last, first))
    for source, value in after.items():
        table.add_row(f"perplexity {source}", f"{before[source]:.3f}", f"{value:.3f}", percent_change(value, before[source]))
    return table


def uniform_table(plans: dict, sources: list[str]) -> Table:
    """--uniform: the global plan and its uniform rounding side by side (kept counts, size, quality when measured)."""
    from ..sink.model_card import kept_range

    table = Table(title="global plan -> uniform (stock) checkpoint")
    for column in ("plan", "experts kept per MoE layer", "parameters", *(f"{what} {s}" for s in sources for what in ("perplexity", "KL"))):
        table.add_column(column, justify="left" if column == "plan" else "right")
    for name in ("global", "uniform"):
        row = plans[name]
        cells = [f"{row[key][s]:.4f}" if row.get(key) else "-" for s in sources for key in ("perplexity", "kl")]
        table.add_row(name, kept_range(row), human_count(row["params_after"]), *cells)
    return table


def sparsity_table(title: str, reached: dict) -> Table:
    """`slim`: per target, the matrices sparsified and the sparsity they reached."""
    table = Table(title=title)
    for column in ("target", "matrices", "zeros / weights", "sparsity reached", "no calibration tokens"):
        table.add_column(column, justify="right")
    for kind, row in reached.items():
        table.add_row(kind, str(row["matrices"]), f"{row['zeros']:,} / {row['weights']:,}", f"{100 * row['sparsity']:.2f}%", str(row["no_calibration_tokens"]))
    return table


def finetune_table(report: dict, eval_data: str) -> Table:
    """`finetune`: training loss (and held-out perplexity when measured) before and after."""
    table = Table(title=f"fine-tuned {report['trainable_parameters']:,} parameters for {report['steps']} steps on {report['device']}")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_row("training loss", f"{report['first_loss']:.4f}", f"{report['last_loss']:.4f}")
    if report["perplexity_before"] is not None:
        table.add_row(f"perplexity ({eval_data}, valid)", f"{report['perplexity_before']:.3f}", f"{report['perplexity_after']:.3f}")
    return table


def family_table(rows: list) -> Table:
    """`families`: every MoE model type of the installed transformers (`listings.family_rows`)."""
    table = Table(title=f"{sum(r.supported for r in rows)} of {len(rows)} MoE model types supported")
    for column in ("model type", "supported", "router", "shared experts", "stock-loadable outputs", "notes"):
        table.add_column(column)
    for row in rows:
        table.add_row(row.model_type, "yes" if row.supported else f"no: {row.reason}", row.router, row.shared_experts, row.outputs, row.notes)
    return table


def method_tables(rows: list[dict]) -> list[Table]:
    """`methods`: the expert methods, then the other stages (`listings.method_rows`)."""
    table = Table(title="expert methods: moe-compress prune --method NAME (recipe stage: prune)")
    for column in ("family", "name", "what it does", "options (defaults)"):
        table.add_column(column)
    table.caption = ("protect_super_experts: never remove or merge experts whose down-projection output has extreme outliers "
                     "(above the 99.5th percentile and a tenth of the maximum, first 75% of layers; Su et al. 2025)")
    stages = Table(title="stages: moe-compress COMMAND, or a recipe stage of the same name")
    for column in ("stage", "what it does", "options (defaults)"):
        stages.add_column(column)
    for row in rows:
        (table if row["table"] == "methods" else stages).add_row(*row["cells"])
    return [table, stages]


def method_options_table(name: str, options: list[dict]) -> Table:
    """`methods NAME`: one method's options, each with its type, default and what it does."""
    table = Table(title=f"{name}: moe-compress prune --method {name} --option KEY=VALUE (recipe stage: prune, KEY: VALUE)")
    for column in ("option", "type", "default", "what it does"):
        table.add_column(column)
    for option in options:
        table.add_row(option["name"], option["type"], option["default"], option["help"])
    return table
