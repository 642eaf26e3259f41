"""Write the format-1 fixtures beside this file with the writers that wrote format 1.

Each fixture is saved by `Plan.save` of the commit named in it, run from that commit's own
`plan.py` (with its `errors.py` and `finite.py`) in a temporary package, so the files are
exactly what those versions of moe-compress wrote. Run from the repository root:

    python tests/data/plans/make_format1.py

`tests/test_plan_formats.py` reads every fixture with the current reader.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent

#: fixture stem -> (commit whose writer saves it, the code that builds `plan` with that commit's API)
FIXTURES = {
    # the first format: kept experts and scores per layer
    "format1-44ad5a9-pruning": ("44ad5a9", """
plan = Plan("mixtral", 2, [LayerPlan(0, 4, [0, 2], [0.5, 0.125, 0.25, 0.0625]), LayerPlan(1, 4, [1, 2, 3], [0.1, 0.4, 0.3, 0.2])],
            method="reap", ratio=0.375, budget="global", meta={"renormalised": True})
"""),
    # layers gain `novices` (vectors saved beside the plan) and `clusters`
    "format1-ab3a65c-novices-clusters": ("ab3a65c", """
plan = Plan("mixtral", 2, [LayerPlan(0, 4, [0, 1], [4.0, 3.0, 2.0, 1.0], clusters=[0, 1, 0, 1]),
                           LayerPlan(1, 4, [3], [0.25, 0.5, 0.75, 1.0], novices=True)], method="mone", ratio=0.5, budget="layer")
plan.novice_vectors = {1: torch.arange(12, dtype=torch.float32).reshape(3, 4) / 8}
"""),
    # layers gain `condensed_weights` and `drop`; the plan `dropped_blocks` and `num_layers`
    "format1-cdeeace-condense-drop": ("cdeeace", """
plan = Plan("deepseek_v3", 2, [LayerPlan(1, 4, [0, 3], [0.01, 0.03, 0.02, 0.04], condensed_weights=[0.75, 0.25]),
                               LayerPlan(2, 4, [], drop=True)], method="cd-moe", num_layers=5, dropped_blocks=[4])
"""),
    # layers gain `merges`, `merge_weights` and `merge_router` (permutations saved beside the plan)
    "format1-e0f0d6c-merges": ("e0f0d6c", """
plan = Plan("mixtral", 2, [LayerPlan(0, 4, [0, 2], [0.4, 0.1, 0.3, 0.2], merges=[[0, 1], [2, 3]],
                                     merge_weights=[[0.75, 0.25], [0.5, 0.5]], merge_router="centroid")],
            method="ream", ratio=0.5, budget="layer", meta={"align": "weights"})
plan.merge_permutations = {0: torch.tensor([[1, 0, 2], [2, 0, 1]])}
"""),
    # the plan gains `identity`, with one `fingerprint` of one `fingerprint_kind` (merges not yet merged in)
    "format1-f3986c4-identity-fingerprint": ("f3986c4", """
identity = ModelIdentity(model_type="qwen2_moe", num_layers=2, experts_per_layer={0: 4, 1: 4}, top_k=2, hidden_size=8,
                         fingerprint="0123456789abcdef0123456789abcdef", fingerprint_kind="checkpoint", dtype="bfloat16")
plan = Plan("qwen2_moe", 2, [LayerPlan(0, 4, [1, 2, 3], [0.1, 0.2, 0.3, 0.4]), LayerPlan(1, 4, [0, 1, 3], [0.4, 0.3, 0.1, 0.2])],
            method="reap", ratio=0.25, budget="layer", identity=identity)
"""),
    # both: merge fields and the single-fingerprint identity
    "format1-145004d-merges-identity-fingerprint": ("145004d", """
identity = ModelIdentity(model_type="mixtral", num_layers=1, experts_per_layer={0: 4}, top_k=2, hidden_size=8,
                         fingerprint="fedcba9876543210fedcba9876543210", dtype="float32")
plan = Plan("mixtral", 2, [LayerPlan(0, 4, [0, 1], [0.4, 0.3, 0.2, 0.1], merges=[[0, 3], [1, 2]], merge_weights=[[2.0, 1.0], [1.0, 1.0]])],
            method="hc-smoe", ratio=0.5, budget="layer", identity=identity)
"""),
    # the identity records `fingerprints` by kind (the last format-1 writer)
    "format1-6f739ba-identity-fingerprints": ("6f739ba", """
identity = ModelIdentity(model_type="deepseek_v3", num_layers=3, experts_per_layer={1: 8, 2: 8}, top_k=2, hidden_size=16,
                         routing_groups=2, groups_per_token=1, fingerprints={"content": "aa" * 8, "checkpoint": "bb" * 16}, dtype="float32")
plan = Plan("deepseek_v3", 2, [LayerPlan(1, 8, [0, 1, 4, 5], [8.0, 7.0, 1.0, 2.0, 6.0, 5.0, 3.0, 4.0]), LayerPlan(2, 8, list(range(8)))],
            method="reap", ratio=0.25, budget="global", routing_groups=2, groups_per_token=1, min_per_group=2, identity=identity)
"""),
}


def write(stem: str, commit: str, build: str) -> None:
    with tempfile.TemporaryDirectory() as root:
        package = Path(root) / "moe_compress"
        package.mkdir()
        (package / "__init__.py").write_text("")
        for name in ("plan.py", "errors.py", "finite.py"):
            found = subprocess.run(["git", "show", f"{commit}:src/moe_compress/{name}"], capture_output=True, text=True)
            if found.returncode == 0:
                (package / name).write_text(found.stdout)
        code = f"import torch\nfrom moe_compress.plan import *\n{build}\nplan.save({str(HERE / (stem + '.json'))!r})\n"
        subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": root, "PATH": "/usr/bin:/bin"})


if __name__ == "__main__":
    for stem, (commit, build) in FIXTURES.items():
        write(stem, commit, build)
        print(stem)
