"""Scale: `fit` on a checkpoint twice the memory it may use, streamed layer by layer.

The synthetic 8-layer Qwen3-30B-A3B-shaped checkpoint of `bench/scale.py` (128 experts of width
768, top-8, hidden 2048, a 32 k vocabulary; bf16 random weights, about 10 GB) is fitted to a
budget of `--memory-share` of its bytes by the command line, inside a cgroup-v1 memory cgroup
limited to `--cgroup-share` of its bytes (the limit covers RSS and page cache). Recorded: wall
time, peak RSS and the cgroup's peak, the chosen candidate, the output's bytes against the
budget, and whether the output loads and runs in plain transformers -- a subprocess in which
moe_compress cannot be imported (compressed-tensors loads the quantised weights).

The calibration and the held-out text are small (the defaults below: 8 x 128 calibration tokens,
2 windows of 128 tokens per bundled domain) so the run takes minutes on two shared CPU cores;
the bench measures whether the streamed fit runs in the memory, not the quality of its choice.

    python bench/fit_scale.py --repeat 3          # builds /tmp/fitscale/qwen3_moe-8L if missing (~10 GB of disk)

Each run starts from a cold page cache (the checkpoint's pages dropped with `posix_fadvise`, so
the reads come from the disk and their page cache is charged to the cgroup, as on a fresh
container), unless `--warm`; `--repeat N` runs it N times, each recorded, to show that it fits
reliably -- a run that fits once may still be killed by the cgroup on the next. Hand-written notes
live in the JSON's "notes" (kept from the previous results) and are printed after the table.

Results: bench/results/fit_scale.json and fit_scale.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from scale import RESULTS, build_checkpoint, cgroup_peak, make_cgroup, timed  # noqa: E402

RELOAD = """
import sys
sys.modules["moe_compress"] = None  # plain transformers: importing moe_compress fails here
import json, torch
from transformers import AutoModelForCausalLM
out = sys.argv[1]
remote = "auto_map" in json.load(open(f"{out}/config.json"))
model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=remote)
ids = torch.arange(1, 33)[None]
with torch.no_grad():
    logits = model(input_ids=ids).logits
print(json.dumps({"loaded": type(model).__name__, "trust_remote_code": remote, "logits_finite": bool(torch.isfinite(logits).all()),
                  "quantization": (getattr(model.config, "quantization_config", None) or {}).get("format") if isinstance(
                      getattr(model.config, "quantization_config", None), dict) else str(getattr(model.config, "quantization_config", None))}))
"""


def tensor_bytes(directory: Path) -> int:
    from moe_compress.source.checkpoint import Checkpoint

    return Checkpoint(directory).total_bytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/fitscale"))
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--memory-share", type=float, default=0.6)
    parser.add_argument("--cgroup-share", type=float, default=0.5)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-windows", type=int, default=2)
    parser.add_argument("--eval-seq-len", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=1, help="runs, each from a cold page cache unless --warm")
    parser.add_argument("--warm", action="store_true", help="leave the checkpoint's pages in the page cache")
    args = parser.parse_args()
    source = args.workdir / f"qwen3_moe-{args.layers}L"
    if not source.exists():
        build_checkpoint(source, "qwen3_moe", args.layers)
    original = tensor_bytes(source)
    budget, limit = int(original * args.memory_share), int(original * args.cgroup_share)
    out = args.workdir / "fitted"
    command = [str(Path(sys.executable).parent / "moe-compress"), "fit", str(source), "--memory", f"{budget}B", "--out", str(out),
               "--calib", "bundled", "--samples", str(args.samples), "--seq-len", str(args.seq_len),
               "--eval-windows", str(args.eval_windows), "--eval-seq-len", str(args.eval_seq_len)]
    os.environ["MOE_COMPRESS_CACHE"] = str(args.workdir / "cache")  # a fresh statistics cache: the run calibrates
    report = {"command": " ".join(command), "checkpoint_bytes": original, "budget_bytes": budget, "cgroup_limit_bytes": limit,
              "page_cache": "warm" if args.warm else "cold", "runs": []}
    for _ in range(args.repeat):
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(args.workdir / "cache", ignore_errors=True)
        if not args.warm:
            drop_page_cache(source)
        run = fitted_run(command, limit)
        report["runs"].append(run)
        print(json.dumps(run), flush=True)
        if run["exit_code"] == 0 and "output_bytes" not in report:
            report |= describe_output(out, budget)
    previous = RESULTS / "fit_scale.json"
    if previous.exists():
        report["notes"] = json.loads(previous.read_text()).get("notes", [])
    RESULTS.mkdir(exist_ok=True)
    previous.write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "fit_scale.md").write_text(markdown(report))
    print(markdown(report))


def drop_page_cache(source: Path) -> None:
    """Evict the checkpoint's pages from the page cache (clean pages: they go at once)."""
    for shard in source.glob("*.safetensors"):
        descriptor = os.open(shard, os.O_RDONLY)
        try:
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


def fitted_run(command: list[str], limit: int) -> dict:
    """One run of `command` in a fresh cgroup limited to `limit` bytes: wall, peak RSS, exit code, the cgroup's peak."""
    group = make_cgroup(limit)
    try:
        run = timed(command, group)
        run["cgroup_peak_bytes"] = cgroup_peak(group)
    finally:
        group.rmdir()
    return run


def describe_output(out: Path, budget: int) -> dict:
    """The fitted output: its bytes against the budget, the choice and its candidates, and whether plain transformers loads it."""
    fitted = json.loads((out / "fit_report.json").read_text())
    described = {"output_bytes": tensor_bytes(out), "chosen": fitted["chosen"],
                 "candidates": [{k: c.get(k) for k in ("name", "bytes", "kl", "top1")} for c in fitted["candidates"]]}
    described["output_within_budget"] = described["output_bytes"] <= budget
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    reload = subprocess.run([sys.executable, "-c", RELOAD, str(out)], capture_output=True, text=True, env=env)
    described["reload"] = json.loads(reload.stdout.strip().splitlines()[-1]) if reload.returncode == 0 else {"error": reload.stderr[-500:]}
    return described


def markdown(report: dict) -> str:
    gib = 2**30
    runs = report["runs"]
    fitted = sum(run["exit_code"] == 0 for run in runs)
    reload = report.get("reload", {})
    lines = ["# fit, streamed, on a checkpoint twice its memory", "",
             f"`{report['command']}` inside a cgroup-v1 memory cgroup, {len(runs)} run(s), each from a {report['page_cache']} page cache "
             f"(`python bench/fit_scale.py --repeat {len(runs)}{' --warm' if report['page_cache'] == 'warm' else ''}`)", "",
             f"Checkpoint {report['checkpoint_bytes'] / gib:.2f} GiB; budget (--memory) {report['budget_bytes'] / gib:.2f} GiB; cgroup limit "
             f"{report['cgroup_limit_bytes'] / gib:.2f} GiB. **Fitted in {fitted} of {len(runs)} runs.**", "",
             "| run | exit | wall | peak RSS | cgroup peak (counts page cache) | error |", "|---|---|---|---|---|---|"]
    for number, run in enumerate(runs, 1):
        rss = f"{run['peak_rss_bytes'] / gib:.2f} GiB" if run.get("peak_rss_bytes") else "?"
        lines.append(f"| {number} | {run['exit_code']} | {run['wall_s']} s | {rss} | {run['cgroup_peak_bytes'] / gib:.2f} GiB | {run.get('error') or ''} |")
    if "output_bytes" in report:
        lines += ["", f"Output (first run that fitted): {report['output_bytes'] / gib:.2f} GiB, within the budget: {report['output_within_budget']}; "
                  f"reloads in plain transformers with finite logits: {reload.get('logits_finite', reload.get('error', '?'))} "
                  f"({reload.get('loaded', '?')}). Chosen: {report['chosen']}.", "", "| candidate | bytes | KL | top-1 |", "|---|---|---|---|"]
        lines += [f"| {c['name']} | {c['bytes']} | {c['kl']:.4g} | {c['top1']:.3f} |" for c in report["candidates"]]
    for note in report.get("notes", []):
        lines += ["", note]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
