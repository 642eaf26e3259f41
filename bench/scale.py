"""Scale: compressing checkpoints far larger than memory, streamed layer by layer.

Synthetic checkpoints are built from real model configs -- Qwen3-30B-A3B (`qwen3_moe`, 128
experts of width 768, top-8) and Moonlight-16B-A3B (`deepseek_v3`, 64 routed experts of
width 1408 plus 2 shared, top-6, a dense first layer) -- with fewer decoder layers and a
32 k vocabulary (the real 152 k / 164 k embeddings alone would be 1.2 GB, more than the
smallest size wanted), bf16 random weights, written by the product's own shard writer in
the family's per-expert key layout, with the bundled tokenizer.

For each size, every command runs in a fresh process under `/usr/bin/time -v` (wall time and
peak RSS): `prune --method reap`, `slim --method wanda`, `quantize --bits 4` (round-to-nearest), streamed (`--streaming on`) and, up to `--in-memory-max-gb`, in memory
(`--streaming off`; larger ones would need ~2.4x the checkpoint in RAM on a shared 24 GB
machine). The headline run compresses a checkpoint about twice the memory it is allowed:
the command runs inside a cgroup (v1 memory controller, created by this script under
/sys/fs/cgroup/memory; the limit covers RSS and page cache, which the kernel reclaims) and the
limit, the checkpoint size and the peak are recorded. The observer's cost is measured on the
~4 GB checkpoint: process CPU time of calibration with REAP and with MoNE statistics over a
plain layer-streamed forward of the same tokens, interleaved and repeated.

    python bench/scale.py                                # all sizes of both families (about 1.5 h, ~35 GB of disk at peak)
    python bench/scale.py --family qwen3_moe --sizes 1,4 # a subset

Results: bench/results/scale.json and scale.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MOE_COMPRESS_QUIET", "1")

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parent.parent
TOKENIZER = REPO / "src" / "moe_compress" / "assets" / "tokenizer"
VOCAB = 32768

#: Real configs (values as published), with `num_hidden_layers` set per size.
FAMILIES = {
    "qwen3_moe": dict(  # Qwen/Qwen3-30B-A3B
        config_class="Qwen3MoeConfig",
        config=dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                    num_attention_heads=32, num_key_value_heads=4, head_dim=128, norm_topk_prob=True, decoder_sparse_step=1,
                    mlp_only_layers=[], rope_theta=1000000.0, max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=False),
        layers={1: 1, 2: 2, 4: 3, 8: 6, 16: 13},
    ),
    "deepseek_v3": dict(  # moonshotai/Moonlight-16B-A3B
        config_class="DeepseekV3Config",
        config=dict(hidden_size=2048, intermediate_size=11264, moe_intermediate_size=1408, n_routed_experts=64, n_shared_experts=2,
                    num_experts_per_tok=6, first_k_dense_replace=1, n_group=1, topk_group=1, routed_scaling_factor=2.446,
                    norm_topk_prob=True, num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=512, q_lora_rank=None,
                    qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, max_position_embeddings=8192, rms_norm_eps=1e-5,
                    tie_word_embeddings=False),
        layers={1: 2, 2: 3, 4: 4, 8: 8, 16: 15},
    ),
}
CALIBRATION = ["--calib", "bundled", "--samples", "16", "--seq-len", "256", "--batch-size", "4", "--threads", "2", "--no-cache"]


def build_checkpoint(directory: Path, family: str, layers: int) -> int:
    """Write a synthetic bf16 checkpoint of `family` with `layers` decoder layers; returns its weight bytes."""
    import transformers
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion

    from moe_compress.arch import get_adapter
    from moe_compress.source.residency import split_names
    from moe_compress.sink.writer import ShardWriter

    spec = FAMILIES[family]
    config = getattr(transformers, spec["config_class"])(vocab_size=VOCAB, num_hidden_layers=layers, dtype="bfloat16",
                                                         bos_token_id=0, eos_token_id=0, pad_token_id=0, **spec["config"])
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    directory.mkdir(parents=True)
    config.architectures = [type(model).__name__]
    config.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / name, directory / name)
    generator = torch.Generator().manual_seed(0)
    state = model.state_dict(keep_vars=True)
    stem, per_layer, head = split_names(model, get_adapter(model), state)
    writer = ShardWriter(directory, 2**31)
    for names in [stem, *per_layer.values(), head]:
        group = {}
        for key, meta in revert_weight_conversion(model, {n: state[n] for n in names}).items():
            if key.endswith("norm.weight") or "layernorm" in key:
                group[key] = torch.ones(meta.shape, dtype=meta.dtype)
            elif key.endswith("e_score_correction_bias"):
                group[key] = torch.zeros(meta.shape, dtype=torch.float32)
            else:
                group[key] = (torch.randn(meta.shape, generator=generator, dtype=torch.float32) * 0.02).to(meta.dtype)
        writer.add(group)
        del group
    writer.finish()
    return writer.total_bytes


def timed(command: list[str], cgroup: Path | None = None) -> dict:
    """Run `command` under /usr/bin/time -v (optionally inside `cgroup`); wall seconds, peak RSS, exit code."""
    wrapped = ["/usr/bin/time", "-v", *command]
    if cgroup is not None:
        wrapped = ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$@"', "sh", *wrapped]
    start = time.perf_counter()
    result = subprocess.run(wrapped, capture_output=True, text=True)
    wall = time.perf_counter() - start
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr)
    return {
        "wall_s": round(wall, 1),
        "peak_rss_bytes": int(rss.group(1)) * 1024 if rss else None,
        "exit_code": result.returncode,
        "error": None if result.returncode == 0 else _last_error(result.stderr),
    }


def _last_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("\t")]
    errors = [line for line in lines if "error" in line.lower() or "killed" in line.lower()]
    return (errors or lines or ["(no output)"])[-1][:300]


def make_cgroup(limit_bytes: int) -> Path:
    """A cgroup-v1 memory cgroup with `limit_bytes`, for the headline run (needs root and the memory controller)."""
    group = Path("/sys/fs/cgroup/memory") / f"moe-compress-bench-{os.getpid()}"
    group.mkdir()
    (group / "memory.limit_in_bytes").write_text(str(limit_bytes))
    swap = group / "memory.memsw.limit_in_bytes"
    if swap.exists():
        swap.write_text(str(limit_bytes))
    return group


def cgroup_peak(group: Path) -> int:
    return int((group / "memory.max_usage_in_bytes").read_text())


COMMANDS = ("prune", "slim", "quantize")


def commands(source: Path, out: Path, streaming: str) -> dict[str, list[str]]:
    cli = [sys.executable, "-m", "moe_compress.cli"]
    common = ["--out", str(out), "--overwrite", "--streaming", streaming]
    return {
        "prune reap": [*cli, "prune", str(source), "--method", "reap", "--ratio", "0.25", *CALIBRATION, *common],
        "slim wanda": [*cli, "slim", str(source), "--method", "wanda", "--sparsity", "0.5", *CALIBRATION[:-1], *common],
        "quantize rtn": [*cli, "quantize", str(source), "--bits", "4", "--threads", "2", *common],
    }


_COST_CHILD = """
import json, os, sys, time, torch
os.environ["MOE_COMPRESS_QUIET"] = "1"
torch.set_num_threads(2)
from moe_compress.arch import get_adapter
from moe_compress.data import CalibrationSpec, calibration_batches
from moe_compress.source.load import load_streamed
from moe_compress.walk import observe_expert_statistics, run_sequential

weights, tokenizer = load_streamed(sys.argv[1])
model, adapter = weights.model, get_adapter(weights.model)
batches = calibration_batches(tokenizer, CalibrationSpec(samples=16, seq_len=256, batch_size=4))
kind = sys.argv[2]
start = time.process_time()
if kind == "plain":
    run_sequential(model, adapter, batches, weights=weights)
else:
    names = {"reap": ("reap_sum", "selected"), "mone": ("gate_sum", "output_moments")}[kind]
    observe_expert_statistics(model, adapter, batches, names, weights=weights)
print("RESULT" + json.dumps({"cpu_s": time.process_time() - start}))
"""


def observer_cost(source: Path, repeats: int) -> dict:
    """CPU seconds of plain / REAP / MoNE passes, interleaved; ratios of medians and the median per-round ratio."""
    runs: dict[str, list[float]] = {"plain": [], "reap": [], "mone": []}
    for _ in range(repeats):
        for kind in runs:
            out = subprocess.run([sys.executable, "-c", _COST_CHILD, str(source), kind], capture_output=True, text=True, check=True)
            runs[kind].append(json.loads(next(l for l in out.stdout.splitlines() if l.startswith("RESULT"))[6:])["cpu_s"])
    ratios = {k: statistics.median(a / b for a, b in zip(runs[k], runs["plain"])) for k in ("reap", "mone")}
    return {"cpu_s": runs, "median_ratio_per_round": {k: round(v, 3) for k, v in ratios.items()}}


def layer_bytes(source: Path) -> int:
    """Bytes of the largest decoder layer in the checkpoint (the unit streaming holds)."""
    from moe_compress.source.checkpoint import Checkpoint

    checkpoint = Checkpoint(source)
    per_layer: dict[int, int] = {}
    for key in checkpoint.keys():
        found = re.search(r"layers\.(\d+)\.", key)
        if found:
            per_layer[int(found.group(1))] = per_layer.get(int(found.group(1)), 0) + checkpoint.nbytes(key)
    return max(per_layer.values())


def markdown(report: dict) -> str:
    gib = lambda b: f"{b / 2**30:.2f}" if b is not None else "-"  # noqa: E731
    lines = [
        "# Scale: streamed compression of checkpoints larger than memory",
        "",
        "Commands: " + "; ".join(f"`{c}`" for c in report["commands"]) + f". Machine: {report['machine']}. Calibration: 16 x 256 tokens (bundled), 2 threads, no cache.",
        "Synthetic bf16 checkpoints from real configs (fewer layers, 32 k vocabulary); see `bench/scale.py`.",
        "`target` = 2 x largest decoder layer + calibration activations + 1 GiB (the design's bound for streamed runs).",
        "",
        "| family | checkpoint GiB | layers | largest layer GiB | command | mode | wall s | peak RSS GiB | target GiB | within target |",
        "|---|---:|---:|---:|---|---|---:|---:|---:|---|",
    ]
    order = {name: i for i, name in enumerate(COMMANDS)}
    rows = sorted(report["rows"], key=lambda r: (r["family"], r["size_gb"], order[r["command"].split()[0]], r["mode"] != "streamed"))
    for row in rows:
        target = row["target_bytes"]
        ok = "-" if row["peak_rss_bytes"] is None or row["mode"] != "streamed" else ("yes" if row["peak_rss_bytes"] <= target else "NO")
        status = "" if row["exit_code"] == 0 else f" (exit {row['exit_code']}: {row['error']})"
        lines.append(
            f"| {row['family']} | {gib(row['checkpoint_bytes'])} | {row['layers']} | {gib(row['layer_bytes'])} | {row['command']} | "
            f"{row['mode']} | {row['wall_s']}{status} | {gib(row['peak_rss_bytes'])} | {gib(target)} | {ok} |"
        )
    if report.get("headline"):
        h = report["headline"]
        lines += ["", "## Headline: a checkpoint twice the memory it is allowed", "",
                  f"`{h['command']}` inside a cgroup limited to {gib(h['limit_bytes'])} GiB (RSS + page cache): checkpoint "
                  f"{gib(h['checkpoint_bytes'])} GiB, exit code {h['exit_code']}, wall {h['wall_s']} s, peak RSS {gib(h['peak_rss_bytes'])} GiB, "
                  f"cgroup peak (incl. page cache) {gib(h['cgroup_peak_bytes'])} GiB."]
    if report.get("observer_cost"):
        c = report["observer_cost"]
        lines += ["", "## Observer cost", "",
                  f"On the {c['checkpoint']} checkpoint, streamed, CPU seconds of calibration over a plain layer-streamed forward "
                  f"of the same 4096 tokens ({len(c['cpu_s']['plain'])} interleaved rounds, median of per-round ratios): "
                  f"REAP {c['median_ratio_per_round']['reap']}, MoNE {c['median_ratio_per_round']['mone']} (aim: <= 1.15).",
                  "", "| pass | CPU s per round |", "|---|---|"]
        lines += [f"| {k} | {', '.join(f'{v:.1f}' for v in vs)} |" for k, vs in c["cpu_s"].items()]
    if report.get("notes"):
        lines += ["", "## Notes", "", *[f"- {n}" for n in report["notes"]]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", action="append", choices=sorted(FAMILIES), help="default: both")
    parser.add_argument("--sizes", default="1,2,4,8,16", help="approximate checkpoint GB, comma-separated")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/moe-compress-scale"))
    parser.add_argument("--in-memory-max-gb", type=float, default=4.5, help="largest checkpoint also run in memory")
    parser.add_argument("--headline", default="qwen3_moe:8", help="family:size run inside a cgroup of half its size ('' to skip)")
    parser.add_argument("--cost-repeats", type=int, default=3)
    parser.add_argument("--commands", default=",".join(COMMANDS), help=f"which commands to time: {', '.join(COMMANDS)}")
    parser.add_argument("--append", action="store_true",
                        help="keep the rows already recorded in scale.json (rows measured again are replaced); for runs split in parts")
    args = parser.parse_args()
    families = args.family or sorted(FAMILIES)
    sizes = [int(s) for s in args.sizes.split(",")]
    chosen = args.commands.split(",")
    out_path = RESULTS / "scale.json"
    command_line = "python bench/scale.py " + " ".join(sys.argv[1:])
    report = {"commands": [], "machine": f"{os.cpu_count()} CPUs, "
              f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, no GPU", "rows": [], "notes": []}
    if args.append and out_path.is_file():
        report = {**report, **json.loads(out_path.read_text())}
    report["commands"] = [*report.get("commands", []), command_line]
    activation_bytes = 16 * 256 * 2048 * 2 * 2  # two generations of hidden states, bf16
    for family in families:
        for size in sizes:
            layers = FAMILIES[family]["layers"][size]
            source = args.workdir / f"{family}-{size}gb"
            shutil.rmtree(args.workdir, ignore_errors=True)
            total = build_checkpoint(source, family, layers)
            largest = layer_bytes(source)
            target = 2 * largest + activation_bytes + 2**30
            modes = ["streamed"] + (["in-memory"] if total / 1e9 <= args.in_memory_max_gb else [])
            for mode in modes:
                for name, command in commands(source, args.workdir / "out", "on" if mode == "streamed" else "off").items():
                    if name.split()[0] not in chosen:
                        continue
                    run = timed(command)
                    shutil.rmtree(args.workdir / "out", ignore_errors=True)
                    key = {"family": family, "size_gb": size, "command": name, "mode": mode}
                    report["rows"] = [row for row in report["rows"] if {k: row[k] for k in key} != key]
                    report["rows"].append({**key, "layers": layers, "checkpoint_bytes": total,
                                           "layer_bytes": largest, "target_bytes": target, **run})
                    print(json.dumps(report["rows"][-1]), flush=True)
            if f"{family}:{size}" == args.headline and "prune" in chosen:
                limit = total // 2
                group = make_cgroup(limit)
                try:
                    name, command = next(iter(commands(source, args.workdir / "out", "on").items()))
                    run = timed(command, group)
                    report["headline"] = {"command": " ".join(["moe-compress", *command[3:]]), "limit_bytes": limit,
                                          "checkpoint_bytes": total, "cgroup_peak_bytes": cgroup_peak(group), **run}
                finally:
                    shutil.rmtree(args.workdir / "out", ignore_errors=True)
                    group.rmdir()
            if size == 4 and family == families[0] and "prune" in chosen and not (args.append and report.get("observer_cost")):
                report["observer_cost"] = {"checkpoint": f"{family} {total / 2**30:.1f} GiB", **observer_cost(source, args.cost_repeats)}
            RESULTS.mkdir(exist_ok=True)
            out_path.write_text(json.dumps(report, indent=2) + "\n")
            (RESULTS / "scale.md").write_text(markdown(report))
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
