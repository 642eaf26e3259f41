"""`fit` at fractions of the original bytes, against the single-method configurations it measures beside its own.

    python bench/fit.py --model ref-mixtral --model ref-deepseek --fraction 0.5 --fraction 0.35 --fraction 0.25

Per (model, fraction): `mc.fit(model, target_ratio=fraction)`; every candidate it measured (its
solver optimum, front points, and the single methods that fit: REAP alone at the smallest layer
ratio that fits, 8-bit alone, 4-bit alone -- the routed experts, or every decoder weight where
that alone fits) with bytes, proxy, held-out KL, top-1 and perplexity, the Spearman correlation of
proxy and KL, the chosen one, whether its KL is strictly lower than every single method's that
fits, and the wall time of the whole fit (per phase: `FitResult.seconds`) against one REAP prune
(`Prune("reap", ratio=0.25)`) with the same calibration, both with a cold statistics cache and
after the library's imports, each in a Python process of its own (`--timed`): in one process, the prune
after a fit ran at a speed set by what the fit left in glibc's heap (ref-deepseek at 50 %: 8.3-9.1 s
after one fit, 5.2 s after a faster one, 6.3-6.8 s alone). Results: bench/results/fit.json, bench/results/fit.md and the front plotted per
cell, bench/results/fit_front.png (KL against saved bytes, marked as `fitting.front_plot` says).

    python bench/fit.py --report

rebuilds fit.md and fit_front.png from the recorded fit.json without measuring anything, keeping the command
recorded in fit.md and the notes written there by hand below its summary.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MOE_COMPRESS_QUIET", "1")

import moe_compress as mc  # noqa: E402
from moe_compress.fitting import api, measure, proxies, search, simulate, write  # noqa: E402,F401  (imported before any timing)
from moe_compress.fitting.front_plot import MARKS, legend_handles, mark, pyplot  # noqa: E402
from moe_compress.fitting.report import report_dict  # noqa: E402

RESULTS = Path(__file__).parent / "results"
FRONT = RESULTS / "fit_front.png"


def _timed(kind: str, model: str, fraction: float, samples: int, windows: int) -> dict:
    """`--timed`: one fit (its seconds, phases and report) or one REAP prune (its seconds) in this process, from a cold
    statistics cache; a fit's refusal as {"refused": ...}."""
    calib = mc.CalibrationSpec(samples=samples)
    with tempfile.TemporaryDirectory() as scratch:
        os.environ["MOE_COMPRESS_CACHE"] = str(Path(scratch) / "cache")  # a cold cache: each run pays its calibration
        start = time.perf_counter()
        if kind == "prune":
            mc.compress(model, [mc.Prune("reap", ratio=0.25)], calib=calib, out=Path(scratch) / "reap")
            return {"seconds": time.perf_counter() - start}
        try:
            fitted = mc.fit(model, target_ratio=fraction, calib=calib, out=Path(scratch) / "out", windows=windows)
        except mc.MoECompressError as exc:  # a budget no allocation reaches: what fit says is the result
            return {"refused": str(exc)}
        return {"seconds": time.perf_counter() - start, "phases": fitted.seconds, "report": report_dict(fitted)}


def _in_own_process(kind: str, model: str, fraction: float, samples: int, windows: int) -> dict:
    arguments = ["--timed", kind, "--model", model, "--fraction", str(fraction), "--samples", str(samples), "--windows", str(windows)]
    done = subprocess.run([sys.executable, __file__, *arguments], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def _one(model: str, fraction: float, samples: int, windows: int, repeat: int) -> dict:
    """The cell's fit (its figures from the first run: the same choice every run) and `repeat` pairs of timings, fit
    then one REAP prune, each in a process of its own from a cold statistics cache; the ratio is the median of the pairs' ratios."""
    fit_seconds, prune_seconds, first = [], [], None
    for _ in range(repeat):
        fitted = _in_own_process("fit", model, fraction, samples, windows)
        if "refused" in fitted:
            return {"model": model, "fraction": fraction, "refused": fitted["refused"]}
        fit_seconds.append(fitted["seconds"])
        first = first or fitted
        prune_seconds.append(_in_own_process("prune", model, fraction, samples, windows)["seconds"])
    ratios = sorted(f / p for f, p in zip(fit_seconds, prune_seconds))
    return {"model": model, "fraction": fraction, "fit_seconds": round(fit_seconds[0], 1), "reap_prune_seconds": round(prune_seconds[0], 1),
            "fit_over_reap": round(ratios[len(ratios) // 2], 2), "fit_runs_seconds": [round(t, 1) for t in fit_seconds],
            "reap_runs_seconds": [round(t, 1) for t in prune_seconds], "fit_phase_seconds": first["phases"], **first["report"]}


def _markdown(rows: list[dict], command: str) -> str:
    lines = ["# fit: the best model under a byte budget", "", f"Command: `{command}`", "",
             "Every candidate is measured in the same run (held-out KL / top-1 / perplexity against the original on the test split "
             "of the bundled domains). Single methods: the rows named '... alone' (or listed after '=' when the search's optimum "
             "is the same allocation). Bit widths are searched per MoE layer (16 / 8 / 4, written by the quantize stage's expert_bits) and per expert (in a layer, the 1, 2, 4, ... kept experts whose rounding error falls most raised to a wider width); expert counts per layer by the criterion's scores; the other decoder weights (attention, shared experts, dense MLPs) at 16 / 8 / 4 bits as one global choice ('other weights'; quantize's scope \"all\"). Candidates are measured with their quantisation rounded in memory (bit-identical logits to the packed checkpoint reloaded, tests/test_fit_measure.py) against the original's log-probabilities computed once, and raced (fitting/race.py): every candidate on the first 1/8 of the held-out windows, then the slices doubling; one whose per-window KL is worse than the leader's by more than 3 standard errors of the per-window log ratios, or whose KL is at 3 standard errors at least 95 % of the leader's (the race's indifference zone), is stopped (its row: the windows it was measured on, its figures on those only; a single method stopped so counts as beaten), the rest go on to every window. The Spearman correlation is taken on the first slice, which every candidate was measured on.", ""]
    lines += [f"The front per cell, KL against saved bytes. {MARKS}", "", f"![fit's front per cell]({FRONT.name})", ""]
    for row in rows:
        if "refused" in row:
            lines += [f"## {row['model']} at {row['fraction']:.0%}", "", f"refused before calibrating: {row['refused']}", ""]
            continue
        lines += [f"## {row['model']} at {row['fraction']:.0%} of {row['original_bytes']} bytes (budget {row['weight_budget']})", "",
                  f"chosen: **{row['chosen']}**; Spearman(proxy, KL) = {row['spearman_proxy_vs_kl']}; "
                  f"{_timing(row)} phases: "
                  + ", ".join(f"{k} {v} s" for k, v in row["fit_phase_seconds"].items()) + ")", "",
                  f"strictly lower KL than every single method that fits: **{_verdict(row)}**", "",
                  "stopped early: " + (", ".join(f"{c['name']} after {c['windows']} of {row['held_out_windows']} windows" for c in row["stopped_early"])
                                       or "none"), "",
                  "| candidate | bytes | other weights | proxy | KL | top-1 | ppl | windows |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for c in row["candidates"]:
            name = c["name"] + (f" (= {', '.join(c['aliases'])})" if c["aliases"] else "")
            lines.append(f"| {name} | {c['bytes']} | {c['other_bits']} bits | {c['proxy']:.4g} | {c['kl']:.4g} | {c['top1']:.4f} | {c['perplexity']:.3f} "
                         f"| {c['windows']} |")
        lines.append("")
    return "\n".join([*lines, *_summary(rows)])


def _timing(row: dict) -> str:
    """fit's wall time against one REAP prune's: the pair, or every pair and the median of their ratios."""
    fits, prunes = row.get("fit_runs_seconds", [row["fit_seconds"]]), row.get("reap_runs_seconds", [row["reap_prune_seconds"]])
    if len(fits) == 1:
        return f"fit {fits[0]} s vs one REAP prune {prunes[0]} s (x{row['fit_over_reap']}; fit's"
    return (f"fit {', '.join(map(str, fits))} s vs one REAP prune {', '.join(map(str, prunes))} s, in turn "
            f"(median ratio x{row['fit_over_reap']}; the first fit's")


def _verdict(row: dict) -> str:
    if row["strictly_below_single_methods"] is None:
        return "no single method fits (only fit reaches this budget)"
    return f"{'yes' if row['strictly_below_single_methods'] else 'no'} (best single method: {row['best_single_method']})"


def _summary(rows: list[dict]) -> list[str]:
    """One line per cell: time ratio and the comparison with the single methods."""
    lines = ["## Summary", "", "| cell | fit / REAP time | strictly lower KL than every single method that fits |", "|---|---:|---|"]
    for row in rows:
        cell = f"{row['model']} at {row['fraction']:.0%}"
        lines.append(f"| {cell} | refused | {row['refused']} |" if "refused" in row else f"| {cell} | {row['fit_over_reap']} | {_verdict(row)} |")
    return [*lines, ""]


def _front(rows: list[dict], path: Path) -> None:
    """One panel per (model, budget) cell, KL against saved bytes, marked as `fitting.front_plot.mark` marks fit's own plot."""
    plt = pyplot()
    if plt is None:
        return
    models, fractions = list(dict.fromkeys(r["model"] for r in rows)), list(dict.fromkeys(r["fraction"] for r in rows))
    figure, axes = plt.subplots(len(models), len(fractions), figsize=(4.6 * len(fractions), 3.8 * len(models) + 0.8), squeeze=False)
    for row in rows:
        axis = axes[models.index(row["model"])][fractions.index(row["fraction"])]
        axis.set_title(f"{row['model']} at {row['fraction']:.0%}", fontsize=9)
        if "refused" in row:
            axis.text(0.5, 0.5, "refused before calibrating", ha="center", va="center", transform=axis.transAxes)
            axis.set_axis_off()
            continue
        mark(axis, row, "kl")
        axis.yaxis.label.set_size(7)
    figure.legend(handles=legend_handles([r for r in rows if "refused" not in r]), loc="lower center", ncol=3, fontsize=7, frameon=False)
    figure.suptitle("fit: every candidate measured, per (model, budget)", fontsize=11)
    figure.tight_layout(rect=(0, 0.8 / (3.8 * len(models) + 0.8), 1, 1))
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _write(rows: list[dict], command: str, notes: str = "") -> None:
    """fit.json's rows as fit.md (with `notes` after the summary) and fit_front.png."""
    (RESULTS / "fit.md").write_text(_markdown(rows, command) + (f"\n{notes}" if notes else ""))
    _front(rows, FRONT)


def _notes(markdown: str) -> str:
    """The sections written by hand below the generated ones (after the summary, the last one generated)."""
    summary = markdown.find("\n## Summary\n")
    after = markdown.find("\n## ", summary + 1) if summary >= 0 else -1
    return markdown[after + 1:] if after >= 0 else ""


def _rebuild() -> None:
    """--report: fit.md and fit_front.png from the recorded fit.json, with the command and the notes of the fit.md there."""
    existing = (RESULTS / "fit.md").read_text()
    recorded = re.search(r"^Command: `(.*)`$", existing, re.MULTILINE)
    if recorded is None:
        raise SystemExit("bench/results/fit.md names no command: run the bench instead of --report")
    _write(json.loads((RESULTS / "fit.json").read_text()), recorded.group(1), _notes(existing))


def main() -> None:
    global RESULTS, FRONT
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=[])
    parser.add_argument("--fraction", action="append", type=float, default=[])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=1, help="pairs of timings (fit, then one REAP prune) per cell; the ratio is their median")
    parser.add_argument("--report", action="store_true", help="rebuild fit.md and fit_front.png from fit.json; measure nothing")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where fit.json, fit.md and fit_front.png go (default: bench/results)")
    parser.add_argument("--timed", choices=["fit", "prune"], help="(internal) one timed run in this process, as JSON on stdout")
    args = parser.parse_args()
    if args.timed:
        return print(json.dumps(_timed(args.timed, args.model[0], args.fraction[0], args.samples, args.windows)))
    RESULTS, FRONT = args.results, args.results / FRONT.name
    if args.report:
        return _rebuild()
    command = "python bench/fit.py " + " ".join([*(f"--model {m}" for m in args.model), *(f"--fraction {f}" for f in args.fraction),
                                                 f"--samples {args.samples}", f"--windows {args.windows}",
                                                 *([f"--repeat {args.repeat}"] if args.repeat > 1 else [])])
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = []
    for model in args.model or ["ref-mixtral"]:
        for fraction in args.fraction or [0.5]:
            rows.append(_one(model, fraction, args.samples, args.windows, args.repeat))
            (RESULTS / "fit.json").write_text(json.dumps(rows, indent=2) + "\n")  # after every cell: a long run keeps what it measured
            _write(rows, command)


if __name__ == "__main__":
    main()
