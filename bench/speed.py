"""Speed: calibration and evaluation against the cost of a plain forward pass (issue 24).

Every figure is process CPU time (user + system, all threads; `resource.getrusage`), which a
shared, loaded machine distorts far less than wall time. Each measurement runs in a fresh
process; the kinds of measurement are interleaved round by round and repeated; ratios are
medians of per-round ratios.

(a) Calibration, on a synthetic Qwen3-30B-A3B-shaped checkpoint (bench/scale.py's builder: full
    width, 128 experts, top-8, and here the full 151,936-token vocabulary), 16 x 256 calibration
    tokens in batches of 4:
      * `reap`:   the streamed REAP prune's calibration (`observe_expert_statistics`, reap_sum +
                  selected, StreamedWeights);
      * `plain`:  the same walk with no statistics (`run_sequential` with StreamedWeights);
      * `memory`: transformers' own forward of the decoder stack over the same batches, the model
                  loaded whole (`model.model(input_ids)`; the head is left out because neither walk
                  computes logits: 151,936 x 2048 per token would be more than both layers);
      * `read`:   reading every weight file once, cold (each file evicted from the page cache
                  with posix_fadvise(DONTNEED) first; wall seconds of the read);
      * `coldplain` (--cold): the plain walk with the checkpoint evicted first, wall seconds: where
                  reading the next layer while this one computes would pay (speed.md: not here).
    Targets: reap <= 1.3 x (read + memory); plain <= 1.15 x memory.
(b) `moe-compress eval ref-mixtral --ppl bundled` (the protocol: 128 windows x 256 tokens x 3
    domains), the whole command, against one batched forward of ref-mixtral over the same
    windows (`model(input_ids)`, batches of 8 -- eval's default -- and of 32), timed alone and as a
    whole process (start-up, load, tokenising the windows, forward), and eval's measurement alone
    (`perplexity()` per domain) in the same scope as the forward. Target: eval <= 1.5 x forward.
    With --baseline, the same command run from that tree's src/ too, in the same rounds (`eval_before`).
    An earlier record of part (b) kept by hand under `b_previous` (with its `code`) is shown as a line.
    The "profile" and "what is left" sections of speed.md, where (b)'s time goes (`b_profile`) and the fit demo's
    timing (`c_fit_demo`) are lines kept in speed.json (written by hand from the profiles; a new run keeps them).
(d) Streamed peak RSS of `prune --method reap --ratio 0.25 --streaming on` (16 x 256 calibration tokens,
    batches of 4, no stats cache) on the part (a) checkpoints at 1 and 8 layers (--memory-layers), with the
    quality guard off (the prune's own walk and write) and on (the command's default: the guard then
    walks the input and the output over held-out windows), from `/usr/bin/time -v`. Target: peak <=
    2 x largest decoder layer + activations + 0.5 GiB, activations = the calibration hidden states the
    walk holds, two generations (a layer's inputs and outputs) of tokens x hidden size in bf16.
(c) The demo (scripts/demo.sh minus set-up): `prune ref-mixtral --method reap --ratio 0.25 ...
    --eval bundled`, CPU and wall seconds. Target: <= 2 minutes.

    python bench/speed.py                         # all parts, 3 rounds
    python bench/speed.py --parts b --rounds 5    # a subset; results are merged into speed.json
    python bench/speed.py --parts d               # peak RSS at 1 and 8 layers

Results: bench/results/speed.json and speed.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from filelock import FileLock

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MOE_COMPRESS_QUIET", "1")

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
FULL_VOCAB = 151936  # Qwen3-30B-A3B's
DEMO = ["prune", "ref-mixtral", "--method", "reap", "--ratio", "0.25", "--budget", "global", "--calib", "bundled",
        "--samples", "64", "--seq-len", "256", "--eval", "bundled", "--overwrite"]

_CHILD = r"""
import json, os, resource, sys, time
import torch
torch.set_num_threads(int(os.environ["SPEED_THREADS"]))

def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime

def evict(source):  # the next read comes from the disk, not the page cache
    for name in sorted(p for p in os.listdir(source) if p.endswith(".safetensors")):
        fd = os.open(os.path.join(source, name), os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)

kind, source = sys.argv[1], sys.argv[2]
result = {}
if kind == "coldplain":  # the plain walk with none of the checkpoint in the page cache: what reading ahead is for
    evict(source)
    kind = "plain"
if kind in ("reap", "plain"):
    from moe_compress.arch import get_adapter
    from moe_compress.data import CalibrationSpec, calibration_batches
    from moe_compress.source.load import load_streamed
    from moe_compress.walk import observe_expert_statistics, run_sequential
    weights, tokenizer = load_streamed(source)
    model, adapter = weights.model, get_adapter(weights.model)
    batches = calibration_batches(tokenizer, CalibrationSpec(samples=16, seq_len=256, batch_size=4))
    start, wall, start_sys = cpu(), time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_stime
    if kind == "plain":
        run_sequential(model, adapter, batches, weights=weights)
    else:
        observe_expert_statistics(model, adapter, batches, ("reap_sum", "selected"), weights=weights)
elif kind == "memory":
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from moe_compress.data import CalibrationSpec, calibration_batches
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).eval()
    batches = calibration_batches(AutoTokenizer.from_pretrained(source), CalibrationSpec(samples=16, seq_len=256, batch_size=4))
    start, wall, start_sys = cpu(), time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_stime
    with torch.no_grad():
        for batch in batches:
            model.model(input_ids=batch, use_cache=False)
elif kind == "read":
    files = sorted(p for p in os.listdir(source) if p.endswith(".safetensors"))
    evict(source)
    start, wall, start_sys = cpu(), time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_stime
    total = 0
    for name in files:
        with open(os.path.join(source, name), "rb", buffering=0) as f:
            while chunk := f.read(16 << 20):
                total += len(chunk)
    result["bytes"] = total
elif kind.startswith(("forward", "perplexity")):
    batch_size = int(kind.removeprefix("forward").removeprefix("perplexity"))
    start_process = cpu()
    from moe_compress.evaluate.protocol import DEFAULT_PROTOCOL, expand_sources
    from moe_compress.source.open import open_model
    model, tokenizer, _ = open_model(source, "cpu", "auto", "auto", False)
    sets = [DEFAULT_PROTOCOL.windows_of(tokenizer, s, model.config) for s in expand_sources("bundled")]
    start, wall, start_sys = cpu(), time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_stime
    if kind.startswith("perplexity"):  # what `eval` runs per source, in the same scope as the forward
        from moe_compress.evaluate.lm_perplexity import perplexity
        result["perplexities"] = [round(perplexity(model, windows, batch_size).perplexity, 3) for windows in sets]
    else:
        with torch.no_grad():
            for windows in sets:
                for batch in windows.split(batch_size):
                    model(input_ids=batch, use_cache=False)
    result["process_cpu_s"] = cpu()  # from exec: start-up, load, windows and forward
result["cpu_s"] = cpu() - start
result["wall_s"] = time.perf_counter() - wall
result["sys_s"] = resource.getrusage(resource.RUSAGE_SELF).ru_stime - start_sys
print("RESULT" + json.dumps(result))
"""


def child(kind: str, source: str, threads: int, code: Path = REPO) -> dict:
    """One measurement in a fresh process, with the package of `code` (this tree, or a baseline's copy)."""
    env = {**os.environ, "SPEED_THREADS": str(threads), "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(code / "src")}
    out = subprocess.run([sys.executable, "-c", _CHILD, kind.removesuffix("_before"), source], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{out.stderr[-3000:]}")
    return json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT"))[6:])


def command(arguments: list[str], threads: int, code: Path = REPO) -> dict:
    """CPU (user + sys of the child) and wall seconds of one `moe-compress` command, with the package of `code`."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(code / "src")}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "moe_compress.cli", *arguments, "--threads", str(threads)],
                         capture_output=True, text=True, env=env)
    wall = time.perf_counter() - wall
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        raise RuntimeError(f"{arguments} failed:\n{out.stderr[-3000:]}")
    return {"cpu_s": after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime,
            "user_s": after.ru_utime - before.ru_utime, "sys_s": after.ru_stime - before.ru_stime, "wall_s": wall,
            "stdout": out.stdout}


def median_ratio(rounds: list[dict], top: str, bottom, key: str = "cpu_s") -> float:
    return round(statistics.median(r[top][key] / bottom(r) for r in rounds), 3)


def part_a(workdir: Path, layers: int, rounds: int, threads: int, baseline: Path | None, cold: bool = False) -> dict:
    import scale

    scale.VOCAB = FULL_VOCAB
    source = workdir / f"qwen3_moe-{layers}layers"
    shutil.rmtree(source, ignore_errors=True)
    checkpoint_bytes = scale.build_checkpoint(source, "qwen3_moe", layers)
    try:
        runs = []
        for _ in range(rounds):
            kinds = ("reap", "plain", "memory", "read", *(("reap_before", "plain_before") if baseline else ()),
                     *(("coldplain", *(("coldplain_before",) if baseline else ())) if cold else ()))
            runs.append({kind: child(kind, str(source), threads, baseline if kind.endswith("_before") else REPO) for kind in kinds})
            print(json.dumps(runs[-1]), flush=True)
    finally:
        shutil.rmtree(source, ignore_errors=True)
    compared = {
        "plain_before_over_memory": median_ratio(runs, "plain_before", lambda r: r["memory"]["cpu_s"]),
        "plain_before_over_memory_wall": median_ratio(runs, "plain_before", lambda r: r["memory"]["wall_s"], "wall_s"),
        "reap_before_over_read_plus_memory": median_ratio(runs, "reap_before", lambda r: r["read"]["wall_s"] + r["memory"]["cpu_s"]),
    } if baseline else {}
    if cold:
        compared |= {"coldplain_over_memory_wall": median_ratio(runs, "coldplain", lambda r: r["memory"]["wall_s"], "wall_s"),
                   **({"coldplain_over_before_wall": median_ratio(runs, "coldplain", lambda r: r["coldplain_before"]["wall_s"], "wall_s")}
                      if baseline else {})}
    return {
        **compared, "baseline": str(baseline) if baseline else None,
        "layers": layers, "checkpoint_bytes": checkpoint_bytes, "rounds": runs,
        "reap_over_read_plus_memory": median_ratio(runs, "reap", lambda r: r["read"]["wall_s"] + r["memory"]["cpu_s"]),
        "plain_over_memory": median_ratio(runs, "plain", lambda r: r["memory"]["cpu_s"]),
        "plain_over_memory_wall": median_ratio(runs, "plain", lambda r: r["memory"]["wall_s"], "wall_s"),
        "reap_over_plain": median_ratio(runs, "reap", lambda r: r["plain"]["cpu_s"]),
    }


def part_b(rounds: int, threads: int, baseline: Path | None) -> dict:
    def evaluation(code: Path) -> tuple[dict, list[str]]:
        run = command(["eval", "ref-mixtral", "--ppl", "bundled"], threads, code)
        return run, [line.split("│")[2].strip() for line in run.pop("stdout").splitlines() if "ppl " in line]

    runs = []
    for _ in range(rounds):
        eval_run, perplexities = evaluation(REPO)
        before = dict(zip(("eval_before", "perplexities_before"), evaluation(baseline))) if baseline else {}
        runs.append({"eval": eval_run, "perplexities": perplexities, **before,
                     **{kind: child(kind, "ref-mixtral", threads) for kind in ("forward8", "perplexity8", "forward32")}})
        print(json.dumps(runs[-1]), flush=True)
    compared = {"baseline": str(baseline), "eval_before_over_forward8": median_ratio(runs, "eval_before", lambda r: r["forward8"]["cpu_s"]),
                "eval_over_eval_before": median_ratio(runs, "eval", lambda r: r["eval_before"]["cpu_s"])} if baseline else {}
    return {
        **compared, "rounds": runs,
        "eval_over_forward8": median_ratio(runs, "eval", lambda r: r["forward8"]["cpu_s"]),
        "eval_over_forward32": median_ratio(runs, "eval", lambda r: r["forward32"]["cpu_s"]),
        "eval_over_forward8_process": median_ratio(runs, "eval", lambda r: r["forward8"]["process_cpu_s"]),
        "perplexity_over_forward8": median_ratio(runs, "perplexity8", lambda r: r["forward8"]["cpu_s"]),
    }


def part_c(workdir: Path, rounds: int, threads: int) -> dict:
    runs = []
    for _ in range(rounds):
        run = command([*DEMO, "--out", str(workdir / "demo")], threads)
        run.pop("stdout")
        runs.append(run)
        print(json.dumps(run), flush=True)
    shutil.rmtree(workdir / "demo", ignore_errors=True)
    return {"rounds": runs, "median_cpu_s": round(statistics.median(r["cpu_s"] for r in runs), 1),
            "median_wall_s": round(statistics.median(r["wall_s"] for r in runs), 1)}


MEMORY_PRUNE = ["prune", "--method", "reap", "--ratio", "0.25", "--streaming", "on", "--calib", "bundled", "--samples", "16",
                "--seq-len", "256", "--batch-size", "4", "--threads", "1", "--no-cache", "--overwrite"]


def part_d(workdir: Path, layers: int) -> dict:
    """Peak RSS of the streamed REAP prune, guard off and on, against 2 x largest layer + activations + 0.5 GiB."""
    import scale

    scale.VOCAB = FULL_VOCAB
    source = workdir / f"qwen3_moe-{layers}layers"
    shutil.rmtree(source, ignore_errors=True)
    checkpoint_bytes = scale.build_checkpoint(source, "qwen3_moe", layers)
    try:
        largest = scale.layer_bytes(source)
        runs = {}
        for name, extra in (("guard off", ["--no-guard"]), ("guard on", [])):
            run = scale.timed([sys.executable, "-m", "moe_compress.cli", MEMORY_PRUNE[0], str(source), *MEMORY_PRUNE[1:],
                               "--out", str(workdir / "out"), *extra])
            shutil.rmtree(workdir / "out", ignore_errors=True)
            if run["exit_code"] != 0:
                raise RuntimeError(f"{name}: {run['error']}")
            runs[name] = run
            print(json.dumps({name: run}), flush=True)
    finally:
        shutil.rmtree(source, ignore_errors=True)
    activations = 16 * 256 * 2048 * 2 * 2
    return {"layers": layers, "checkpoint_bytes": checkpoint_bytes, "layer_bytes": largest, "activation_bytes": activations,
            "target_bytes": 2 * largest + activations + 2**29, "runs": runs}


def markdown(report: dict) -> str:
    def cells(runs: list[dict], kind: str, key: str | None = "cpu_s") -> str:
        return ", ".join(f"{(r[kind][key] if key else r[kind]):.1f}" for r in runs)

    lines = ["# Speed: calibration and evaluation at the cost of a forward pass (issue 24)", "",
             *[f"Command: `{c}`" for c in report["commands"]], "",
             f"Machine: {report['machine']}. CPU seconds = user + system of the measuring process (all threads), "
             "each measurement a fresh process, kinds interleaved per round; ratios are medians of per-round ratios.", ""]
    for key in sorted(k for k in report if k.startswith("a_")):
        a = report[key]
        runs = a["rounds"]
        lines += [f"## (a) Calibration, Qwen3-30B-A3B-shaped, {a['layers']} layers, full vocabulary "
                  f"({a['checkpoint_bytes'] / 2**30:.2f} GiB), 16 x 256 tokens, {report['threads']} thread(s)", "",
                  "| measurement | per round |", "|---|---|",
                  f"| streamed REAP calibration, CPU s | {cells(runs, 'reap')} |",
                  f"| streamed plain walk (no statistics), CPU s | {cells(runs, 'plain')} |",
                  f"| ... of which system CPU s | {cells(runs, 'plain', 'sys_s')} |" if "sys_s" in runs[0]["plain"] else None,
                  *([f"| baseline ({a['baseline']}): streamed REAP calibration, CPU s | {cells(runs, 'reap_before')} |",
                     f"| baseline: streamed plain walk, CPU s | {cells(runs, 'plain_before')} |",
                     f"| ... of which system CPU s | {cells(runs, 'plain_before', 'sys_s')} |"] if a.get("baseline") else []),
                  f"| in-memory transformers forward (decoder stack), CPU s | {cells(runs, 'memory')} |",
                  *([f"| streamed plain walk, wall s | {cells(runs, 'plain', 'wall_s')} |",
                     *([f"| baseline: streamed plain walk, wall s | {cells(runs, 'plain_before', 'wall_s')} |"] if a.get("baseline") else []),
                     f"| in-memory transformers forward, wall s | {cells(runs, 'memory', 'wall_s')} |"] if "plain_over_memory_wall" in a else []),
                  *([f"| streamed plain walk from a cold page cache, wall s | {cells(runs, 'coldplain', 'wall_s')} |",
                     *([f"| baseline: the same, wall s | {cells(runs, 'coldplain_before', 'wall_s')} |"] if a.get("baseline") else [])]
                    if "coldplain_over_memory_wall" in a else []),
                  f"| cold read of the weight files, wall s | {cells(runs, 'read', 'wall_s')} |", "",
                  f"* REAP calibration / (read + in-memory forward): **{a['reap_over_read_plus_memory']}** (target <= 1.3)",
                  f"* plain streamed walk / in-memory forward: **{a['plain_over_memory']}** (target <= 1.15)",
                  f"* REAP calibration / plain streamed walk: {a['reap_over_plain']}",
                  *([f"* wall time, plain streamed walk / in-memory forward: {a['plain_over_memory_wall']}"
                     + (f" (baseline {a['plain_before_over_memory_wall']})" if a.get("baseline") else "")] if "plain_over_memory_wall" in a else []),
                  *([f"* wall time, plain streamed walk from a cold page cache / in-memory forward (warm): {a['coldplain_over_memory_wall']}"
                     + (f"; / the baseline's cold walk: {a['coldplain_over_before_wall']}" if "coldplain_over_before_wall" in a else "")]
                    if "coldplain_over_memory_wall" in a else []),
                  *([f"* baseline: plain walk / in-memory forward {a['plain_before_over_memory']}, "
                     f"REAP / (read + in-memory forward) {a['reap_before_over_read_plus_memory']}"] if a.get("baseline") else []), ""]
        lines = [line for line in lines if line is not None]
    if "b" in report:
        b = report["b"]
        runs = b["rounds"]
        lines += ["## (b) `moe-compress eval ref-mixtral --ppl bundled` (128 x 256 tokens x 3 domains)", "",
                  "| measurement | per round |", "|---|---|",
                  f"| eval, whole command, CPU s | {cells(runs, 'eval')} |",
                  f"| eval, of which system CPU s | {cells(runs, 'eval', 'sys_s')} |",
                  f"| forward of the same windows, batches of 8, CPU s | {cells(runs, 'forward8')} |",
                  f"| forward of the same windows, batches of 32, CPU s | {cells(runs, 'forward32')} |",
                  f"| eval's measurement alone (`perplexity()` per domain, batches of 8, same process scope as the forward), CPU s | {cells(runs, 'perplexity8')} |",
                  f"| forward, batches of 8, whole process (start-up, load, windows, forward), CPU s | {cells(runs, 'forward8', 'process_cpu_s')} |", "",
                  f"Perplexities printed (dictionary, manpages, pydoc): {', '.join(runs[0]['perplexities'])}.", "",
                  f"* eval command / forward (batches of 8): **{b['eval_over_forward8']}** (target <= 1.5)",
                  f"* eval command / forward (batches of 32): {b['eval_over_forward32']}",
                  f"* eval command / forward process of the same scope (start-up + load + windows + forward): {b['eval_over_forward8_process']}",
                  f"* eval's measurement alone / forward (batches of 8): **{b['perplexity_over_forward8']}**", ""]
        if b.get("baseline"):
            lines[-1:-1] = [f"* baseline ({b['baseline']}), same rounds: eval, whole command, CPU s {cells(runs, 'eval_before')} "
                            f"(system {cells(runs, 'eval_before', 'sys_s')}); eval / forward (batches of 8) **{b['eval_before_over_forward8']}**; "
                            f"perplexities {', '.join(runs[0]['perplexities_before'])}",
                            f"* eval / the baseline's eval: {b['eval_over_eval_before']}"]
    if report.get("b_profile"):
        lines += [*report["b_profile"], ""]
    for key, label in (("b_previous", "Previous record of this part"), ("b_before", "Before an earlier branch's evaluation changes")):
        if key in report:
            b = report[key]
            runs = b["rounds"]
            lines += [f"{label} ({b['code']}), same command and forwards: "
                      f"eval CPU s {cells(runs, 'eval')} (system {cells(runs, 'eval', 'sys_s')}), forward (batches of 8) {cells(runs, 'forward8')}; "
                      f"eval / forward **{b['eval_over_forward8']}**; perplexities {', '.join(runs[0]['perplexities'])}.", ""]
    if "c" in report:
        c = report["c"]
        lines += ["## (c) The demo minus set-up: `moe-compress " + " ".join(DEMO) + " --out ...`", "",
                  f"CPU s per round: {cells(c['rounds'], 'cpu_s', None)}; wall s: {cells(c['rounds'], 'wall_s', None)}. Median CPU **{c['median_cpu_s']} s**, "
                  f"median wall {c['median_wall_s']} s on the loaded machine (target <= 120 s).", ""]
    memory = [report[k] for k in sorted((k for k in report if k.startswith("d_")), key=lambda k: int(k[2:]))]
    if memory:
        gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
        lines += ["## (d) Streamed peak RSS: `moe-compress " + " ".join([MEMORY_PRUNE[0], "CHECKPOINT", *MEMORY_PRUNE[1:]]) + " --out ...`", "",
                  "Qwen3-30B-A3B-shaped, full vocabulary, as part (a). Target: 2 x largest decoder layer + activations (two generations "
                  "of the calibration hidden states, bf16) + 0.5 GiB. Peak RSS from `/usr/bin/time -v`, one run each.", "",
                  "| layers | checkpoint GiB | largest layer GiB | activations GiB | target GiB | guard | peak RSS GiB | within target |",
                  "|---:|---:|---:|---:|---:|---|---:|---|"]
        for d in memory:
            for name, run in d["runs"].items():
                lines.append(f"| {d['layers']} | {gib(d['checkpoint_bytes'])} | {gib(d['layer_bytes'])} | {gib(d['activation_bytes'])} | "
                             f"{gib(d['target_bytes'])} | {name} | {gib(run['peak_rss_bytes'])} | "
                             f"{'yes' if run['peak_rss_bytes'] <= d['target_bytes'] else 'no'} |")
        lines.append("")
    if report.get("c_fit_demo"):
        lines += [*report["c_fit_demo"], ""]
    for section in ("profile", "what is left"):
        if report.get(section):
            lines += [f"## {section[0].upper()}{section[1:]}", "", *report[section], ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="a,b,c")
    parser.add_argument("--layers", default="2", help="decoder layers of the synthetic checkpoints, comma-separated (part a)")
    parser.add_argument("--memory-layers", default="1,8", help="decoder layers of the checkpoints part (d) measures, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=Path("/work/scratch-speed"))
    parser.add_argument("--baseline", type=Path, help="a copy of an earlier tree (with src/): part (a) also measures its walks, part (b) its eval, interleaved")
    parser.add_argument("--cold", action="store_true", help="part (a) also times the plain walk with the checkpoint evicted from the page cache (wall)")
    args = parser.parse_args()
    out = RESULTS / "speed.json"
    report: dict = {"commands": ["python bench/speed.py " + " ".join(sys.argv[1:])], "threads": args.threads,
                    "machine": f"{os.cpu_count()} CPUs (shared, load {os.getloadavg()[0]:.0f} at the start), "
                               f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM"}
    parts = args.parts.split(",")

    def save() -> None:
        """Merge this run's parts into what is recorded (runs of other parts may write beside it)."""
        RESULTS.mkdir(exist_ok=True)
        with FileLock("/tmp/moe-compress-speed-bench.lock"):
            merged = json.loads(out.read_text()) if out.is_file() else {}
            commands = [c for c in merged.get("commands", []) if c not in report["commands"]] + report["commands"]
            merged |= {**report, "commands": commands}
            out.write_text(json.dumps(merged, indent=2) + "\n")
            (RESULTS / "speed.md").write_text(markdown(merged))

    if "b" in parts:
        report["b"] = part_b(args.rounds, args.threads, args.baseline)
        save()
    if "c" in parts:
        report["c"] = part_c(args.workdir, args.rounds, args.threads)
        save()
    if "d" in parts:
        for layers in (int(n) for n in args.memory_layers.split(",")):
            report[f"d_{layers}"] = part_d(args.workdir, layers)
            save()
    if "a" in parts:
        for layers in (int(n) for n in args.layers.split(",")):
            report[f"a_{layers}"] = part_a(args.workdir, layers, args.rounds, args.threads, args.baseline, args.cold)
            save()


if __name__ == "__main__":
    main()
