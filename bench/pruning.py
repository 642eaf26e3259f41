"""Expert-pruning and expert-merging methods on the reference models (issues #3, #4 and #14).

For each reference model: every registered expert-pruning method (frequency, soft_count,
gate_sum, ean, reap, mone, MoNE without novices, cprune) and every merging method (hc-smoe,
m-smoe, ream, and named variants: neuron-aligned HC-SMoE, REAM with MC-SMoE-style grouping,
the super-expert guard switched off) at ratios 0.25 and 0.5, and our variants of the reference
modes (REAP without renormalisation, MoNE with layer-normalised global scores or the exact
variance, cprune-cosine) on the mixed calibration,
  * layer-wise budget, calibrated on each domain in turn (pydoc, dictionary, manpages);
  * global budget, calibrated on all domains together;
plus the robustness check of issue #4: quality at ratio 0.25 (layer-wise) of MoNE, MoNE without
novices, C-Prune, frequency, soft_count and reap calibrated on each domain in turn and on 32,
128 and 512 mixed sequences.
Each method's statistics come from its own uncached observer pass over the calibration set
(shared by that method's ratios and budgets), and its time column is what a user pays:
calibration + planning + surgery (`calibration s` is the first part); its peak RSS covers the
calibration pass too. Quality: perplexity per domain on the test split (the evaluation
protocol: 128 windows of 256 tokens per domain), fidelity to the original on the same windows (mean KL divergence of the
next-token distributions, top-1 agreement) and multiple-choice accuracy over all 1000
questions of the `moec` tasks.

    python bench/pruning.py --model ref-mixtral      # -> bench/results/pruning_ref-mixtral.{json,md}
    python bench/pruning.py --model ref-deepseek --methods reap,ream --sets mixed --rerun   # re-measure a subset
    python bench/pruning.py --report                 # tables + plots from whatever is recorded
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import (RESULTS, Bench, EvalSettings, Variant, fidelity_columns, markdown_table, mc_column, mean_ppl, overview_plot,
                    peak_rss, quality_size_plot, reset_peak_rss)

from moe_compress import apply_plan, get_adapter
from moe_compress.engine.statistics import collect_statistics
from moe_compress.data import bundled_domains
from moe_compress.methods import METHODS, PlanRequest

NO_GUARD = {"protect_super_experts": False}
METHODS_UNDER_TEST = [
    ("frequency", "frequency", {}), ("soft_count", "soft_count", {}), ("gate_sum", "gate_sum", {}), ("ean", "ean", {}),
    ("reap", "reap", {}), ("mone", "mone", {}), ("mone-no-novice", "mone", {"novices": False}),
    ("cprune", "cprune", {}),
    ("hc-smoe", "hc-smoe", {}), ("hc-smoe-aligned", "hc-smoe", {"align": "activations+weights"}), ("m-smoe", "m-smoe", {}),
    ("ream", "ream", {}), ("ream-nearest", "ream", {"group_size": 0}),
    # the super-expert guard (on by default) against no guard
    ("reap-no-guard", "reap", NO_GUARD), ("ream-no-guard", "ream", NO_GUARD),
]
#: Our variants of the reference modes (issue 13), measured beside them on the mixed calibration.
VARIANTS = [
    ("reap-no-renorm", "reap", {"renormalize": False}),
    ("mone-layer-normalised", "mone", {"global_scores": "layer_normalised"}),
    ("mone-exact-variance", "mone", {"variance": "exact"}),
    ("cprune-cosine", "cprune-cosine", {"probe_tokens": 32}),
]
#: C-Prune's reference clusters each layer into 12 groups; ref-mixtral has only 8 experts per layer.
MODEL_OPTIONS = {("ref-mixtral", "cprune"): {"clusters": 4, "global_clusters": 2}}
MERGING_METHODS = ("hc-smoe", "m-smoe", "ream")
MERGING = ("hc-smoe", "hc-smoe-aligned", "m-smoe", "ream", "ream-nearest", "reap-no-guard", "ream-no-guard")
SETTINGS = EvalSettings(mc_limit=None)


class MethodStatistics:
    """Per method, the statistics it needs from its own uncached observer pass, and what the pass cost.

    Methods needing the same statistics share one pass; every ratio and budget of a method
    reuses it, and each of its rows is charged the pass's time and peak memory.
    """

    def __init__(self, model, batches):
        self.model, self.batches = model, batches
        self.passes: dict[tuple[str, ...], tuple[dict, float, int]] = {}

    def get(self, method: str, options: dict) -> tuple[dict, float, int]:
        names = tuple(sorted(METHODS[method].needs(options)))
        if names not in self.passes:
            reset_peak_rss()
            start = time.perf_counter()
            stats, _ = collect_statistics(self.model, self.batches, names, cache_dir=False)
            self.passes[names] = (stats, time.perf_counter() - start, peak_rss())
        return self.passes[names]


def _variant(statistics: MethodStatistics, label: str, method: str, options: dict, ratio: float, budget: str, tags: dict) -> Variant:
    def build(model, _tokenizer):
        stats, calibration_seconds, calibration_peak = statistics.get(method, options)
        start = time.perf_counter()
        adapter = get_adapter(model)
        plan = METHODS[method].make_plan(PlanRequest(adapter, model.config, stats, ratio, budget, model=model), options)
        apply_plan(model, plan, adapter)
        seconds = time.perf_counter() - start
        return {"kept_per_layer": plan.kept_counts(), "calibration_seconds": round(calibration_seconds, 2),
                "plan_apply_seconds": round(seconds, 2), "compress_seconds": round(calibration_seconds + seconds, 2),
                "compress_peak_rss": max(calibration_peak, peak_rss()), "super_experts": plan.meta.get("super_experts")}

    return Variant(label, build, {"family": tags["family"], **tags})


ROBUSTNESS = ("frequency", "soft_count", "reap", "mone", "mone-no-novice", "cprune")
SETS = ("mixed", "domains", "samples", "severe")


def _grid(full: bool) -> list[tuple[str, str, int, str, tuple, tuple, list]]:
    """(set, source, samples, calibration name, ratios, budgets, methods) of each calibration set.

    The full grid is what issue #3 asks for (every method, both ratios and budgets, each
    calibration domain). On a 2-core machine one evaluation takes about a minute, so the
    recorded results use the quick grid: every method at both ratios (layer-wise) and at 0.25
    (global) on mixed calibration, and the robustness set (MoNE, its baselines and C-Prune)
    at 0.25 calibrated on each domain in turn and on 128 and 512 mixed sequences; and a severe
    ratio (0.75, layer-wise) for three methods, to see how the multiple-choice tasks fall.
    """
    everything = list(METHODS_UNDER_TEST)
    robust = [m for m in METHODS_UNDER_TEST if m[0] in ROBUSTNESS]
    mixed = [("mixed", "bundled", 32, "all", (0.25, 0.5), ("layer",) + (("global",) if full else ()), everything + VARIANTS)]
    if not full:
        mixed.append(("mixed", "bundled", 32, "all", (0.25,), ("global",), everything + VARIANTS))
    per_domain = [("domains", f"bundled:{d}", 32, d, (0.25, 0.5) if full else (0.25,), ("layer",), everything if full else robust)
                  for d in bundled_domains()]
    sample_counts = [("samples", "bundled", n, "all", (0.25,), ("layer",), robust) for n in (128, 512)]
    severe = [("severe", "bundled", 32, "all", (0.75,), ("layer",), [m for m in METHODS_UNDER_TEST if m[0] in ("frequency", "reap", "mone")])]
    return mixed + per_domain + sample_counts + severe


def run(model_name: str, full: bool = False, only: set[str] | None = None, sets: tuple[str, ...] = SETS, rerun: bool = False,
        results: Path = RESULTS) -> None:
    bench = Bench(model_name, SETTINGS, results / f"pruning_{model_name}.json")
    bench.run(Variant("original", lambda m, t: {}, {"family": "original"}))
    for kind, source, samples, calib_name, ratios, budgets, methods in _grid(full):
        methods = [m for m in methods if only is None or m[0] in only]
        labels = [f"{label}|{ratio}|{budget}|{calib_name}|{samples}" for label, _, _ in methods for ratio in ratios for budget in budgets]
        if kind not in sets or not labels:
            continue
        if rerun:  # measured again under the current protocol
            bench.rows = [row for row in bench.rows if row["variant"] not in labels]
            bench.done -= set(labels)
        if all(label in bench.done for label in labels):
            continue
        statistics = MethodStatistics(bench.original, bench.calibration(source, samples=samples))
        for label, method, options in methods:
            options = {**options, **MODEL_OPTIONS.get((model_name, method), {})}
            for ratio in ratios:
                for budget in budgets:
                    tags = {"family": label, "method": label, "ratio": ratio, "budget": budget, "calibration": calib_name, "samples": samples,
                            **({"plot_group": "merging"} if method in MERGING_METHODS else {})}
                    bench.run(_variant(statistics, f"{label}|{ratio}|{budget}|{calib_name}|{samples}", method, options, ratio, budget, tags))


def _timed(row: dict) -> str:
    """compress s: only rows whose time includes their own calibration pass (recorded since #14)."""
    return f"{row['compress_seconds']:.1f}" if "plan_apply_seconds" in row or row["variant"] == "original" else "-"


def _merging_summary(rows: list[dict]) -> list[dict]:
    """REAP and the merging methods side by side on the mixed calibration set (32 sequences)."""
    chosen = [r for r in rows if r.get("calibration") == "all" and r.get("samples") == 32 and r.get("ratio") in (0.25, 0.5)
              and r.get("method") in ("reap", *MERGING) and "fidelity" in r]
    return sorted(chosen, key=lambda r: (r["budget"], r["ratio"], mean_ppl(r)))


def report() -> None:
    import json
    import statistics

    rows_by_model = {}
    lines = ["# Expert-pruning and merging methods on the reference models", "",
             "Command: `python bench/pruning.py --model ref-mixtral --sets mixed,domains --no-mc` (and `--model ref-deepseek`), "
             "then `python bench/pruning.py --report`.",
             "Recorded 2026-12-07 at commit 0152e11 with OMP_NUM_THREADS=1 on an AMD EPYC 2-core VM (AVX-512), torch 2.13.0+cpu, "
             "transformers 5.23.0, the two models' runs side by side (so the s and RSS columns are under that load). "
             "The floats depend on the machine's kernels: the table recorded before it on another machine differs from the second "
             "decimal, and where a method meets near-ties, by more (`bench/results/reproduce.md`).",
             "Perplexity: test split, windows x tokens per domain as recorded under each model. KL: mean KL(original || compressed) per token over the same "
             "windows (nats), top-1: share of positions where both models' most likely next token agrees, both averaged over domains. "
             "MC: all 1000 questions of the `moec` tasks (chance 0.25), scored like lm-eval (see bench/common.py). "
             "compress s = the method's own uncached calibration pass (calib s) + planning + surgery; '-' marks rows recorded before "
             "the time column counted calibration (their statistics came from the cache). MC '-': measured with --no-mc.", ""]
    for path in sorted(RESULTS.glob("pruning_*.json")):
        data = json.loads(path.read_text())
        rows = data["rows"]
        rows_by_model[data["model"]] = rows
        domains = list(rows[0]["perplexity"])
        columns = [("method", lambda r: r.get("method", "original")), ("ratio", lambda r: str(r.get("ratio", 0))),
                   ("budget", lambda r: r.get("budget", "-")), ("calib", lambda r: f"{r.get('calibration', '-')}/{r.get('samples', '-')}"),
                   ("params (M)", lambda r: f"{r['params'] / 1e6:.2f}")]
        columns += [(f"ppl {d}", lambda r, d=d: f"{r['perplexity'][d]:.2f}") for d in domains]
        columns += [("mean ppl", lambda r: f"{mean_ppl(r):.2f}"), *fidelity_columns()]
        columns += [mc_column("acc"), mc_column("acc_norm"),
                    ("calib s", lambda r: f"{r['calibration_seconds']:.1f}" if "plan_apply_seconds" in r else "-"),
                    ("compress s", _timed), ("peak RSS (MiB)", lambda r: f"{r['compress_peak_rss'] / 2**20:.0f}")]
        recorded = data.get("settings", {})
        lines += [f"## {data['model']}", "", f"Protocol: {recorded.get('ppl_windows')} windows x {recorded.get('seq_len')} tokens per domain.", "",
                  markdown_table(rows, columns)]
        summary = _merging_summary(rows)
        if summary:
            lines += ["### Merging vs REAP (mixed calibration, 32 sequences; best first within each ratio)", "",
                      markdown_table(summary, [("budget", lambda r: r["budget"]), ("ratio", lambda r: str(r["ratio"])),
                                               ("method", lambda r: r["method"]), ("mean ppl", lambda r: f"{mean_ppl(r):.2f}"),
                                               *fidelity_columns(), mc_column(),
                                               ("compress s", _timed)])]
        # Robustness: spread of mean perplexity across calibration domains and sample counts.
        spread_rows = []
        for method in sorted({r["method"] for r in rows if "method" in r}):
            across_domains = [mean_ppl(r) for r in rows if r.get("method") == method and r["ratio"] == 0.25 and r["budget"] == "layer" and r["calibration"] != "all"]
            across_samples = [mean_ppl(r) for r in rows if r.get("method") == method and r["ratio"] == 0.25 and r["calibration"] == "all" and r["budget"] == "layer"]
            spread_rows.append({"method": method, "d": across_domains, "s": across_samples})
        lines += ["### Robustness at ratio 0.25, layer-wise (mean perplexity over domains)", "",
                  markdown_table(spread_rows, [
                      ("method", lambda r: r["method"]),
                      ("mean over calib domains", lambda r: f"{statistics.mean(r['d']):.2f}" if r["d"] else "-"),
                      ("spread (max-min) over calib domains", lambda r: f"{max(r['d']) - min(r['d']):.2f}" if r["d"] else "-"),
                      ("mean over 32/128/512 samples", lambda r: f"{statistics.mean(r['s']):.2f}" if r["s"] else "-"),
                      ("spread over sample counts", lambda r: f"{max(r['s']) - min(r['s']):.2f}" if len(r["s"]) > 1 else "-"),
                  ])]
    (RESULTS / "pruning.md").write_text("\n".join(lines) + "\n")
    if rows_by_model:
        quality_size_plot(rows_by_model, RESULTS / "pruning_quality_vs_size.png", "expert pruning and merging")
        overview_plot(RESULTS / "quality_vs_size.png")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", default=[], help="bundled model name; repeatable")
    parser.add_argument("--report", action="store_true", help="only rebuild the markdown and the plots")
    parser.add_argument("--full", action="store_true", help="the complete grid (hours on a 2-core machine)")
    parser.add_argument("--methods", help="comma-separated method labels to run (default: all of METHODS_UNDER_TEST)")
    parser.add_argument("--sets", default=",".join(SETS), help=f"comma-separated calibration sets to run: {', '.join(SETS)}")
    parser.add_argument("--rerun", action="store_true", help="measure the selected rows again even if recorded")
    parser.add_argument("--no-mc", action="store_true", help="skip the multiple-choice tasks (their rows show '-'); for quick runs")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the JSON goes (a scratch directory for smoke runs; the report reads bench/results)")
    args = parser.parse_args()
    only = set(args.methods.split(",")) if args.methods else None
    SETTINGS.mc = not args.no_mc
    unknown = (only or set()) - {label for label, _, _ in METHODS_UNDER_TEST + VARIANTS}
    if unknown:
        parser.error(f"unknown method labels {sorted(unknown)}")
    for name in args.model:
        run(name, args.full, only, tuple(args.sets.split(",")), args.rerun, args.results)
    report()
