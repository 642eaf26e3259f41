"""`fit_report.html`: what `fit` found, as one self-contained page to mail or attach to an issue.

Rendered from the report's JSON form (`fitting.report.report_dict`), as `fit_report.md` and the model
card are, with the same cells (`text.fit_card`) and the pieces `analyze --report` uses (`report.page`):
the budget, the chosen candidate, the front plotted (`fitting.front_plot`, embedded as base64 PNG),
the chosen allocation per MoE layer (experts kept of the original's, bits, and whatever else an
allocation entry holds), and every candidate measured with the windows it was measured on.
"""

from __future__ import annotations

import html
from pathlib import Path

from ..report.page import document, image, table
from .front_plot import MARKS
from ..text.fit_card import allocation_rows, budget_line, measured_cells, other_weights_line, spearman_line, stopped_early, versus_line, width

_STYLE = "td.chosen { background: #dfd; font-weight: bold; }\ntd:first-child { text-align: left; }\n"


def _paragraph(line: str, css: str = "") -> str:
    opening = f'<p class="{css}">' if css else "<p>"
    return f"{opening}{html.escape(line)}</p>"


def candidate_table(report: dict) -> str:
    """Every candidate: bytes, the other weights' width, proxy, KL, top-1, perplexity, windows measured, stopped early; the chosen one marked."""
    header = ["candidate", "bytes", "other weights", "proxy", "KL", "top-1", "perplexity", "windows measured", "stopped early"]
    rows, marked = [], {}
    for index, c in enumerate(report["candidates"]):
        name = c["name"] + (f" (= {', '.join(c['aliases'])})" if c["aliases"] else "")
        if c["name"] == report["chosen"]:
            name, marked[index] = f"{name} (chosen)", "chosen"
        stopped = f"yes, of {report['held_out_windows']}" if stopped_early(c, report) else "no"
        rows.append([name, str(c["bytes"]), width(c["other_bits"]), f"{c['proxy']:.4g}", *measured_cells(c),
                     str(c.get("windows", "-")), stopped if "windows" in c else "-"])
    return table(header, rows, marked)


def _chosen_line(chosen: dict) -> str:
    if "kl" not in chosen:
        return "Not measured."
    return (f"KL {chosen['kl']:.4g} nats / token, top-1 {chosen['top1']:.4f} against the original; perplexity {chosen['perplexity']:.3f} "
            f"(the original's {chosen['original_perplexity']:.3f}); {chosen.get('written_bytes', chosen['bytes'])} bytes written; "
            f"measured on {chosen['windows']} held-out windows.")


def page(report: dict, plot: Path | None) -> str:
    """The whole page; `plot`: the front's PNG to embed (None: matplotlib is missing, said on the page)."""
    body = ["<h1>moe-compress fit: the best model under a byte budget</h1>", _paragraph(budget_line(report))]
    if report["unchanged"]:
        return document("moe-compress fit", [*body, _paragraph("The original fits the budget: written unchanged.")], _STYLE)
    chosen = next((c for c in report["candidates"] if c["name"] == report["chosen"]), None)
    if chosen is not None:
        body += [f"<h2>Chosen: {html.escape(chosen['name'])}</h2>", _paragraph(_chosen_line(chosen))]
    body += ["<h2>The front</h2>", _paragraph(MARKS, "note"),
             image(plot) if plot is not None else _paragraph("No plot: matplotlib is not installed (pip install matplotlib).", "note")]
    if chosen is not None:
        body += ["<h2>Allocation of the chosen candidate, per MoE layer</h2>", table(*allocation_rows(chosen, report.get("experts"))),
                 _paragraph(other_weights_line(chosen))]
    body += ["<h2>Candidates measured</h2>", candidate_table(report), _paragraph(spearman_line(report)),
             *(_paragraph(line) for line in versus_line(report) if line)]
    return document(f"moe-compress fit: {report['chosen']}", body, _STYLE)
