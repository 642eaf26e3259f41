"""The same prunes through two versions of the code: same plans, same perplexity?

Runs three rows of `bench/results/pruning.md` (ref-deepseek, calibration: 32 bundled sequences of
256 tokens, layer budget) -- REAP 25 %, MoNE 50 %, frequency 50 % -- once with this tree's
composable call (`mc.compress(model, [mc.Prune(...)])`) and once with a baseline source tree's
single-stage call (`mc.compress(model, method, ratio, budget, calib)`), each in its own process,
then compares the kept experts per layer and the perplexity per bundled domain (test split, the
evaluation protocol's 128 windows of 256 tokens), to the last bit.

    git archive <commit> src | tar -x -C /tmp/baseline
    python bench/reproduce.py --baseline /tmp/baseline/src   # -> bench/results/reproduce.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROWS = [("reap", 0.25, "layer"), ("mone", 0.5, "layer"), ("frequency", 0.5, "layer")]
DOMAINS = ("dictionary", "manpages", "pydoc")
RESULTS = Path(__file__).parent / "results"


def run(mode: str) -> list[dict]:
    """In this process: the three rows with the code on sys.path ('stages': the composable call; 'baseline': the old one)."""
    import moe_compress as mc
    from moe_compress.data.batches import CalibrationSpec
    from moe_compress.evaluate.protocol import DEFAULT_PROTOCOL

    try:
        from moe_compress.evaluate.lm_perplexity import perplexity
    except ImportError:  # a baseline from before the module's rename
        from moe_compress.evaluate.perplexity import perplexity
    rows = []
    for method, ratio, budget in ROWS:
        spec = CalibrationSpec("bundled", samples=32, seq_len=256)
        model, tokenizer = mc.load_model("ref-deepseek")
        if mode == "baseline":
            result = mc.compress(model, method, ratio, budget, spec, tokenizer, cache_dir=False)
            pruned, plan = result.model, result.plan
        else:
            result = mc.compress(model, [mc.Prune(method, ratio=ratio, budget=budget)], calib=spec, tokenizer=tokenizer, guard=False)
            pruned, plan = result.model, result.plans[0][1]
        ppl = {d: perplexity(pruned, DEFAULT_PROTOCOL.windows_of(tokenizer, f"bundled:{d}", pruned.config)).perplexity for d in DOMAINS}
        rows.append({"method": method, "ratio": ratio, "budget": budget, "keep": {str(lp.layer): list(lp.keep) for lp in plan.layers}, "perplexity": ppl})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", type=Path, help="a baseline tree's src/ directory")
    parser.add_argument("--mode", choices=("stages", "baseline"), help=argparse.SUPPRESS)  # the child processes
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(run(args.mode)))
        return
    results = {}
    for mode, src in (("stages", Path(__file__).parent.parent / "src"), ("baseline", args.baseline)):
        env = {**os.environ, "PYTHONPATH": str(src.resolve()), "HF_HUB_OFFLINE": "1"}
        done = subprocess.run([sys.executable, __file__, "--mode", mode], env=env, capture_output=True, text=True, check=True)
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    same = [a == b for a, b in zip(results["stages"], results["baseline"])]
    lines = ["# The same prunes through the stage redesign and through the code before it", "",
             f"Command: `python bench/reproduce.py --baseline {args.baseline}`. ref-deepseek, 32 x 256 bundled calibration tokens, layer budget;",
             "perplexity per bundled domain on the evaluation protocol's windows. 'same' = identical kept experts and identical perplexities (every bit).", "",
             "| method | ratio | " + " | ".join(f"ppl {d}" for d in DOMAINS) + " | same plan and ppl |", "|---|---|" + "---|" * (len(DOMAINS) + 1)]
    for row, equal in zip(results["stages"], same):
        lines.append(f"| {row['method']} | {row['ratio']} | " + " | ".join(f"{row['perplexity'][d]:.4f}" for d in DOMAINS) + f" | {'yes' if equal else 'NO'} |")
    (RESULTS / "reproduce.json").write_text(json.dumps(results, indent=1) + "\n")
    (RESULTS / "reproduce.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
