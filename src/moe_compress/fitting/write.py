"""Writing what `fit` chose: the best candidate's stages run by `pipeline.run_stages` (or the original
unchanged), the fit report beside it, the search recorded in its prune plan, published atomically."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..errors import MoECompressError
from ..source.checkpoint import Checkpoint
from ..sink.model_card import write_model_card
from ..sink.save import publish, save_compressed
from ..sink.staging import discard_staging, staging_dir
from ..pipeline import run_stages
from ..plan import Plan
from .report import write_report

if TYPE_CHECKING:
    from .api import FitResult


def search_record(result: FitResult) -> dict:
    """The search, as the plan's `meta["fit"]` keeps it: the budget, what was measured, what was chosen."""
    best = result.best
    return {
        "budget": result.budget,
        "kv_cache_bytes": result.kv_bytes,
        "weight_budget": result.weight_budget,
        "chosen": best.name if best else None,
        # [kept, bits], and {wider bits: the experts at it, numbered as written} where a layer's experts differ, "block dropped" where its block went
        "allocation": {str(i): [c.keep, c.bits, *([{str(c.to): list(c.wider)}] if c.wider else []), *([c.label] if c.block else [])]
                       for i, c in best.allocation.items()} if best else {},
        "other_bits": best.other_bits if best else 16,
        "stages": [{s.kind: s.given()} for s in best.stages] if best else [],
        "candidates": [{"name": c.name, "bytes": c.bytes, "proxy": c.proxy, "kl": c.measured.get("kl")} for c in result.candidates],
    }


def record_in_plans(directory: Path, result: FitResult) -> None:
    for path in sorted((directory / "plans").glob("*.json")):
        plan = Plan.load(path)
        plan.meta["fit"] = search_record(result)
        plan.save(path)


def write_best(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, batches: list[torch.Tensor], out: Path, overwrite: bool,
               device: str, result: FitResult, source: str) -> Path:
    """Run the best candidate's stages on `model` (changed in place) into `out`, with the fit report; check it fits."""
    work = staging_dir(out, "fit")
    try:
        staged = work / "result"
        record = {"model": source, "fit": search_record(result), "stages": [{s.kind: s.given()} for s in result.best.stages]}
        run_stages(model, tokenizer, result.best.stages, batches, staged, True, device, {"ppl": False}, record)
        saved = Checkpoint(staged).total_bytes()
        if saved > result.weight_budget:
            raise MoECompressError(f"the written weights take {saved} bytes, over the budget's {result.weight_budget}: a bug in fit's size prediction.")
        result.best.measured["written_bytes"] = saved
        record_in_plans(staged, result)
        write_report(result, staged)
        write_model_card(staged)  # again: the card now shows the search (`text.fit_card`)
        publish(staged, out, overwrite)
    finally:
        discard_staging(work)
    return out


def write_unchanged(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, out: Path, overwrite: bool, result: FitResult,
                    groups=None) -> Path:
    """The original fits: saved as it is (`groups`: its layers as a streamed reader hands them out), with the report saying so."""
    work = staging_dir(out, "fit")
    try:
        staged = save_compressed(model, work / "result", tokenizer, overwrite=True, groups=groups)
        write_report(result, staged)
        write_model_card(staged)
        publish(staged, out, overwrite)
    finally:
        discard_staging(work)
    return out
