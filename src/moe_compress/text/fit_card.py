"""What `fit` chose and measured, as Markdown lines, from its report's JSON form (`fitting.report.report_dict`).

Rendered from the dict so that `fit_report.md` and the model card (`sink.model_card`, which renders
again from the files beside the checkpoint) show the same tables. Imports nothing heavy.
"""

from __future__ import annotations

from .format import human_bytes
from .markdown import text

#: The report `fit` writes beside its checkpoint, which the model card renders from.
FIT_REPORT_FILE = "fit_report.json"


def _width(bits: int) -> str:
    return "as stored" if bits == 16 else f"{bits} bits"


def allocation_lines(chosen: dict) -> list[str]:
    """The chosen allocation: experts kept and bit width per MoE layer, and the width of the other decoder weights."""
    lines = ["| MoE layer | experts kept | bits |", "|---:|---:|---:|"]
    lines += [f"| {layer} | {c['keep']} | {c['bits']} |" for layer, c in chosen["allocation"].items()]
    return [*lines, "", f"Other decoder weights (attention, shared experts, dense MLPs): {_width(chosen.get('other_bits', 16))}."]


def candidate_lines(report: dict) -> list[str]:
    """Every candidate measured (the front around the optimum and the single methods), the chosen one marked, and
    the held-out windows each was measured on (fewer than all: stopped early by the race, its figures on those only)."""
    lines = ["| candidate | bytes | proxy | KL | top-1 | ppl | windows |", "|---|---:|---:|---:|---:|---:|---:|"]
    for c in report["candidates"]:
        name = text(c["name"] + (f" (= {', '.join(c['aliases'])})" if c["aliases"] else "")) + (" **chosen**" if c["name"] == report["chosen"] else "")
        numbers = f"{c['kl']:.4g} | {c['top1']:.4f} | {c['perplexity']:.3f}" if "kl" in c else "- | - | -"
        lines.append(f"| {name} | {c['bytes']} | {c['proxy']:.4g} | {numbers} | {_windows(c, report)} |")
    return lines


def _windows(candidate: dict, report: dict) -> str:
    if "windows" not in candidate:
        return "-"
    return f"{candidate['windows']}" + (" (stopped early)" if candidate["windows"] < report["held_out_windows"] else "")


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
             "`fit_report.json`.", ""]
    if report["unchanged"]:
        return [*lines, "The original fits the budget: saved unchanged."]
    chosen = next((c for c in report["candidates"] if c["name"] == report["chosen"]), None)
    if chosen:
        lines += [*allocation_lines(chosen), ""]
    return [*lines, *candidate_lines(report), "", spearman_line(report)]
