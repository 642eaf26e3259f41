"""Peak memory of the sequential observer as the model gets deeper.

For Mixtral-style models of 4, 8 and 16 layers (same width, random weights), each in a fresh
process: build the model, reset the kernel's peak-RSS counter (/proc/self/clear_refs), run
the observer collecting REAP statistics on the same calibration batches, and read the peak
(VmHWM). "working" = peak during observation minus resident memory before it: the memory
the observer needs beyond the loaded weights. It should stay flat as depth grows.

Each depth runs twice: with glibc's default allocator, whose adaptive mmap threshold lets
freed activation buffers fragment the heap (a few MiB per layer), and with that threshold
pinned (MALLOC_MMAP_THRESHOLD_=131072), which shows the observer's own footprint.

    python bench/observer_memory.py            # writes bench/results/observer_memory.{json,md}
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
LAYERS = (4, 8, 16)
SETUP = dict(hidden=512, intermediate=1024, experts=8, top_k=2, samples=64, seq_len=256, batch_size=8)

_CHILD = """
import json, os, sys, torch
os.environ["MOE_COMPRESS_QUIET"] = "1"
torch.set_num_threads(2)
from transformers import MixtralConfig, AutoModelForCausalLM
from moe_compress.arch import get_adapter
from moe_compress.walk import observe_expert_statistics

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

layers, s = int(sys.argv[1]), json.loads(sys.argv[2])
torch.manual_seed(0)
config = MixtralConfig(vocab_size=8192, hidden_size=s["hidden"], intermediate_size=s["intermediate"], num_hidden_layers=layers,
                       num_attention_heads=8, num_key_value_heads=4, num_local_experts=s["experts"], num_experts_per_tok=s["top_k"])
model = AutoModelForCausalLM.from_config(config).eval()
weights = sum(p.numel() * p.element_size() for p in model.parameters())
batches = list(torch.randint(0, 8192, (s["samples"], s["seq_len"])).split(s["batch_size"]))
activations = s["samples"] * s["seq_len"] * s["hidden"] * 4
before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
observe_expert_statistics(model, get_adapter(model), batches, ("reap_sum", "selected"))
peak = status("VmHWM")
print("RESULT" + json.dumps({"layers": layers, "weights_bytes": weights, "activation_copy_bytes": activations,
                             "rss_before_bytes": before, "peak_rss_bytes": peak, "working_bytes": peak - before}))
"""


def main() -> None:
    rows = []
    for allocator, extra_env in (("glibc default", {}), ("mmap threshold pinned", {"MALLOC_MMAP_THRESHOLD_": "131072"})):
        for layers in LAYERS:
            env = {**os.environ, **extra_env}
            out = subprocess.run([sys.executable, "-c", _CHILD, str(layers), json.dumps(SETUP)], capture_output=True, text=True, check=True, env=env)
            rows.append({"allocator": allocator, **json.loads(next(l for l in out.stdout.splitlines() if l.startswith("RESULT"))[6:])})
            print(rows[-1], flush=True)
    RESULTS.mkdir(exist_ok=True)
    command = "python bench/observer_memory.py"
    (RESULTS / "observer_memory.json").write_text(json.dumps({"command": command, "setup": SETUP, "rows": rows}, indent=2) + "\n")
    mib = lambda b: f"{b / 2**20:.0f}"
    lines = [
        "# Sequential observer: peak memory vs depth",
        "",
        f"Command: `{command}`. Mixtral-style, hidden {SETUP['hidden']}, {SETUP['experts']} experts (top-{SETUP['top_k']}), "
        f"{SETUP['samples']} x {SETUP['seq_len']} calibration tokens, float32, CPU. Statistics: REAP.",
        "",
        "| allocator | layers | weights (MiB) | RSS before (MiB) | peak while observing (MiB) | working = peak - before (MiB) | one activation copy (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['allocator']} | {r['layers']} | {mib(r['weights_bytes'])} | {mib(r['rss_before_bytes'])} | {mib(r['peak_rss_bytes'])} | {mib(r['working_bytes'])} | {mib(r['activation_copy_bytes'])} |")
    (RESULTS / "observer_memory.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
