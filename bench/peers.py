"""moe-compress against llm-compressor's REAP expert pruning, side by side (issue #14).

llm-compressor (vllm-project) ships `REAPPruningModifier` since 0.13. It pins transformers
<= 5.17 and compressed-tensors 0.19, so it cannot live in our environment: this script creates
its own virtual environment (`--venv`, default ~/.cache/moe_compress/venvs/llmcompressor-0.14.0.1)
with llmcompressor==0.14.0.1 and torch 2.13.0 (the CPU wheel, as ours), and runs it there in a
subprocess. Our side runs in a subprocess of our own environment too, so both tools are timed
and measured the same way: wall time from process start (loading included) to the saved
checkpoint, and the process's peak RSS.

Both get the same model and the same calibration tokens (bundled corpus, 32 x 256, seed 0,
saved to a .pt file), at 25 % and 50 % of routed experts removed, layer-wise (llm-compressor's
only budget). Every output is then loaded here (transformers 5.23) and measured like the
other benches: held-out perplexity per domain, KL divergence to the original's next-token
distribution and top-1 agreement on the same windows. Besides our REAP (same budget), the table
has REAP under a global budget, MoNE under a global budget (the best pruning method of
bench/pruning.py on ref-deepseek) and its best merging variant at 25 % (neuron-aligned HC-SMoE,
global budget).

    python bench/peers.py --model ref-mixtral --model ref-deepseek   # -> bench/results/peers_<model>.json, peers.md
    python bench/peers.py --model ref-mixtral --timing 3             # both REAPs in turn, 3 pairs -> peer_timing.json
    python bench/peers.py --timing 3 --checkpoint DIR                # the same on a checkpoint directory, ours streamed
                                                                     # (32 x 512 tokens; bench/peer_checkpoint.py)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch
from common import RESULTS, Bench, EvalSettings, Variant, fidelity_columns, markdown_table, mean_ppl, overview_plot
from peer_checkpoint import section as checkpoint_section, time_checkpoint

from transformers import AutoTokenizer

from moe_compress import get_adapter, model_size
from moe_compress.data import CalibrationSpec, calibration_batches
from moe_compress.source.load import resolve_model

PEER = "llmcompressor==0.14.0.1"
PEER_TORCH = "torch==2.13.0"  # llm-compressor allows torch 2.10-2.14; the CPU wheel, as ours
DEFAULT_VENV = Path.home() / ".cache" / "moe_compress" / "venvs" / "llmcompressor-0.14.0.1"
RATIOS = (0.25, 0.5)
SETTINGS = EvalSettings(mc=False)
OURS = {  # label -> (method, budget, options)
    "moe-compress reap": ("reap", "layer", {}),
    "moe-compress reap (global)": ("reap", "global", {}),
    "moe-compress hc-smoe-aligned (global)": ("hc-smoe", "global", {"align": "activations+weights"}),
    "moe-compress mone (global)": ("mone", "global", {}),
}

# Each runner prints one line "RESULT{json}" with its wall time and peak RSS (Linux: KiB).
_REPORT = """
import json, resource, time
def report(**facts):
    facts["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    facts["seconds"] = round(time.perf_counter() - START, 2)
    print("RESULT" + json.dumps(facts), flush=True)
"""

PEER_RUNNER = "import time\nSTART = time.perf_counter()\n" + _REPORT + textwrap.dedent(
    """
    import sys, torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning.reap import REAPPruningModifier

    model_dir, tokens_file, ratio, out = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
    # optional: the weights' dtype ("auto": as saved) and the calibration batch size (oneshot's default, 1)
    dtype = sys.argv[5] if len(sys.argv) > 5 else "float32"
    batch_size = int(sys.argv[6]) if len(sys.argv) > 6 else 1
    tokens = torch.load(tokens_file)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype if dtype == "auto" else getattr(torch, dtype))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = Dataset.from_dict({"input_ids": tokens.tolist(), "attention_mask": torch.ones_like(tokens).tolist()})
    oneshot(model=model, tokenizer=tokenizer, dataset=data, recipe=REAPPruningModifier(sparsity=ratio),
            num_calibration_samples=tokens.shape[0], max_seq_length=tokens.shape[1], moe_calibrate_all_experts=False,
            batch_size=batch_size)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    report(tool="llm-compressor", version=__import__("llmcompressor").__version__)
    """
)

OURS_RUNNER = "import time\nSTART = time.perf_counter()\n" + _REPORT + textwrap.dedent(
    """
    import json, sys, torch
    import moe_compress as mc

    model_dir, tokens_file, ratio, out, method, budget, options = sys.argv[1:8]
    tokens = torch.load(tokens_file)
    batches = list(tokens.split(8))
    mc.compress(model_dir, method=method, ratio=float(ratio), budget=budget, calib=batches, out=out, cache_dir=False,
                options=json.loads(options))
    report(tool="moe-compress", version=mc.__version__)
    """
)


def ensure_venv(venv: Path) -> Path:
    """The peer's virtual environment, created on first use; returns its python."""
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"creating {venv} with {PEER} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", PEER_TORCH, PEER], check=True)
    return python


def _run(command: list[str], log: Path, ours: bool) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "MOE_COMPRESS_QUIET": "1"}
    if not ours:
        env.pop("PYTHONPATH", None)  # the peer's environment sees nothing of ours
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    log.write_text(done.stdout + "\n" + done.stderr)
    if done.returncode != 0:
        return {"error": f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ''}",
                "seconds": round(time.perf_counter() - started, 2)}
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT"))
    return json.loads(line.removeprefix("RESULT"))


#: Mixtral's per-expert checkpoint names (transformers' conversion merges experts.*.w1/w3/w2 into
#: the fused tensors); llm-compressor 0.14 writes its linearised experts as gate/up/down_proj.
_MIXTRAL_EXPERT_NAMES = {".gate_proj.": ".w1.", ".up_proj.": ".w3.", ".down_proj.": ".w2."}


def load_strictly(directory: Path):
    """(model, problems): the checkpoint through plain `from_pretrained`, and every key it could not place.

    A non-uniform output (a global budget) carries the modelling code moe-compress generated for
    it (`auto_map`); transformers runs it only with `trust_remote_code=True`, as its users would.
    """
    from transformers import AutoModelForCausalLM

    remote = "auto_map" in json.loads((directory / "config.json").read_text())
    try:
        model, info = AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True, trust_remote_code=remote)
    except (RuntimeError, ValueError) as exc:  # e.g. tensor shapes that contradict the config
        return None, [f"refused: {str(exc).strip().splitlines()[0][:200]}"]
    problems = [f"missing {k}" for k in info["missing_keys"]] + [f"unexpected {k}" for k in info["unexpected_keys"]]
    return model.eval(), problems


def repaired_copy(directory: Path) -> tuple[Path, str] | None:
    """A copy of a checkpoint with the repairs we know applied, and what they were; None if none applies.

    * Mixtral experts saved under the linearised names (gate/up/down_proj) get Mixtral's own keys.
    * A config that still states the original expert count while the router has fewer rows (the
      peer prunes DeepSeek-V3's experts, router rows and correction bias but leaves
      `n_routed_experts`) gets the router's count.
    """
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    config = json.loads((directory / "config.json").read_text())
    fixed = directory.with_name(directory.name + "-repaired")
    shutil.copytree(directory, fixed, dirs_exist_ok=True)
    repairs = []
    if config.get("model_type") == "mixtral":
        for shard in fixed.glob("*.safetensors"):
            tensors = load_file(str(shard))
            save_file({_mixtral_name(key): value for key, value in tensors.items()}, str(shard), metadata={"format": "pt"})
        index = fixed / "model.safetensors.index.json"
        if index.is_file():
            data = json.loads(index.read_text())
            data["weight_map"] = {_mixtral_name(k): v for k, v in data["weight_map"].items()}
            index.write_text(json.dumps(data))
        repairs.append("renaming experts.*.gate_proj/up_proj/down_proj to Mixtral's w1/w3/w2")
    count_key = next((k for k in ("n_routed_experts", "num_local_experts", "num_experts") if k in config), None)
    if count_key is not None:
        rows = set()
        for shard in fixed.glob("*.safetensors"):
            with safe_open(str(shard), "pt") as handle:
                rows |= {handle.get_slice(k).get_shape()[0] for k in handle.keys() if k.endswith("mlp.gate.weight")}
        if len(rows) == 1 and rows != {config[count_key]}:
            (count,) = rows
            repairs.append(f"setting {count_key} from {config[count_key]} to the router's {count} rows")
            config[count_key] = count
            (fixed / "config.json").write_text(json.dumps(config, indent=2))
    if not repairs:
        shutil.rmtree(fixed)
        return None
    return fixed, "; ".join(repairs)


def _mixtral_name(key: str) -> str:
    if ".experts." not in key:
        return key
    for old, new in _MIXTRAL_EXPERT_NAMES.items():
        key = key.replace(old, new)
    return key


def _measured(directory: Path, run: dict) -> Variant:
    """A variant whose 'compression' is loading the checkpoint a tool wrote (its own cost is in `run`).

    `loads` is strict: every checkpoint key placed, none missing. A peer checkpoint that does not
    load as written is measured after the repairs we know (`repaired_copy`), and
    says so, so its pruning decision can still be compared.
    """

    def build(_model, _tokenizer):
        model, problems = load_strictly(directory)
        facts = {"loads": not problems, "tool_seconds": run["seconds"], "tool_peak_rss": run["peak_rss_bytes"]}
        if problems:
            facts["load_problems"] = problems[:6] + ([f"... {len(problems) - 6} more"] if len(problems) > 6 else [])
            repaired = repaired_copy(directory)
            if repaired is None:
                raise RuntimeError(f"{directory.name} does not load: {problems[:3]}")
            model, still = load_strictly(repaired[0])
            if still:
                raise RuntimeError(f"{directory.name} does not load, even after {repaired[1]}: {still[:3]}")
            facts["measured_after"] = repaired[1]
        return {"model": model, **facts, "experts_per_layer": model_size(model, get_adapter(model)).experts_per_layer}

    return Variant(directory.name, build)


def _calibration_tokens(tokenizer) -> torch.Tensor:
    """The calibration both tools get: 32 x 256 tokens of the bundled corpus, seed 0."""
    return torch.cat(calibration_batches(tokenizer, CalibrationSpec("bundled", 32, 256, 0)))


class Runners:
    """Both tools' runner scripts and the calibration tokens in a scratch directory, and the
    command lines that run them on one model, shared by the quality table and the timing."""

    def __init__(self, scratch: Path, model_dir: str, tokens: torch.Tensor, peer_python: Path):
        self.scratch, self.model_dir, self.peer_python = scratch, model_dir, peer_python
        torch.save(tokens, scratch / "tokens.pt")
        (scratch / "peer.py").write_text(PEER_RUNNER)
        (scratch / "ours.py").write_text(OURS_RUNNER)

    def _common(self, ratio: float) -> list[str]:
        return [self.model_dir, str(self.scratch / "tokens.pt"), str(ratio)]

    def peer(self, ratio: float, out: Path) -> list[str]:
        return [str(self.peer_python), str(self.scratch / "peer.py"), *self._common(ratio), str(out)]

    def ours(self, ratio: float, out: Path, method: str, budget: str, options: dict) -> list[str]:
        return [sys.executable, str(self.scratch / "ours.py"), *self._common(ratio), str(out), method, budget, json.dumps(options)]


def run(model_name: str, venv: Path) -> None:
    bench = Bench(model_name, SETTINGS, RESULTS / f"peers_{model_name}.json")
    bench.run(Variant("original", lambda m, t: {}, {"family": "original"}))
    model_dir = str(resolve_model(model_name))
    peer_python = ensure_venv(venv)
    with tempfile.TemporaryDirectory(prefix="moec-peers-") as scratch:
        scratch = Path(scratch)
        runners = Runners(scratch, model_dir, _calibration_tokens(bench.tokenizer), peer_python)
        for ratio in RATIOS:
            jobs = {f"llm-compressor reap|{ratio}": lambda out, r=ratio: runners.peer(r, out)}
            for label, (method, budget, options) in OURS.items():
                jobs[f"{label}|{ratio}"] = lambda out, r=ratio, m=method, b=budget, o=options: runners.ours(r, out, m, b, o)
            for name, command in jobs.items():
                if name in bench.done:
                    continue
                out = scratch / "".join(c if c.isalnum() or c == "." else "_" for c in name)
                result = _run(command(out), scratch / f"{out.name}.log", ours=not name.startswith("llm-compressor"))
                tool, label = name.split("|")[0], name
                tags = {"family": tool, "tool": tool.split(" ")[0], "ratio": ratio, "plot_group": "peers"}
                if "error" in result:
                    bench.rows.append({"variant": label, **tags, "loads": False, "error": result["error"], "tool_seconds": result["seconds"]})
                    bench.save()
                    print(f"{label}: FAILED {result['error']}", flush=True)
                    continue
                variant = _measured(out, result)
                variant.name, variant.tags = label, tags
                try:
                    bench.run(variant)
                except RuntimeError as exc:
                    bench.rows.append({"variant": label, **tags, "loads": False, "error": str(exc)[:300], "tool_seconds": result["seconds"],
                                       "tool_peak_rss": result["peak_rss_bytes"]})
                    bench.save()


TIMING = RESULTS / "peer_timing.json"


def timing(model_name: str, venv: Path, pairs: int) -> None:
    """Wall time of both tools' REAP at 25 %, run in turn (peer, ours, peer, ours, ...) `pairs` times.

    One run each (the table) is at the mercy of a shared machine's drift; alternating the two and
    taking the ratio pair by pair cancels most of it. Each run is a whole process from start to
    saved checkpoint, as in the table.
    """
    peer_python = ensure_venv(venv)
    model_dir = str(resolve_model(model_name))
    runs: dict[str, list[float]] = {"llm-compressor": [], "moe-compress": []}
    with tempfile.TemporaryDirectory(prefix="moec-peer-timing-") as scratch:
        scratch = Path(scratch)
        runners = Runners(scratch, model_dir, _calibration_tokens(AutoTokenizer.from_pretrained(model_dir)), peer_python)
        commands = {"llm-compressor": lambda out: runners.peer(0.25, out),
                    "moe-compress": lambda out: runners.ours(0.25, out, "reap", "layer", {})}
        for index in range(pairs):
            for tool, command in commands.items():
                result = _run(command(scratch / f"{tool}-{index}"), scratch / f"{tool}-{index}.log", ours=tool == "moe-compress")
                if "error" in result:
                    raise RuntimeError(f"{tool}: {result['error']}")
                runs[tool].append(result["seconds"])
                print(f"timing {model_name} {tool} run {index + 1}: {result['seconds']:.1f} s", flush=True)
    ratios = [ours / peer for ours, peer in zip(runs["moe-compress"], runs["llm-compressor"])]
    recorded = json.loads(TIMING.read_text()) if TIMING.is_file() else {}
    recorded[model_name] = {"ratio": 0.25, "budget": "layer", "seconds": runs, "ours_over_peer": ratios,
                            "median_ours_over_peer": sorted(ratios)[len(ratios) // 2]}
    TIMING.write_text(json.dumps(recorded, indent=1) + "\n")


def timing_checkpoint(directory: Path, venv: Path, rounds: int, samples: int, seq_len: int, guarded: bool, append: bool) -> None:
    """Both REAPs on a checkpoint directory, interleaved (bench/peer_checkpoint.py); recorded under its name after every run."""
    peer_python = ensure_venv(venv)
    command_line = (f"python bench/peers.py --timing {rounds} --checkpoint {directory} --samples {samples} --seq-len {seq_len}"
                    + ("" if guarded else " --skip-guarded") + (" --append" if append else ""))

    def save(entry: dict) -> None:
        recorded = json.loads(TIMING.read_text()) if TIMING.is_file() else {}
        recorded[directory.name] = entry
        TIMING.write_text(json.dumps(recorded, indent=1) + "\n")

    previous = json.loads(TIMING.read_text()).get(directory.name) if append and TIMING.is_file() else None
    with tempfile.TemporaryDirectory(prefix="moec-peer-checkpoint-", dir=directory.parent) as scratch:
        time_checkpoint(directory.resolve(), rounds, samples, seq_len, peer_python, PEER_RUNNER, guarded, Path(scratch),
                        previous, save, command_line)


def report() -> None:
    lines = ["# moe-compress vs llm-compressor's REAP", "",
             f"Command: `python bench/peers.py --model ref-mixtral --model ref-deepseek` (the peer, {PEER}, runs in its own venv "
             "with transformers 5.17 and torch 2.13 CPU). Same model, same 32 x 256 calibration tokens. Time and peak RSS: the tool's "
             "whole process (load, calibrate, prune, save), one run each on a shared 2-core machine. Quality: test-split perplexity "
             f"({SETTINGS.ppl_windows} x {SETTINGS.seq_len} tokens per domain), KL(original || compressed) per token and top-1 agreement on the same windows (mean over "
             "domains). 'loads': the output loads with "
             "plain transformers 5.23 `from_pretrained`, every checkpoint key placed (non-uniform outputs of a global budget with "
             "`trust_remote_code=True`: they carry moe-compress's generated modelling code).", ""]
    for path in sorted(RESULTS.glob("peers_*.json")):
        data = json.loads(path.read_text())
        rows = [r for r in data["rows"] if r["variant"] != "original"]
        ok = [r for r in rows if "perplexity" in r]
        columns = [("tool / method", lambda r: r["variant"].split("|")[0]), ("ratio", lambda r: str(r["ratio"])),
                   ("loads", lambda r: "yes" if r.get("loads") else f"no (measured after {r['measured_after']})" if "measured_after" in r
                    else f"no ({r.get('error', '')[:60]})"),
                   ("params (M)", lambda r: f"{r['params'] / 1e6:.2f}" if "params" in r else "-"),
                   ("mean ppl", lambda r: f"{mean_ppl(r):.2f}" if "perplexity" in r else "-"), *fidelity_columns(),
                   ("wall s", lambda r: f"{r['tool_seconds']:.1f}"),
                   ("peak RSS (MiB)", lambda r: f"{r['tool_peak_rss'] / 2**20:.0f}" if "tool_peak_rss" in r else "-")]
        original = next(r for r in data["rows"] if r["variant"] == "original")
        lines += [f"## {data['model']}", "", f"Original: mean perplexity {mean_ppl(original):.2f}.", "",
                  markdown_table(sorted(rows, key=lambda r: (r["ratio"], mean_ppl(r) if "perplexity" in r else float("inf"))), columns)]
        for ratio in RATIOS:
            peer = [r for r in ok if r["ratio"] == ratio and r["tool"] == "llm-compressor"]
            ours = [r for r in ok if r["ratio"] == ratio and r["tool"] == "moe-compress"]
            if peer and ours:
                best = min(ours, key=mean_ppl)
                reap = next((r for r in ours if r["variant"].startswith("moe-compress reap|")), None)
                verdict = "beats" if mean_ppl(best) < mean_ppl(peer[0]) else "does not beat"
                line = (f"* {ratio:.0%}: our best ({best['variant'].split('|')[0]}, mean ppl {mean_ppl(best):.2f}) {verdict} "
                        f"llm-compressor's REAP ({mean_ppl(peer[0]):.2f})")
                if reap is not None:
                    line += (f"; our REAP took {reap['tool_seconds']:.1f} s and {reap['tool_peak_rss'] / 2**20:.0f} MiB against "
                             f"{peer[0]['tool_seconds']:.1f} s and {peer[0]['tool_peak_rss'] / 2**20:.0f} MiB")
                lines.append(line + ".")
        lines.append("")
    if TIMING.is_file():
        lines += ["## Wall time, interleaved", "",
                  "Command: `python bench/peers.py --model <name> --timing 3`: REAP at 25 %, layer-wise, both tools in turn (peer, ours, "
                  "peer, ours, ...), each a whole process from start to saved checkpoint; the ratio is taken pair by pair.", "",
                  "| model | llm-compressor s (runs) | moe-compress s (runs) | ours / peer, pair by pair | median ratio |", "|---|---|---|---|---|"]
        recorded = json.loads(TIMING.read_text())
        for model, data in recorded.items():
            if data.get("kind") == "checkpoint":
                continue
            lines.append(f"| {model} | {', '.join(f'{x:.1f}' for x in data['seconds']['llm-compressor'])} | "
                         f"{', '.join(f'{x:.1f}' for x in data['seconds']['moe-compress'])} | "
                         f"{', '.join(f'{x:.2f}' for x in data['ours_over_peer'])} | {data['median_ours_over_peer']:.2f} |")
        lines.append("")
        lines += checkpoint_section({name: data for name, data in recorded.items() if data.get("kind") == "checkpoint"})
    (RESULTS / "peers.md").write_text("\n".join(lines) + "\n")
    overview_plot(RESULTS / "quality_vs_size.png")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", default=[], help="bundled model name; repeatable")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="where the peer's virtual environment lives (created if missing)")
    parser.add_argument("--report", action="store_true", help="only rebuild the markdown and the plot")
    parser.add_argument("--timing", type=int, default=0, metavar="PAIRS",
                        help="instead of the quality table, time both tools' REAP in turn PAIRS times (peer, ours, ...)")
    parser.add_argument("--checkpoint", action="append", type=Path, default=[],
                        help="with --timing: a checkpoint directory to time both REAPs on (ours streamed); repeatable")
    parser.add_argument("--samples", type=int, default=32, help="with --checkpoint: calibration sequences")
    parser.add_argument("--seq-len", type=int, default=512, help="with --checkpoint: tokens per calibration sequence")
    parser.add_argument("--skip-guarded", action="store_true",
                        help="with --checkpoint: run ours only with --no-guard (not also with the quality guard on, its default)")
    parser.add_argument("--append", action="store_true",
                        help="with --checkpoint: add the rounds to those recorded for it (same tokens), instead of starting anew")
    args = parser.parse_args()
    if args.timing < 0:
        parser.error(f"--timing takes a number of pairs (1 or more, 0 for the quality table); got {args.timing}")
    if args.checkpoint and not args.timing:
        parser.error("--checkpoint is timed only: give --timing PAIRS too")
    for directory in args.checkpoint:
        if not (directory / "config.json").is_file():
            parser.error(f"--checkpoint {directory}: no config.json there; give a checkpoint directory")
    for name in args.model:
        timing(name, args.venv, args.timing) if args.timing else run(name, args.venv)
    for directory in args.checkpoint:
        timing_checkpoint(directory, args.venv, args.timing, args.samples, args.seq_len, not args.skip_guarded, args.append)
    report()
