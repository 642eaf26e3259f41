"""Layer drop, block drop and CD-MoE (with and without fine-tuning) against REAP (issue #5).

Each structural variant removes some parameters; layer-wise REAP expert pruning is run at the
whole numbers of experts per layer on both sides of that size, and its quality interpolated to
the variant's exact parameter count, so quality is compared at matched size (`matched_reap`). Speed is measured against the original in the same process, interleaved (ratio > 1:
faster). Quality as in bench/pruning.py.

Reference modes and our variants (issue 13):
  * cd-moe-{n}: the authors' search (layer-output / final-hidden-state JSD, K = top-k), and
    cd-moe-s-{n}: shared experts only (K = 0, "CD-MoE-S"), each from one search for 3 layers
    (the greedy layer order makes n = 1, 2 its prefixes);
  * cd-moe-next-token-3: moe-compress's earlier search (next-token JSD, best size <= top-k),
    from the search recorded before issue 13;
  * cd-moe-3+finetune: the CD-MoE authors' settings (lr 1e-5, linear decay, weight decay 0.01, batch 8);
    +finetune-cosine: moe-compress's earlier recipe (lr 3e-4, cosine, no weight decay, batch 4);
  * block-drop-consecutive-2 scores cos(h_i, h_i+2); -framework the framework's cos(h_i, h_i+3).

    python bench/structural.py --model ref-mixtral    # -> bench/results/structural_<model>.{json,md}
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from collections.abc import Callable

from common import RESULTS, Bench, EvalSettings, Variant, fidelity_columns, markdown_table, mean_fidelity, mean_ppl

from moe_compress import Plan, apply_plan, compress, condense, drop, finetune, get_adapter, model_size

SETTINGS = EvalSettings(mc_limit=100, speed=True)
FINETUNES = {"finetune": dict(lr=1e-5, schedule="linear", weight_decay=0.01, batch_size=8),
             "finetune-cosine": dict(lr=3e-4, schedule="cosine", weight_decay=0.0, batch_size=4)}


def _first_condensed(search: Plan, n: int) -> Plan:
    """The CD-MoE plan for n layers from one search for more: the layer order is greedy, so
    condensing n layers takes the first n of it, and each layer's kept set does not depend on n."""
    plan = copy.deepcopy(search)
    chosen = set(plan.meta["order"][:n])
    plan.layers = [layer for layer in plan.layers if layer.layer in chosen]
    plan.meta["order"], plan.meta["order_jsd"] = plan.meta["order"][:n], plan.meta["order_jsd"][:n]
    return plan


def _search(bench: Bench, batches, name: str, **options) -> Plan:
    """One CD-MoE search for 3 layers, cached beside the results so reruns reuse it."""
    path = RESULTS / f"structural_{bench.model_name}_{name}.json"
    if path.is_file():
        return Plan.load(path)
    plan = condense(copy.deepcopy(bench.original), layers=3, calib=batches, cache_dir=False, **options).plan
    plan.save(path)
    return plan


def run(model_name: str, finetune_steps: int) -> None:
    bench = Bench(model_name, SETTINGS, RESULTS / f"structural_{model_name}.json")
    batches = bench.calibration("bundled", samples=16)
    routed = model_size(bench.original, get_adapter(bench.original)).routed_experts
    searches = {
        "cd-moe": _search(bench, batches[:1], "cd-moe-search-reference"),
        "cd-moe-next-token": Plan.load(RESULTS / f"structural_{model_name}_cd-moe-search.json"),  # recorded before issue 13
    }
    adapter = get_adapter(bench.original)
    first_moe = adapter.decoder_layers(bench.original)[adapter.moe_layer_indices(bench.original)[0]]
    if adapter.shared_experts(adapter.moe_block(first_moe)):  # CD-MoE-S needs shared experts to keep
        searches["cd-moe-s"] = _search(bench, batches[:1], "cd-moe-search-shared-only", experts=0)

    def condensed(search: Plan, n: int):
        def build(model, _tokenizer):
            apply_plan(model, _first_condensed(search, n), get_adapter(model))
            return {"plan_meta": {"evaluations": search.meta["evaluations"], "search_seconds": search.meta["search_seconds"],
                                  "order": search.meta["order"][:n]}}

        return build

    structural = {
        "layer-drop-1": lambda m, t: {"plan_meta": drop(m, "moe", n=1, calib=batches).plan.meta},
        "layer-drop-2": lambda m, t: {"plan_meta": drop(m, "moe", n=2, calib=batches).plan.meta},
        "block-drop-discrete-1": lambda m, t: {"plan_meta": drop(m, "block", n=1, calib=batches).plan.meta},
        "block-drop-consecutive-2": lambda m, t: {"plan_meta": drop(m, "block", n=2, mode="consecutive", calib=batches).plan.meta},
        "block-drop-consecutive-2-framework": lambda m, t: {"plan_meta": drop(
            m, "block", n=2, mode="consecutive", calib=batches, consecutive_score="framework").plan.meta},
        # the earlier next-token search is recorded at its full size only: its prefixes say little more
        **{f"{name}-{n}": condensed(search, n) for name, search in searches.items() for n in ((3,) if name == "cd-moe-next-token" else (1, 2, 3))},
    }

    def with_finetune(search: Plan, n: int, settings: dict):
        def build(model, tokenizer):
            info = condensed(search, n)(model, tokenizer)
            return {**info, "finetune": finetune(model, tokenizer, steps=finetune_steps, seq_len=256, eval_data=None, **settings)}

        return build

    bench.run(Variant("original", lambda m, t: {}, {"family": "original"}))
    for name, build in structural.items():
        bench.run(Variant(name, build, {"family": name.rsplit("-", 1)[0]}))
    for recipe, settings in FINETUNES.items():
        for n in (3,):  # where condensing costs most, so fine-tuning has the most to recover
            bench.run(Variant(f"cd-moe-{n}+{recipe}-{finetune_steps}", with_finetune(searches["cd-moe"], n, settings),
                              {"family": f"cd-moe+{recipe}"}))
    params = {row["variant"]: row["params"] for row in bench.rows}  # recorded above (or by an earlier run)
    experts = adapter.num_experts(adapter.moe_block(first_moe))
    for ratio in sorted({r for name in structural for r in _bracket((params["original"] - params[name]) / routed, experts)}):
        bench.run(Variant(f"reap-layer-{ratio:.4f}", lambda m, t, ratio=ratio: {"ratio": ratio, **compress(m, "reap", ratio, "layer", batches).summary},
                          {"family": "reap (bracket)", "ratio": ratio}))


def _bracket(removed_share: float, experts: int) -> tuple[float, ...]:
    """The layer-wise REAP ratios that remove the nearest whole numbers of experts per layer on
    both sides of `removed_share` of the routed parameters (one ratio when it falls on a step).

    REAP with a layer budget removes k of E experts per layer, so its sizes come in steps of
    1/E of the routed parameters; a structural variant rarely lands on a step, and comparing it
    with the single nearest step favours whichever side the rounding went. The report
    interpolates between the two steps at the variant's exact size.
    """
    below, above = math.floor(removed_share * experts + 1e-9), math.ceil(removed_share * experts - 1e-9)
    return tuple(sorted({min(k, experts - 1) / experts for k in (below, above)}))


def matched_reap(rows: list[dict], target: dict) -> dict | None:
    """REAP's quality at `target`'s exact parameter count: linear in parameters between the two
    bracketing REAP rows (or the one row when it is an exact match); None when no row brackets it."""
    reap = sorted((r for r in rows if r.get("family") == "reap (bracket)"), key=lambda r: r["params"])
    above = [r for r in reap if r["params"] >= target["params"]]
    below = [r for r in reap if r["params"] <= target["params"]]
    if not above or not below:
        return None
    low, high = below[-1], above[0]
    weight = 0.0 if high["params"] == low["params"] else (target["params"] - low["params"]) / (high["params"] - low["params"])

    def between(value: Callable[[dict], float | None]) -> float | None:
        ends = value(low), value(high)
        return None if None in ends else ends[0] + weight * (ends[1] - ends[0])

    return {"below": low["variant"], "above": high["variant"], "mean_ppl": between(mean_ppl),
            "kl": between(lambda r: mean_fidelity(r, "kl")), "mc": between(lambda r: r["mc"]["moec"]["acc"] if r.get("mc") else None)}


def report() -> None:
    lines = ["# Layer drop, block drop, CD-MoE vs REAP at matched parameter budgets", "",
             "Command: `python bench/structural.py --model <name>` (per model), then `python bench/structural.py --report`. Quality: "
             "test-split perplexity and fidelity to the original (mean KL, top-1 agreement) under the evaluation protocol (windows x tokens "
             "per domain as recorded under each model), MC accuracy (first 100 questions of each of the 4 `moec` tasks, chance 0.25; '-' "
             "measured with --no-mc). Speed: same process, interleaved with the original (batch 4 x 128-token prompts, 16 new tokens), "
             "ratio > 1 is faster. REAP at the same size: layer-wise REAP removes whole experts per layer, so its sizes come in steps; it is "
             "run at the steps on both sides of each variant's size (the `reap-layer-*` rows) and its quality interpolated linearly in "
             "parameters to the variant's exact size. The CD-MoE search's time before and after issue 15 is in cd_moe_search.md; cd-moe-* "
             "rows use the authors' objectives, cd-moe-next-token-* the earlier search.", ""]
    for path in sorted(RESULTS.glob("structural_*.json")):
        data = json.loads(path.read_text())
        if "rows" not in data:  # a cached CD-MoE search plan
            continue
        rows, base = data["rows"], data["rows"][0]
        matched = {r["variant"]: matched_reap(rows, r) for r in rows if r.get("family") not in ("original", "reap (bracket)")}

        def reap_at_size(key: str, digits: int) -> Callable[[dict], str]:
            return lambda r: "-" if (matched.get(r["variant"]) or {}).get(key) is None else f"{matched[r['variant']][key]:.{digits}f}"

        columns = [("variant", lambda r: r["variant"]), ("params (M)", lambda r: f"{r['params'] / 1e6:.2f}"),
                   ("params kept", lambda r: f"{r['params'] / base['params']:.1%}"),
                   ("mean ppl", lambda r: f"{mean_ppl(r):.2f}"), *fidelity_columns(),
                   ("REAP same size: mean ppl", reap_at_size("mean_ppl", 2)), ("REAP same size: KL", reap_at_size("kl", 4)),
                   ("REAP same size: MC acc", reap_at_size("mc", 3)),
                   ("MC acc", lambda r: f"{r['mc']['moec']['acc']:.3f}" if r.get("mc") else "-"),
                   ("MC kept", lambda r: f"{r['mc']['moec']['acc'] / base['mc']['moec']['acc']:.1%}" if r.get("mc") and base.get("mc") else "-"),
                   ("prefill x", lambda r: f"{r['speed']['prefill_ratio']:.2f}" if "speed" in r else "-"),
                   ("decode x", lambda r: f"{r['speed']['decode_ratio']:.2f}" if "speed" in r else "-"),
                   ("compress s", lambda r: f"{r['compress_seconds']:.1f}")]
        recorded = data.get("settings", {})
        lines += [f"## {data['model']}", "", f"Protocol: {recorded.get('ppl_windows')} windows x {recorded.get('seq_len')} tokens per domain.", "",
                  markdown_table(rows, columns)]
    (RESULTS / "structural.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", default=[], help="bundled model name; repeatable")
    parser.add_argument("--finetune-steps", type=int, default=100, help="steps of each CD-MoE fine-tuning variant")
    parser.add_argument("--report", action="store_true", help="only rebuild the markdown from what is recorded")
    parser.add_argument("--no-mc", action="store_true", help="skip the multiple-choice tasks (their rows show '-')")
    args = parser.parse_args()
    SETTINGS.mc = not args.no_mc
    for name in args.model:
        run(name, args.finetune_steps)
    report()
