"""Calibration on a 30 MB single-line text file: time and peak memory, before and after incremental reading.

Before (commit 59004de): the whole file was read and tokenised, then 64 windows were picked.
After: documents are read and tokenised until 4x the requested tokens (and at least 1 MiB of
text) are in hand, each document cut to max(1 MiB, 8 chars x target tokens); see
`moe_compress/data/batches.py`.

Each measurement is a fresh process under `/usr/bin/time -v` (wall time, peak RSS) that builds
the batches with the ref-mixtral tokenizer, `CalibrationSpec(file, samples=64, seq_len=256)`.
Runs alternate before/after and repeat, since the machine is shared; the table reports
medians and the ratio. Usage:

    PYTHONPATH=src /work/main/.venv/bin/python bench/calibration_reading.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BEFORE = "59004de"
SIZE = 30 * 2**20

_RUN = """
import sys, time
sys.path.insert(0, {package!r})
from transformers import AutoTokenizer
from moe_compress.data.batches import CalibrationSpec, calibration_batches
tokenizer = AutoTokenizer.from_pretrained({tokenizer!r})
start = time.perf_counter()
batches = calibration_batches(tokenizer, CalibrationSpec({source!r}, samples=64, seq_len=256))
print("CALIBRATION_SECONDS", time.perf_counter() - start, sum(b.shape[0] for b in batches))
"""


def _old_package(root: Path) -> Path:
    """moe_compress as of BEFORE, extracted with git (only what calibration imports differs)."""
    target = root / "before"
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", BEFORE, "src/moe_compress"], capture_output=True, check=True).stdout
    target.mkdir()
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target / "src"


def _measure(package: Path, source: Path) -> dict:
    tokenizer = ROOT / "src/moe_compress/assets/models/ref-mixtral"
    code = _RUN.format(package=str(package), tokenizer=str(tokenizer), source=str(source))
    done = subprocess.run(
        ["/usr/bin/time", "-v", sys.executable, "-c", code], capture_output=True, text=True,
        env={"HF_HUB_OFFLINE": "1", "MOE_COMPRESS_QUIET": "1", "TOKENIZERS_PARALLELISM": "false", "PATH": "/usr/bin:/bin"},
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    seconds, windows = re.search(r"CALIBRATION_SECONDS (\S+) (\d+)", done.stdout).groups()
    rss_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)[1])
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", done.stderr)[1]
    minutes, _, secs = wall.rpartition(":")
    return {"calibration_s": float(seconds), "process_wall_s": float(minutes or 0) * 60 + float(secs),
            "peak_rss_mib": rss_kib / 1024, "windows": int(windows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        words = "the router sends every token to the experts that score highest on it while the rest stay idle "
        source = root / "one-line.txt"
        source.write_text((words * (SIZE // len(words) + 1))[:SIZE])
        packages = {"before": _old_package(root), "after": ROOT / "src"}
        runs: dict[str, list[dict]] = {"before": [], "after": []}
        for _ in range(args.repeats):
            for name, package in packages.items():
                runs[name].append(_measure(package, source))
                print(name, runs[name][-1], flush=True)
    median = {name: {k: statistics.median(r[k] for r in rows) for k in rows[0]} for name, rows in runs.items()}
    command = f"PYTHONPATH=src {Path(sys.executable).name} bench/calibration_reading.py --repeats {args.repeats}"
    report = {"command": command, "file_bytes": SIZE, "spec": "samples=64, seq_len=256, ref-mixtral tokenizer",
              "before_commit": BEFORE, "runs": runs, "median": median}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "calibration_reading.json").write_text(json.dumps(report, indent=2) + "\n")
    b, a = median["before"], median["after"]
    lines = [
        "# Calibration on a 30 MB single-line file", "",
        f"`{command}` -- medians of {args.repeats} interleaved runs, one fresh process each (`/usr/bin/time -v`).", "",
        "| | calibration s | process wall s | peak RSS MiB | windows |", "|---|---|---|---|---|",
        f"| before ({BEFORE}: whole file tokenised) | {b['calibration_s']:.2f} | {b['process_wall_s']:.2f} | {b['peak_rss_mib']:.0f} | {b['windows']:.0f} |",
        f"| after (incremental, capped) | {a['calibration_s']:.2f} | {a['process_wall_s']:.2f} | {a['peak_rss_mib']:.0f} | {a['windows']:.0f} |",
        f"| after / before | {a['calibration_s'] / b['calibration_s']:.4f} | {a['process_wall_s'] / b['process_wall_s']:.3f} | "
        f"{a['peak_rss_mib'] / b['peak_rss_mib']:.3f} | |", "",
    ]
    (RESULTS / "calibration_reading.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
