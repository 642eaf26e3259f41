"""Save compressed models atomically, as stock checkpoints whenever the structure allows.

Everything is written into a temporary sibling directory and renamed into place at the end,
so a failure (disk full, interrupted run) never leaves a half-written checkpoint at `out`.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..errors import MoECompressError
from ..plan import Plan
from .export import Group, model_groups, write_groups
from .remote_code import write_remote_code, write_stock_identity

PLAN_FILE = "moe_compress_plan.json"
SUMMARY_FILE = "moe_compress_summary.json"


def needs_remote_code(model: PreTrainedModel) -> bool:
    return bool(getattr(model.config, "moe_compress", None))


def check_output_dir(out: str | Path, overwrite: bool) -> None:
    """Fail before any work is done if `out` would have to be clobbered without permission."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise MoECompressError(f"output {out} exists and is not an empty directory; choose another --out or pass --overwrite.")


def publish(staged: Path, out: Path) -> Path:
    """Move a finished directory into place, replacing `out` (callers checked permission first).

    Everything is written beside `out` first and only renamed at the end, so an interrupted run
    never leaves a half-written checkpoint under the name the user asked for.
    """
    if out.is_dir():
        shutil.rmtree(out)
    elif out.exists():
        out.unlink()
    out.parent.mkdir(parents=True, exist_ok=True)
    staged.rename(out)
    return out


#: Shards close at this size; a layer larger than that gets a shard of its own. Small shards
#: bound what waits in memory while a streamed save writes (see `io.writer`).
DEFAULT_MAX_SHARD_BYTES = 2**30


def write_model(directory: Path, model: PreTrainedModel, groups: Iterable[Group], max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """Config, generation config and weights of `model` (weights from `groups`), as save_pretrained lays them out."""
    model.config.dtype = str(model.dtype).removeprefix("torch.")
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(directory)
    if model.can_generate():
        model.generation_config.save_pretrained(directory)
    write_groups(directory, model, groups, max_shard_bytes)


def save_compressed(
    model: PreTrainedModel,
    out: str | Path,
    tokenizer: PreTrainedTokenizerBase | None = None,
    plan: Plan | None = None,
    summary: dict | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    groups: Iterable[Group] | None = None,
) -> Path:
    """Write `model` (and tokenizer, plan, summary) to `out`; returns the directory.

    `model` is the compressed model in memory, or -- for a streamed run -- its skeleton on
    the meta device, with `groups` producing its tensors layer by layer.
    """
    out = Path(out)
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        write_model(staging, model, model_groups(model) if groups is None else groups, max_shard_bytes)
        if needs_remote_code(model):
            write_remote_code(staging, model)
        else:
            write_stock_identity(staging, model)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if plan is not None:
            plan.save(staging / PLAN_FILE)
        if summary is not None:
            (staging / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str) + "\n")
        publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def save_with_summary(
    model: PreTrainedModel, out: str | Path | None, tokenizer: PreTrainedTokenizerBase | None, plan: Plan | None,
    summary: dict, overwrite: bool, groups: Iterable[Group] | None = None,
) -> Path | None:
    """The common end of every compression call: save when `out` is given and add the checkpoint's size to `summary`."""
    if out is None:
        return None
    from ..evaluate.size import checkpoint_bytes

    output_dir = save_compressed(model, out, tokenizer, plan, summary, overwrite=overwrite, groups=groups)
    summary["checkpoint_bytes"] = checkpoint_bytes(output_dir)
    return output_dir
