"""Start-up of the commands a new user runs first: wall time of the whole process, medians.

Each command runs once unmeasured (that call builds the kept `families` / `methods` tables, see
`moe_compress.remembered`), then ROUNDS times in turn with the others (A B C ... A B C ...), so
a drift of the machine's speed touches every command alike. Results: `results/startup.json` and
`results/startup.md`, with the command that produced them.

    python bench/startup.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
CLI = str(Path(sys.executable).with_name("moe-compress"))
#: name -> (arguments, the exit code expected, the target in seconds from issue 24)
COMMANDS = {
    "--help": (["--help"], 0, 1.0),
    "--version": (["--version"], 0, 1.0),
    "methods": (["methods"], 0, 1.0),
    "input error (missing model)": (["prune", "no-such-model-dir", "--out", "/tmp/never-written"], 2, 1.0),
    "families": (["families"], 0, 3.0),
    "inspect ref-mixtral": (["inspect", "ref-mixtral"], 0, 2.0),
}


def run(arguments: list[str], expected: int) -> float:
    start = time.perf_counter()
    done = subprocess.run([CLI, *arguments], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"})
    elapsed = time.perf_counter() - start
    if done.returncode != expected:
        raise SystemExit(f"{arguments}: exit {done.returncode}, expected {expected}\n{done.stderr[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    for arguments, expected, _ in COMMANDS.values():  # warm-up: builds the kept tables
        run(arguments, expected)
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.rounds):
        for name, (arguments, expected, _) in COMMANDS.items():
            times[name].append(run(arguments, expected))
    rows = {
        name: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "target_s": COMMANDS[name][2],
               "meets_target": statistics.median(t) <= COMMANDS[name][2], "runs": t}
        for name, t in times.items()
    }
    command = f"python bench/startup.py --rounds {args.rounds}"
    load = os.getloadavg()[0]
    report = {"command": command, "machine": f"{platform.machine()}, {os.cpu_count()} cores", "load_average_1min_at_end": load, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "startup.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [f"# Start-up (`{command}`)", "",
             f"Whole-process wall time, {args.rounds} interleaved rounds after one unmeasured call each; "
             f"{report['machine']}; 1-minute load average at the end: {load:.2f}.", "",
             "| command | median s | min s | max s | target s | meets |", "|---|---:|---:|---:|---:|---|"]
    for name, row in rows.items():
        lines.append(f"| `moe-compress {' '.join(COMMANDS[name][0])}` | {row['median_s']:.2f} | {row['min_s']:.2f} | {row['max_s']:.2f} | "
                     f"{row['target_s']:.1f} | {'yes' if row['meets_target'] else 'no'} |")
    (RESULTS / "startup.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
