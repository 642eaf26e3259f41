"""The CD-MoE search before and after issue 15 (item 1): time and kept sets on ref-deepseek.

The calibration is the structural bench's (bench/structural.py): the first batch of 8 bundled
sequences of 256 tokens, 3 layers condensed.

  1. new code, default (the authors' objectives, K = top-k): time, evaluations, kept sets;
  2. new code, the old objective (next-token JSD, best prefix size <= top-k, as before): time,
     and its kept sets against the old search recorded in
     bench/results/structural_ref-deepseek_cd-moe-search.json (627 evaluations, 1980 s);
  3. old and new code interleaved on the old objective, on a reduced calibration (2 sequences x
     128 tokens), repeated, so the speed-up is a ratio measured under the same machine load. The
     old code is read from git (commit OLD) and run as it was.

    python bench/cd_moe_search.py --model ref-deepseek   # -> bench/results/cd_moe_search.{json,md}
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import time
import types
from pathlib import Path

import torch
from common import RESULTS

from moe_compress import condense, get_adapter, load_model
from moe_compress.engine.statistics import collect_statistics
from moe_compress.data import CalibrationSpec, calibration_batches

OLD = "59004de"  # the last commit before issue 13/15 changed the search
ROOT = Path(__file__).resolve().parent.parent


def old_plan_condense():
    """`plan_condense` as it was at commit OLD, imported inside today's package."""
    source = subprocess.run(["git", "show", f"{OLD}:src/moe_compress/methods/condense.py"], capture_output=True, text=True, cwd=ROOT,
                            check=True).stdout
    module = types.ModuleType("moe_compress.methods._condense_before_issue_15")
    module.__package__ = "moe_compress.methods"
    exec(compile(source, f"condense.py@{OLD}", "exec"), module.__dict__)  # noqa: S102 -- our own code from git history
    return module.plan_condense


def kept(plan) -> dict[str, list[int]]:
    return {str(layer.layer): layer.keep for layer in plan.layers}


def timed_new(model, batches, **options) -> dict:
    start = time.perf_counter()
    plan = condense(copy.deepcopy(model), layers=3, calib=batches, cache_dir=False, **options).plan
    return {"seconds": round(time.perf_counter() - start, 1), "evaluations": plan.meta["evaluations"], "kept": kept(plan),
            "order": plan.meta["order"], "candidate_sets": plan.meta["candidate_sets"], "load_average": os.getloadavg()[0]}


def timed_old(model, batches, plan_condense) -> dict:
    model = copy.deepcopy(model)
    adapter = get_adapter(model)
    start = time.perf_counter()
    stats, _ = collect_statistics(model, batches, ("gate_sum", "selected"), cache_dir=False)
    plan = plan_condense(model, adapter, batches, stats, 3)
    return {"seconds": round(time.perf_counter() - start, 1), "evaluations": plan.meta["evaluations"], "kept": kept(plan),
            "order": plan.meta["order"], "candidate_sets": plan.meta["candidate_sets"], "load_average": os.getloadavg()[0]}


def run(model_name: str, repeats: int) -> dict:
    model, tokenizer = load_model(model_name)
    torch.set_num_threads(2)
    batches = calibration_batches(tokenizer, CalibrationSpec("bundled", 16, 256, 0))[:1]
    recorded = json.loads((RESULTS / f"structural_{model_name}_cd-moe-search.json").read_text())
    result = {"model": model_name, "calibration": "8 x 256 tokens (bench/structural.py)",
              "old_recorded": {"seconds": recorded["meta"]["search_seconds"], "evaluations": recorded["meta"]["evaluations"],
                               "kept": {str(lp["layer"]): lp["keep"] for lp in recorded["layers"]}, "order": recorded["meta"]["order"],
                               "candidate_sets": recorded["meta"]["candidate_sets"]}}
    result["new_default"] = timed_new(model, batches)
    print("new default", result["new_default"], flush=True)
    result["new_old_objective"] = timed_new(model, batches, objective="next_token", choose_size=True)
    print("new, old objective", result["new_old_objective"], flush=True)
    small = [batches[0][:2, :128]]
    plan_condense = old_plan_condense()
    rounds = []
    for _ in range(repeats):  # interleaved: old, new, old, new, ...
        old, new = timed_old(model, small, plan_condense), timed_new(model, small, objective="next_token", choose_size=True)
        rounds.append({"old": old, "new": new, "ratio": round(old["seconds"] / new["seconds"], 2)})
        print("interleaved", rounds[-1]["ratio"], old["kept"] == new["kept"], flush=True)
    result["interleaved_small"] = {"calibration": "2 x 128 tokens", "rounds": rounds}
    return result


def report(result: dict) -> str:
    old, new, same = result["old_recorded"], result["new_default"], result["new_old_objective"]
    rounds = result["interleaved_small"]["rounds"]
    ratios = sorted(r["ratio"] for r in rounds)
    lines = [
        "# CD-MoE search: before and after", "",
        f"Command: `python bench/cd_moe_search.py --model {result['model']}`. Model {result['model']}, 3 layers condensed, "
        f"calibration {result['calibration']}. A 2-core machine shared with other jobs (the load average at the end of each "
        "search is given): absolute seconds are noisy, the interleaved ratio is the robust figure.", "",
        "| search | objective | evaluations | seconds | layer order | kept sets |", "|---|---|---|---|---|---|",
        f"| before (recorded, old code) | next token, best size <= top-k | {old['evaluations']} | {old['seconds']} | {old['order']} | {old['kept']} |",
        f"| after, default | authors' (layer output / final hidden state), K = top-k | {new['evaluations']} | {new['seconds']} "
        f"(load {new['load_average']:.1f}) | "
        f"{new['order']} | {new['kept']} |",
        f"| after, old objective | next token, best size <= top-k | {same['evaluations']} | {same['seconds']} (load {same['load_average']:.1f}) | "
        f"{same['order']} | {same['kept']} |",
        "",
        f"Old objective on the new code: per-layer candidate sets {'identical to' if same['candidate_sets'] == old['candidate_sets'] else 'different from'} "
        f"the recorded old search, layer order {'identical' if same['order'] == old['order'] else 'different'}.",
        "",
        f"Interleaved old vs new code on the old objective ({result['interleaved_small']['calibration']}, {len(rounds)} rounds): "
        f"old / new time ratio {', '.join(map(str, ratios))} (median {ratios[len(ratios) // 2]}); kept sets identical in "
        f"{sum(r['old']['kept'] == r['new']['kept'] for r in rounds)} of {len(rounds)} rounds.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="ref-deepseek")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--report", action="store_true", help="only rewrite the markdown from the recorded JSON")
    args = parser.parse_args()
    if not args.report:
        (RESULTS / "cd_moe_search.json").write_text(json.dumps(run(args.model, args.repeats), indent=1) + "\n")
    (RESULTS / "cd_moe_search.md").write_text(report(json.loads((RESULTS / "cd_moe_search.json").read_text())))
