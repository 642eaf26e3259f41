"""Layer drop, block drop and CD-MoE (with and without fine-tuning) against REAP (issue #5).

Each structural variant removes some parameters; REAP expert pruning is run at the ratio of
routed experts that removes the same number of parameters, so quality is compared at matched
size. Speed is measured against the original in the same process, interleaved (ratio > 1:
faster). Quality as in bench/pruning.py.

    python bench/structural.py --model ref-mixtral    # -> bench/results/structural_<model>.{json,md}
"""

from __future__ import annotations

import argparse
import json

from common import RESULTS, Bench, EvalSettings, Variant, markdown_table, mean_ppl

from moe_compress import compress, condense, drop, finetune, get_adapter, model_size

SETTINGS = EvalSettings(seq_len=256, ppl_windows=16, mc_limit=None, speed=True)


def _removed(bench: Bench, build) -> int:
    import copy

    model = copy.deepcopy(bench.original)
    build(model, bench.tokenizer)
    return model_size(bench.original, get_adapter(bench.original)).total - model_size(model, get_adapter(model)).total


def run(model_name: str, finetune_steps: int) -> None:
    bench = Bench(model_name, SETTINGS, RESULTS / f"structural_{model_name}.json")
    batches = bench.calibration("bundled", samples=16)
    routed = model_size(bench.original, get_adapter(bench.original)).routed_experts
    structural = {
        "layer-drop-1": lambda m, t: drop(m, "moe", n=1, calib=batches),
        "layer-drop-2": lambda m, t: drop(m, "moe", n=2, calib=batches),
        "block-drop-discrete-1": lambda m, t: drop(m, "block", n=1, calib=batches),
        "block-drop-consecutive-2": lambda m, t: drop(m, "block", n=2, mode="consecutive", calib=batches),
        **{f"cd-moe-{n}": (lambda m, t, n=n: condense(m, layers=n, calib=batches[:1])) for n in (1, 2, 3)},
    }

    def with_finetune(layers: int):
        def build(model, tokenizer):
            condense(model, layers=layers, calib=batches[:1])
            report = finetune(model, tokenizer, steps=finetune_steps, lr=3e-4, batch_size=4, seq_len=256, eval_data=None)
            return {"finetune": report}

        return build

    bench.run(Variant("original", lambda m, t: {}, {"family": "original"}))
    for name, build in structural.items():
        bench.run(Variant(name, lambda m, t, build=build: {"plan_meta": {k: v for k, v in build(m, t).plan.meta.items() if k in ("evaluations", "search_seconds", "order")}},
                          {"family": name.rsplit("-", 1)[0]}))
    for layers in (2, 3):
        bench.run(Variant(f"cd-moe-{layers}+finetune-{finetune_steps}", with_finetune(layers), {"family": "cd-moe+finetune"}))
    for name in structural:
        removed = _removed(bench, structural[name])
        ratio = min(0.95, removed / routed)
        bench.run(Variant(f"reap-matching-{name}", lambda m, t, ratio=ratio: {"ratio": ratio, **compress(m, "reap", ratio, "layer", batches).summary},
                          {"family": "reap (matched)", "matches": name}))


def report() -> None:
    lines = ["# Layer drop, block drop, CD-MoE vs REAP at matched parameter budgets", "",
             "Command: `python bench/structural.py --model <name>`. Quality: test-split perplexity (16 x 256 tokens per domain), "
             "MC accuracy (all 1000 `moec` questions, chance 0.25). Speed: same process, interleaved with the original "
             "(batch 4 x 128-token prompts, 16 new tokens), ratio > 1 is faster.", ""]
    for path in sorted(RESULTS.glob("structural_*.json")):
        data = json.loads(path.read_text())
        base = data["rows"][0]
        columns = [("variant", lambda r: r["variant"]), ("params (M)", lambda r: f"{r['params'] / 1e6:.2f}"),
                   ("params kept", lambda r: f"{r['params'] / base['params']:.1%}"),
                   ("mean ppl", lambda r: f"{mean_ppl(r):.2f}"), ("MC acc", lambda r: f"{r['mc']['moec']['acc']:.3f}"),
                   ("MC kept", lambda r: f"{r['mc']['moec']['acc'] / base['mc']['moec']['acc']:.1%}"),
                   ("prefill x", lambda r: f"{r['speed']['prefill_ratio']:.2f}" if "speed" in r else "-"),
                   ("decode x", lambda r: f"{r['speed']['decode_ratio']:.2f}" if "speed" in r else "-"),
                   ("compress s", lambda r: f"{r['compress_seconds']:.1f}")]
        lines += [f"## {data['model']}", "", markdown_table(data["rows"], columns)]
    (RESULTS / "structural.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", default=[])
    parser.add_argument("--finetune-steps", type=int, default=100)
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args()
    for name in args.model:
        run(name, args.finetune_steps)
    report()
