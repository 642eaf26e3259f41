"""How long the family battery takes: every supported model type through every case, then one fresh-process reload.

The CI budget for the default suite is 15 minutes on a 2-core machine, of which the battery
(`tests/test_families.py`) may take about six. This runs the same code as the test fixture
and records the time per model type, the reload and the total, with the machine's load
average (the machine is shared: compare runs made under similar load).

    PYTHONPATH=src python bench/families_battery.py      # writes bench/results/families_battery.{json,md}
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MOE_COMPRESS_QUIET", "1")
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

import torch  # noqa: E402

from family_battery import run_battery  # noqa: E402
from helpers import load_in_fresh_process  # noqa: E402
from tiny_models import SUPPORTED  # noqa: E402

RESULTS = Path(__file__).parent / "results"
COMMAND = "PYTHONPATH=src python bench/families_battery.py"


def main() -> None:
    torch.set_num_threads(1)  # as the test fixture does
    load_before = os.getloadavg()
    root = Path(tempfile.mkdtemp(prefix="battery-"))
    start = time.perf_counter()
    results = {model_type: run_battery(model_type, root) for model_type in SUPPORTED}
    cases_done = time.perf_counter()
    jobs = [job for result in results.values() for job in result.jobs]
    reloads = load_in_fresh_process(jobs)
    end = time.perf_counter()
    failed = {t: [c for c, o in r.outcomes.items() if o != "ok"] for t, r in results.items()}
    report = {
        "command": COMMAND,
        "model_types": len(results),
        "checkpoints_reloaded": len(reloads),
        "cases_seconds": round(cases_done - start, 1),
        "reload_seconds": round(end - cases_done, 1),
        "total_seconds": round(end - start, 1),
        "cpu_count": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "per_type_seconds": {t: round(r.seconds, 2) for t, r in sorted(results.items(), key=lambda kv: -kv[1].seconds)},
        "failed_cases": {t: cases for t, cases in failed.items() if cases},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "families_battery.json").write_text(json.dumps(report, indent=2) + "\n")
    slowest = list(report["per_type_seconds"].items())[:10]
    lines = [
        "# Family battery time",
        "",
        f"Command: `{COMMAND}`. {report['model_types']} model types, {report['checkpoints_reloaded']} checkpoints reloaded "
        f"in one fresh process; {report['cpu_count']} CPUs, load average {report['load_average_before'][0]} before and "
        f"{report['load_average_after'][0]} after (a shared machine: other jobs ran beside this one).",
        "",
        "| part | seconds |",
        "|---|---|",
        f"| all cases, every type | {report['cases_seconds']} |",
        f"| fresh-process reload | {report['reload_seconds']} |",
        f"| total | {report['total_seconds']} |",
        "",
        "Slowest types: " + ", ".join(f"{t} {s} s" for t, s in slowest) + ".",
        "",
        f"Failed cases: {report['failed_cases'] or 'none'}.",
        "",
    ]
    (RESULTS / "families_battery.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
