"""What `fit` chose and measured, as Markdown lines, from its report's JSON form (`fitting.report.report_dict`).

Rendered from the dict so that `fit_report.md` and the model card (`sink.model_card`, which renders
again from the files beside the checkpoint) show the same tables. Imports nothing heavy.
"""

from __future__ import annotations

from .format import human_bytes
from .markdown import text

#: The report `fit` writes beside its checkpoint, which the model card renders from.
FIT_REPORT_FILE = "fit_report.json"
#: The same report as one self-contained page, the front plotted (`fitting.report_page`).
FIT_REPORT_PAGE = "fit_report.html"


#: Headers of the allocation entries' keys (`search.Candidate.to_dict`); any other key is shown under its own name.
_ALLOCATION_HEADERS = {"keep": "experts kept", "bits": "bits", "raised": "experts at a wider width (numbered as written)"}


def budget_line(report: dict) -> str:
    """The budget's arithmetic in one line: the whole budget, the KV cache's share, what is left for the weights."""
    return (f"Budget {human_bytes(report['budget'])} ({report['budget']} bytes); KV cache {report['kv_cache_bytes']} bytes; "
            f"weights may take {report['weight_budget']} bytes of the original's {report['original_bytes']} "
            f"(smallest reachable: {report['smallest_reachable_bytes']}).")


def width(bits: int) -> str:
    """The width of a group of weights, as the reports say it (16: as stored)."""
    return "as stored" if bits == 16 else f"{bits} bits"


def _cell(key: str, value: object, total: int | None) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value} of {total}" if key == "keep" and total is not None else str(value)


def allocation_rows(chosen: dict, experts: dict[str, int] | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and one row per MoE layer of the chosen allocation, as plain text: a column per key its entries hold, in the
    order first seen (so an action the search gains, such as dropping a layer, shows without a change here; a layer
    without that key shows "-"); `experts` (layer -> the original's experts) turns "kept" into "kept of total"."""
    keys = list(dict.fromkeys(key for entry in chosen["allocation"].values() for key in entry))
    rows = [[layer, *(_cell(key, entry[key], (experts or {}).get(layer)) if key in entry else "-" for key in keys)]
            for layer, entry in chosen["allocation"].items()]
    return ["MoE layer", *(_ALLOCATION_HEADERS.get(key, key.replace("_", " ")) for key in keys)], rows


def other_weights_line(chosen: dict) -> str:
    return f"Other decoder weights (attention, shared experts, dense MLPs): {width(chosen.get('other_bits', 16))}."


def allocation_lines(chosen: dict) -> list[str]:
    """The chosen allocation: experts kept and bit width per MoE layer, and the width of the other decoder weights."""
    header, rows = allocation_rows(chosen)
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    lines += ["| " + " | ".join(text(cell) for cell in row) + " |" for row in rows]
    return [*lines, "", other_weights_line(chosen)]


def single_method(candidate: dict) -> bool:
    """Whether a candidate is a single method at the budget (named "... alone", or its allocation equal to one)."""
    return any(" alone" in name for name in [candidate["name"], *candidate["aliases"]])


def measured_cells(candidate: dict) -> list[str]:
    """KL, top-1 and perplexity as the tables print them ("-" for a candidate not measured)."""
    if "kl" not in candidate:
        return ["-", "-", "-"]
    return [f"{candidate['kl']:.4g}", f"{candidate['top1']:.4f}", f"{candidate['perplexity']:.3f}"]


def stopped_early(candidate: dict, report: dict) -> bool:
    """Stopped by the race (`fitting.race`): measured on fewer held-out windows than the candidates that ran to the end."""
    return "windows" in candidate and candidate["windows"] < report["held_out_windows"]


def candidate_lines(report: dict) -> list[str]:
    """Every candidate measured (the front around the optimum and the single methods), the chosen one marked, and
    the held-out windows each was measured on (fewer than all: stopped early by the race, its figures on those only)."""
    lines = ["| candidate | bytes | proxy | KL | top-1 | ppl | windows |", "|---|---:|---:|---:|---:|---:|---:|"]
    for c in report["candidates"]:
        name = text(c["name"] + (f" (= {', '.join(c['aliases'])})" if c["aliases"] else "")) + (" **chosen**" if c["name"] == report["chosen"] else "")
        numbers = " | ".join(measured_cells(c))
        lines.append(f"| {name} | {c['bytes']} | {c['proxy']:.4g} | {numbers} | {_windows(c, report)} |")
    return lines


def _windows(candidate: dict, report: dict) -> str:
    if "windows" not in candidate:
        return "-"
    return f"{candidate['windows']}" + (" (stopped early)" if stopped_early(candidate, report) else "")


def spearman_line(report: dict) -> str:
    rho = report["spearman_proxy_vs_kl"]
    return (f"Spearman rank correlation, proxy vs measured KL on the windows every candidate was measured on: "
            f"{'n/a (fewer than 3 distinct points)' if rho is None else f'{rho:.3f}'}")


def versus_line(report: dict) -> list[str]:
    """The chosen candidate against the best single method measured (`fitting.report.versus_single_methods`), when one fits."""
    name = report.get("best_single_method")
    if name is None:
        return ["No single method (the criterion alone, 8-bit or 4-bit alone) fits this budget.", ""]
    chosen, single = (next(c for c in report["candidates"] if n in [c["name"], *c["aliases"]]) for n in (report["chosen"], name))
    return [f"Chosen {report['chosen']}: KL {chosen['kl']:.4g}, top-1 {chosen['top1']:.4f} against the original; best single method "
            f"measured, {name}: KL {single['kl']:.4g}, top-1 {single['top1']:.4f}"
            + ("" if single["windows"] == chosen["windows"] else f" on the first {single['windows']} windows, where the race stopped it "
               f"(there, {report['chosen']}: KL {single['chosen_kl_same_windows']:.4g})") + ".", ""]


def fit_card_lines(report: dict) -> list[str]:
    """The model card's section: the budget, the chosen allocation and the candidates measured against the original."""
    lines = [f"Chosen by `moe-compress fit` under a budget of {human_bytes(report['budget'])} ({report['budget']} bytes; "
             f"{report['weight_budget']} for the weights, of the original's {report['original_bytes']}). Every candidate was "
             "measured end to end against the original on held-out text (KL in nats per token, top-1 agreement, perplexity), "
             "raced: one clearly worse than the leader on the first windows was stopped there; the full search is in "
             f"`{FIT_REPORT_FILE}`, and as one page with the front plotted in `{FIT_REPORT_PAGE}`.", ""]
    if report["unchanged"]:
        return [*lines, "The original fits the budget: saved unchanged."]
    chosen = next((c for c in report["candidates"] if c["name"] == report["chosen"]), None)
    if chosen:
        lines += [*allocation_lines(chosen), ""]
    return [*lines, *candidate_lines(report), "", spearman_line(report)]
