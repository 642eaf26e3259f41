"""Writing what a streamed `fit` chose: the streamed prune, then the streamed quantize, through a staging directory.

The in-memory fit runs the best candidate's stages on the loaded model (`pipeline.run_stages`).
Streamed, each stage is its own command's library call on a checkpoint, reading one decoder layer
at a time: `stages.prune.prune` from the original into the staging directory, then
`slimming.quantize.quantize` from that into the result. The staging directory lies beside the
output (`sink.staging`), so the pruned intermediate costs disk there, never memory. The result is
then given what `run_stages` gives an output -- the plans under `plans/`, `report.json` and
`report.md` with a row per stage, the provenance of the original as its source -- and what
`fitting.write` adds (the search in the plans, the fit report, the card), so the streamed and the
in-memory fit write the same tensors, config and plans (`tests/test_fit_streamed.py`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..arch.size import checkpoint_bytes, model_size
from ..errors import MoECompressError
from ..sink.export import streamed_groups
from ..sink.model_card import provenance, write_model_card
from ..sink.save import publish
from ..sink.staging import discard_staging, staging_dir
from ..source.checkpoint import Checkpoint
from ..source.residency import StreamedWeights
from ..stages.drop import Drop
from ..stages.prune import Prune
from ..text.composition import stage_report_markdown
from .report import write_report
from .write import record_in_plans, search_record, write_unchanged

if TYPE_CHECKING:
    from .api import FitResult

#: What a quantize stage's row reports from its summary (`stages.quantize.Quantize.run`).
QUANTIZE_FACTS = ("method", "bits", "group_size", "scope", "quantized_params", "checkpoint_bytes")


def _size_row(size) -> dict:
    return {"params": size.total, "active_params": size.active_per_token, "bytes": size.bytes, "perplexity": {}}


def write_best_streamed(source: str | Path, batches: list[torch.Tensor], out: Path, overwrite: bool, device: str, result: FitResult,
                        cache_dir, trust_remote_code: bool) -> Path:
    """Run the best candidate's stages from the checkpoint `source`, streamed, into `out`, with the fit report; check it fits."""
    from ..arch.registry import get_adapter
    from ..slimming.quantize import quantize
    from ..source.load import load_streamed

    skeleton = load_streamed(source, "auto", trust_remote_code)[0].model
    size = model_size(skeleton, get_adapter(skeleton))
    rows, plans, current = [{"stage": "original", **_size_row(size)}], [], Path(source)
    work = staging_dir(out, "fit")
    try:
        stages = result.best.stages
        for position, stage in enumerate(stages, 1):
            start, target = time.perf_counter(), work / ("result" if position == len(stages) else f"stage-{position}")
            row = {"stage": f"{position}: {stage.kind}", "options": stage.given()}
            if isinstance(stage, Prune | Drop):
                pruned = (prune_streamed if isinstance(stage, Prune) else drop_streamed)(stage, current, batches, target, device, cache_dir, trust_remote_code)
                plans.append((f"{position:02d}-{stage.kind}", pruned.plan))
                summary = pruned.summary
                facts = {"params": summary["params_after"], "active_params": summary["active_params_after"], "bytes": summary["bytes_after"],
                         "perplexity": {}, "statistics_from_cache": summary["statistics_from_cache"]}
                (target / "moe_compress_summary.json").unlink()  # the in-memory composition saves the pruned model without one
            else:
                summary = quantize(current, target, **stage.settings(), overwrite=True, calib=batches, device=device,
                                   trust_remote_code=trust_remote_code, streaming=True).summary
                facts = {"params": size.total, "active_params": size.active_per_token, "bytes": summary["checkpoint_bytes"], "perplexity": {},
                         **{key: summary[key] for key in QUANTIZE_FACTS}, **({"expert_bits": summary["expert_bits"]} if "expert_bits" in summary else {})}
            rows.append({**row, "seconds": round(time.perf_counter() - start, 2), **facts})
            size = _Size(facts["params"], facts["active_params"], facts["bytes"])
            current = target
        staged = work / "result"
        _finish(staged, source, plans, rows, result)
        publish(staged, out, overwrite)
    finally:
        discard_staging(work)
    return out


class _Size:
    """The logical parameter counts a stage hands the next row (as `model_size` gives them)."""

    def __init__(self, total: int, active: int, stored: int):
        self.total, self.active_per_token, self.bytes = total, active, stored


def prune_streamed(stage: Prune, source: Path, batches, target: Path, device: str, cache_dir, trust_remote_code: bool):
    """`stage` as its command runs it on a checkpoint, streamed (its statistics from fit's cache when it was on)."""
    from ..stages.prune import prune

    return prune(str(source), **stage.settings(), calib=batches, out=target, overwrite=True, device=device, cache_dir=cache_dir,
                 streaming=True, trust_remote_code=trust_remote_code)


def drop_streamed(stage: Drop, source: Path, batches, target: Path, device: str, cache_dir, trust_remote_code: bool):
    """`stage` (fit's: the MoE sub-layers it names, nothing calibrated) as its command runs it on a checkpoint, streamed."""
    from ..stages.drop import drop

    return drop(str(source), **stage.settings(), calib=batches, out=target, overwrite=True, device=device, streaming=True,
                trust_remote_code=trust_remote_code)


def _finish(staged: Path, source: str | Path, plans: list, rows: list[dict], result: FitResult) -> None:
    """What `run_stages` and `fitting.write.write_best` add to the checkpoint the last stage wrote."""
    saved = Checkpoint(staged).total_bytes()
    if saved > result.weight_budget:
        raise MoECompressError(f"the written weights take {saved} bytes, over the budget's {result.weight_budget}: a bug in fit's size prediction.")
    result.best.measured["written_bytes"] = saved
    (staged / "plans").mkdir(exist_ok=True)
    for name, plan in plans:
        plan.save(staged / "plans" / f"{name}.json")
    record = {"model": str(source), "fit": search_record(result), "stages": [{s.kind: s.given()} for s in result.best.stages]}
    report = {"recipe": record, "rows": rows, "checkpoint_bytes": checkpoint_bytes(staged), "protocol": None}
    (staged / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (staged / "report.md").write_text(stage_report_markdown(report))
    record_in_plans(staged, result)
    write_report(result, staged)
    write_model_card(staged, provenance(str(source)))  # the original is the source: the intermediate steps lived in the staging directory


def write_unchanged_streamed(weights: StreamedWeights, adapter, tokenizer, out: Path, overwrite: bool, result: FitResult) -> Path:
    """The original fits: copied layer by layer as it is, with the report saying so."""
    return write_unchanged(weights.model, tokenizer, out, overwrite, result, groups=streamed_groups(weights, adapter, None))
