"""Expert-pruning methods on the reference models (issues #3 and #4).

For each reference model: every registered expert-pruning method (frequency, soft_count,
gate_sum, ean, reap, mone, MoNE without novices, cprune) at ratios 0.25 and 0.5, and our
variants of the reference modes (REAP without renormalisation, MoNE with layer-normalised global
scores or the exact variance, cprune-cosine) on the mixed calibration,
  * layer-wise budget, calibrated on each domain in turn (pydoc, dictionary, manpages);
  * global budget, calibrated on all domains together;
plus the robustness check of issue #4: quality at ratio 0.25 (layer-wise) of MoNE, MoNE without
novices, C-Prune, frequency, soft_count and reap calibrated on each domain in turn and on 32,
128 and 512 mixed sequences.
All variants of one calibration set share one observer pass (the union of the statistics
every method needs); each variant is planned from those statistics and applied to a fresh
copy of the model. Quality: perplexity per domain on the test split (16 windows of 256 tokens
per domain) and multiple-choice accuracy over all 1000 questions of the `moec` tasks.

    python bench/pruning.py --model ref-mixtral      # -> bench/results/pruning_ref-mixtral.{json,md}
    python bench/pruning.py --report                 # tables + plot from whatever is recorded
"""

from __future__ import annotations

import argparse
import time

from common import RESULTS, Bench, EvalSettings, Variant, markdown_table, mean_ppl, quality_size_plot

from moe_compress import apply_plan, get_adapter
from moe_compress.api import collect_statistics
from moe_compress.data import bundled_domains
from moe_compress.methods import METHODS, PlanRequest

METHODS_UNDER_TEST = [
    ("frequency", "frequency", {}), ("soft_count", "soft_count", {}), ("gate_sum", "gate_sum", {}), ("ean", "ean", {}),
    ("reap", "reap", {}), ("mone", "mone", {}), ("mone-no-novice", "mone", {"novices": False}),
    ("cprune", "cprune", {}),
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
SETTINGS = EvalSettings(seq_len=256, ppl_windows=16, mc_limit=None)


def union_statistics(methods, model_name: str = "") -> tuple[str, ...]:
    return tuple(sorted({s for _, name, options in methods for s in METHODS[name].needs({**options, **MODEL_OPTIONS.get((model_name, name), {})})}))


def _variant(bench: Bench, stats, label: str, method: str, options: dict, ratio: float, budget: str, tags: dict) -> Variant:
    def build(model, _tokenizer):
        adapter = get_adapter(model)
        plan = METHODS[method].make_plan(PlanRequest(adapter, model.config, stats, ratio, budget), options)
        apply_plan(model, plan, adapter)
        return {"kept_per_layer": plan.kept_counts()}

    return Variant(label, build, {"family": tags["family"], **tags})


ROBUSTNESS = ("frequency", "soft_count", "reap", "mone", "mone-no-novice", "cprune")


def _grid(full: bool) -> list[tuple[str, int, str, tuple, tuple, list]]:
    """(source, samples, calibration name, ratios, budgets, methods) of each calibration set.

    The full grid is what issue #3 asks for (every method, both ratios and budgets, each
    calibration domain). On a 2-core machine one evaluation takes about a minute, so the
    recorded results use the quick grid: every method at both ratios (layer-wise) and at 0.25
    (global) on mixed calibration, and the robustness set (MoNE, its baselines and C-Prune)
    at 0.25 calibrated on each domain in turn and on 128 and 512 mixed sequences; and a severe
    ratio (0.75, layer-wise) for three methods, to see how the multiple-choice tasks fall.
    """
    everything = list(METHODS_UNDER_TEST)
    robust = [m for m in METHODS_UNDER_TEST if m[0] in ROBUSTNESS]
    mixed = [("bundled", 32, "all", (0.25, 0.5), ("layer",) + (("global",) if full else ()), everything + VARIANTS)]
    if not full:
        mixed.append(("bundled", 32, "all", (0.25,), ("global",), everything + VARIANTS))
    per_domain = [(f"bundled:{d}", 32, d, (0.25, 0.5) if full else (0.25,), ("layer",), everything if full else robust)
                  for d in bundled_domains()]
    sample_counts = [("bundled", n, "all", (0.25,), ("layer",), robust) for n in (128, 512)]
    severe = [("bundled", 32, "all", (0.75,), ("layer",), [m for m in METHODS_UNDER_TEST if m[0] in ("frequency", "reap", "mone")])]
    return mixed + per_domain + sample_counts + severe


def run(model_name: str, full: bool = False) -> None:
    bench = Bench(model_name, SETTINGS, RESULTS / f"pruning_{model_name}.json")
    bench.run(Variant("original", lambda m, t: {}, {"family": "original"}))
    for source, samples, calib_name, ratios, budgets, methods in _grid(full):
        labels = [f"{label}|{ratio}|{budget}|{calib_name}|{samples}" for label, _, _ in methods for ratio in ratios for budget in budgets]
        if all(label in bench.done for label in labels):
            continue
        batches = bench.calibration(source, samples=samples)
        start = time.perf_counter()
        stats, _ = collect_statistics(bench.original, batches, union_statistics(methods, model_name))
        calibration_seconds = round(time.perf_counter() - start, 2)
        for label, method, options in methods:
            options = {**options, **MODEL_OPTIONS.get((model_name, method), {})}
            for ratio in ratios:
                for budget in budgets:
                    tags = {"family": label, "method": label, "ratio": ratio, "budget": budget, "calibration": calib_name,
                            "samples": samples, "calibration_seconds": calibration_seconds}
                    bench.run(_variant(bench, stats, f"{label}|{ratio}|{budget}|{calib_name}|{samples}", method, options, ratio, budget, tags))


def report() -> None:
    import json
    import statistics

    rows_by_model = {}
    lines = ["# Expert-pruning methods on the reference models", "",
             "Command: `python bench/pruning.py --model ref-mixtral` (and `--model ref-deepseek`), then `python bench/pruning.py --report`.",
             "Perplexity: test split, 16 windows x 256 tokens per domain. MC: all 1000 questions of the `moec` tasks (chance 0.25), "
             "scored like lm-eval (see bench/common.py).", ""]
    for path in sorted(RESULTS.glob("pruning_*.json")):
        data = json.loads(path.read_text())
        rows = data["rows"]
        rows_by_model[data["model"]] = rows
        domains = list(rows[0]["perplexity"])
        columns = [("method", lambda r: r.get("method", "original")), ("ratio", lambda r: str(r.get("ratio", 0))),
                   ("budget", lambda r: r.get("budget", "-")), ("calib", lambda r: f"{r.get('calibration', '-')}/{r.get('samples', '-')}"),
                   ("params (M)", lambda r: f"{r['params'] / 1e6:.2f}")]
        columns += [(f"ppl {d}", lambda r, d=d: f"{r['perplexity'][d]:.2f}") for d in domains]
        columns += [("MC acc", lambda r: f"{r['mc']['moec']['acc']:.3f}"), ("MC acc_norm", lambda r: f"{r['mc']['moec']['acc_norm']:.3f}"),
                    ("compress s", lambda r: f"{r['compress_seconds']:.1f}"), ("peak RSS (MiB)", lambda r: f"{r['compress_peak_rss'] / 2**20:.0f}")]
        lines += [f"## {data['model']}", "", markdown_table(rows, columns)]
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
        quality_size_plot(rows_by_model, RESULTS / "pruning_quality_vs_size.png", "expert pruning")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", default=[], help="bundled model name; repeatable")
    parser.add_argument("--report", action="store_true", help="only rebuild the markdown and the plot")
    parser.add_argument("--full", action="store_true", help="the complete grid (hours on a 2-core machine)")
    args = parser.parse_args()
    for name in args.model:
        run(name, args.full)
    report()
