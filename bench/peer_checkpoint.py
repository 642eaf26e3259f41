"""Both tools' REAP timed on a checkpoint directory: `bench/peers.py --timing PAIRS --checkpoint DIR` (issue #24).

The 12 M reference models of `peers.py --timing` say little about a real checkpoint: there,
start-up and imports are most of a run. This times both REAPs on a large checkpoint -- the
synthetic Qwen3-30B-A3B-shaped ones of bench/scale.py's builder (full width, 128 experts,
top-8, here the full 151,936-token vocabulary as bench/speed.py builds them) -- the way each
tool's user would run it:

* llm-compressor: the peer runner of peers.py (`from_pretrained` of the whole model, `oneshot`
  with `REAPPruningModifier`, `save_pretrained`), in its own venv, the weights in the
  checkpoint's own dtype (bf16; float32 would not fit an 8-layer checkpoint in 24 GiB).
* moe-compress: the command line, `moe-compress prune DIR --method reap --ratio 0.25 --budget
  layer --streaming on` with bench/scale.py's calibration flags (bundled text, batches of 4,
  2 threads, no statistics cache), so the model is read layer by layer from the checkpoint as
  on a model larger than memory. The quality guard (on by default; it reads the input and the
  output once more over 32 held-out windows) is work the peer does not do: by default each
  round runs ours twice, `--no-guard` (the same work as the peer: the ratio that counts) and
  as the command's defaults leave it (`--skip-guarded` drops that run).

Both get the same tokens: the peer the tensor `calibration_batches(tokenizer, CalibrationSpec(
"bundled", samples, seq_len, 0, 4))` builds from the checkpoint's tokenizer, ours the same spec
from its command line (`stage_command.py` builds `CalibrationSpec(calib, samples, seq_len, seed,
batch_size, text_field)` and `engine/prepare.py` calls the same `calibration_batches` with the
checkpoint's tokenizer); the fingerprint of those batches is recorded (ours writes none to check).
Same ratio (25 %, layer-wise: llm-compressor's only budget), batches of 4 for both, 2 threads for
both (OMP_NUM_THREADS and, ours, --threads). Each run is a fresh process; the runs of a round are
interleaved (peer, ours, ours guarded, peer, ...). Per run: wall seconds (process start to exit,
loading and saving included), CPU seconds (user + sys of the child, from wait4) and peak RSS, the
output's bytes and its experts per layer (router rows); the output is then deleted. Ratios ours /
peer are taken round by round; the median is recorded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from moe_compress.data import CalibrationSpec, calibration_batches
from moe_compress.data.batches import batches_fingerprint

BATCH_SIZE = 4
THREADS = 2
RATIO = 0.25
#: A round counts as quiet when the 1-minute load average before both runs is below this (2 cores).
QUIET_LOAD = 2.0
#: bench/scale.py's calibration flags, with this bench's sample count and length.
OURS_FLAGS = ["--calib", "bundled", "--seed", "0", "--batch-size", str(BATCH_SIZE), "--threads", str(THREADS), "--no-cache"]
#: The line a finished progress task prints off a terminal: "calibrating: 2/2 done in 2m 37s", "writing DIR: done in 26s".
PHASE = re.compile(r"^(?P<what>[^:]+)(?::.*?)? done in (?:(?P<m>\d+)m )?(?P<s>\d+(?:\.\d+)?)s$")


def machine() -> str:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} CPUs, {memory:.0f} GiB RAM, no GPU, shared with other work"


def measured(command: list[str], log: Path, env: dict) -> dict:
    """Run `command` to completion: wall and CPU seconds (user + sys) and peak RSS of the child, from wait4."""
    started = time.perf_counter()
    with log.open("w") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    run = {"wall_s": round(time.perf_counter() - started, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
           "user_s": round(usage.ru_utime, 2), "sys_s": round(usage.ru_stime, 2), "peak_rss_bytes": usage.ru_maxrss * 1024,
           "exit_code": child.returncode}
    if child.returncode != 0:
        tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        run["error"] = (tail or ["(no output)"])[-1][:300]
    return run


def routers(directory: Path) -> dict[int, torch.Tensor]:
    """Each MoE layer's router weight [experts, hidden] in a checkpoint directory."""
    from safetensors import safe_open

    found: dict[int, torch.Tensor] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as handle:
            for key in handle.keys():
                layer = re.search(r"layers\.(\d+)\.mlp\.gate\.weight$", key)
                if layer:
                    found[int(layer.group(1))] = handle.get_tensor(key)
    return found


def output_facts(out: Path, source: Path) -> dict:
    """What a run wrote: its weight bytes, the experts each MoE layer kept (rows of its router) and
    which of the source's experts they are (its router rows found again in the output's), so the
    two tools' choices can be compared run by run."""
    original = routers(source)
    def index(layer: int, row: torch.Tensor) -> int:  # -1: a row the source does not have
        matches = (original[layer] == row).all(dim=1).nonzero()
        return int(matches[0]) if len(matches) else -1

    kept = {layer: [index(layer, row) for row in router] for layer, router in routers(out).items()}
    config = json.loads((out / "config.json").read_text()) if (out / "config.json").is_file() else {}
    return {"output_bytes": sum(shard.stat().st_size for shard in out.glob("*.safetensors")),
            "experts_per_layer": [len(kept[i]) for i in sorted(kept)],
            "config_num_experts": config.get("num_experts", config.get("num_local_experts")),
            "kept_experts": [sorted(kept[i]) for i in sorted(kept)]}


def phases(log: Path) -> list[tuple[str, float]]:
    """Our progress summary lines (task, seconds) from a run's log: where its time went."""
    found = []
    for line in log.read_text(errors="replace").splitlines():
        match = PHASE.match(line.strip())
        if match:
            what = match["what"].split(" /")[0].strip()  # "writing /tmp/out" -> "writing"
            found.append((what, int(match["m"] or 0) * 60 + float(match["s"])))
    return found


def time_checkpoint(source: Path, rounds: int, samples: int, seq_len: int, peer_python: Path, peer_runner: str,
                    guarded: bool, scratch: Path, previous: dict | None, save: Callable[[dict], None], command_line: str) -> dict:
    """`rounds` interleaved rounds of both tools' REAP on `source`, after the rounds of `previous` (an
    entry recorded before with the same settings, or None); `save` gets the entry after every run,
    so a long bench stopped half-way keeps what it measured."""
    from transformers import AutoTokenizer

    spec = CalibrationSpec("bundled", samples, seq_len, 0, BATCH_SIZE)
    batches = calibration_batches(AutoTokenizer.from_pretrained(source), spec)
    torch.save(torch.cat(batches), scratch / "tokens.pt")
    (scratch / "peer.py").write_text(peer_runner)
    threads = {"OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS)}
    base = {**os.environ, **threads, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    peer_env = {key: value for key, value in base.items() if key != "PYTHONPATH"}  # the peer's environment sees nothing of ours
    ours_env = {**base, "PYTHONPATH": str(Path(__file__).resolve().parent.parent / "src")}
    ours_env.pop("MOE_COMPRESS_QUIET", None)  # normal verbosity: the log keeps one line per finished phase
    ours = [sys.executable, "-m", "moe_compress.cli", "prune", str(source), "--method", "reap", "--ratio", str(RATIO),
            "--budget", "layer", "--streaming", "on", "--samples", str(samples), "--seq-len", str(seq_len), *OURS_FLAGS, "--overwrite"]
    commands = {
        "llm-compressor": (lambda out: [str(peer_python), str(scratch / "peer.py"), str(source), str(scratch / "tokens.pt"),
                                        str(RATIO), str(out), "auto", str(BATCH_SIZE)], peer_env),
        "moe-compress": (lambda out: [*ours, "--no-guard", "--out", str(out)], ours_env),
        **({"moe-compress (guard on)": (lambda out: [*ours, "--out", str(out)], ours_env)} if guarded else {}),
    }
    entry = previous or {
        "kind": "checkpoint", "checkpoint": str(source), "checkpoint_bytes": sum(p.stat().st_size for p in source.glob("*.safetensors")),
        "config": {k: v for k, v in json.loads((source / "config.json").read_text()).items()
                   if k in ("model_type", "num_hidden_layers", "num_experts", "num_local_experts", "num_experts_per_tok", "hidden_size",
                            "moe_intermediate_size", "vocab_size", "dtype")},
        "ratio": RATIO, "budget": "layer", "samples": samples, "seq_len": seq_len, "batch_size": BATCH_SIZE, "threads": THREADS,
        "tokens_fingerprint": batches_fingerprint(batches), "machine": machine(), "sessions": [], "runs": {}}
    if entry["tokens_fingerprint"] != batches_fingerprint(batches):
        raise SystemExit(f"{source}: the recorded rounds used other calibration tokens; drop --append to start anew")
    first = 1 + max((run["round"] for runs in entry["runs"].values() for run in runs), default=0)
    session = {"command": command_line, "rounds": list(range(first, first + rounds)), "load_average_start": [round(x, 2) for x in os.getloadavg()]}
    entry["sessions"].append(session)
    for number in session["rounds"]:
        for tool, (command, env) in commands.items():
            out = scratch / f"out-{number}"
            log = scratch / f"{tool.replace(' ', '_').replace('(', '').replace(')', '')}-{number}.log"
            run = {"round": number, "load_before": round(os.getloadavg()[0], 2), **measured(command(out), log, env)}
            if out.is_dir():
                run |= output_facts(out, source)
                shutil.rmtree(out)
            if tool.startswith("moe-compress"):
                run["phases"] = phases(log)
            shutil.copy(log, Path("/tmp") / f"peer-timing-{source.name}-{log.name}")  # kept for a look after the run
            entry["runs"].setdefault(tool, []).append(run)
            session["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
            entry["ours_over_peer"] = compared(entry["runs"])
            save(entry)
            print(f"timing {source.name} round {number} {tool}: " + json.dumps({k: v for k, v in run.items() if k not in ("phases", "kept_experts")}),
                  flush=True)
    return entry


def compared(runs: dict[str, list[dict]]) -> dict:
    """Ours / peer of wall, CPU and peak RSS, round by round (runs that failed left out), and their medians."""
    peer = {run["round"]: run for run in runs.get("llm-compressor", []) if "error" not in run}
    figures = {}
    for tool in (t for t in runs if t != "llm-compressor"):
        pairs = [(run, peer[run["round"]]) for run in runs[tool] if "error" not in run and run["round"] in peer]
        figures[tool] = {key: {"per_round": (ratios := [round(o[key] / p[key], 3) for o, p in pairs]),
                               "median": round(statistics.median(ratios), 3) if ratios else None}
                         for key in ("wall_s", "cpu_s", "peak_rss_bytes")}
    return figures


def same_choice(run: dict, peer: dict) -> str:
    """How many of the experts a run kept the peer's run of its round kept too, layer by layer ("-": not known)."""
    if run.get("tool") == "llm-compressor" or "kept_experts" not in run or "kept_experts" not in peer:
        return "-"
    common = [len(set(a) & set(b)) for a, b in zip(run["kept_experts"], peer["kept_experts"])]
    return f"{', '.join(map(str, common))} of {max(map(len, peer['kept_experts']))}"


def section(entries: dict) -> list[str]:
    """The markdown section of the checkpoint timings in peer_timing.json."""
    if not entries:
        return []
    gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
    lines = ["## REAP on a Qwen3-30B-A3B-shaped checkpoint, interleaved", "",
             "Command: `python bench/peers.py --timing ROUNDS --checkpoint DIR` (`bench/peer_checkpoint.py` says what each side runs). "
             "REAP at 25 %, layer-wise. llm-compressor: `from_pretrained` (bf16, as saved), `oneshot` with `REAPPruningModifier`, "
             "`save_pretrained`. moe-compress: `moe-compress prune DIR --method reap --ratio 0.25 --budget layer --streaming on "
             f"--calib bundled --samples N --seq-len L --seed 0 --batch-size {BATCH_SIZE} --threads {THREADS} --no-cache` with "
             "`--no-guard` (the same work as the peer: the ratio that counts) and without it (the command's default: the quality "
             "guard reads the input and the output once more over 32 held-out windows). The same tokens for both (the peer gets "
             f"the tensor our command line's calibration spec builds), batches of {BATCH_SIZE}, {THREADS} threads each. Each run a fresh process; wall from "
             "process start to exit; CPU = user + sys of the child; ratios ours / peer round by round, median.", ""]
    for name, data in entries.items():
        if "not_run" in data:  # recorded by hand: why a checkpoint was not timed
            lines += [f"### {name}", "", f"Not timed: {data['not_run']}", ""]
            continue
        config = data["config"]
        sessions = "; ".join(f"`{one['command']}` (rounds {', '.join(map(str, one['rounds']))}; load average, 1/5/15 min, "
                             f"{one['load_average_start']} at start, {one.get('load_average_end')} at end)" for one in data["sessions"])
        lines += [f"### {name}", "",
                  f"Checkpoint `{data['checkpoint']}`: {config.get('model_type')}, {config.get('num_hidden_layers')} decoder layers, "
                  f"{config.get('num_experts', config.get('num_local_experts'))} experts (top-{config.get('num_experts_per_tok')}), vocabulary "
                  f"{config.get('vocab_size')}, {gib(data['checkpoint_bytes'])} GiB of {config.get('dtype')} weights. Calibration "
                  f"{data['samples']} x {data['seq_len']} tokens (fingerprint {data['tokens_fingerprint']}). Machine: {data['machine']}. "
                  f"Runs: {sessions}.", "",
                  "| round | tool | wall s | CPU s (user + sys) | peak RSS GiB | output GiB | experts per layer | kept experts the peer kept too, per layer | load before |",
                  "|---|---|---:|---:|---:|---:|---|---|---:|"]
        peer = {run["round"]: run for run in data["runs"].get("llm-compressor", [])}
        for run in sorted((run | {"tool": tool} for tool, runs in data["runs"].items() for run in runs), key=lambda r: r["round"]):
            head = f"| {run['round']} | {run['tool']} | "
            if "error" in run:
                lines.append(head + f"{run['wall_s']} (exit {run['exit_code']}: {run['error'][:80]}) | {run['cpu_s']} | "
                             f"{gib(run['peak_rss_bytes'])} | - | - | - | {run['load_before']} |")
                continue
            lines.append(head + f"{run['wall_s']:.1f} | {run['cpu_s']:.1f} ({run['user_s']:.0f} + {run['sys_s']:.0f}) | "
                         f"{gib(run['peak_rss_bytes'])} | {gib(run['output_bytes'])} | "
                         f"{sorted(set(run['experts_per_layer']))} x {len(run['experts_per_layer'])} | "
                         f"{same_choice(run, peer.get(run['round'], {}))} | {run['load_before']} |")
        lines += ["", "| ours / peer | wall, per round | wall, median | CPU, median | peak RSS, median |", "|---|---|---:|---:|---:|"]
        quiet = {tool: [run for run in runs if run["load_before"] < QUIET_LOAD and peer.get(run["round"], {}).get("load_before", QUIET_LOAD) < QUIET_LOAD]
                 for tool, runs in data["runs"].items() if tool != "llm-compressor"}
        rows = [*data["ours_over_peer"].items(),
                *((f"{tool}, quiet rounds only (1-minute load average < {QUIET_LOAD:g} before both runs)", compared({"llm-compressor": list(peer.values()), tool: runs})[tool])
                  for tool, runs in quiet.items() if runs)]
        for tool, figures in rows:
            cell = lambda key: "-" if figures[key]["median"] is None else f"{figures[key]['median']:.2f}"  # noqa: E731
            lines.append(f"| {tool} | {', '.join(f'{x:.2f}' for x in figures['wall_s']['per_round'])} | **{cell('wall_s')}** | "
                         f"{cell('cpu_s')} | {cell('peak_rss_bytes')} |")
        lines += ["", *(f"* {note}" for note in data.get("notes", [])), ""]
    return lines
