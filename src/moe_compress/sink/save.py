"""Save compressed models atomically, as stock checkpoints whenever the structure allows.

Everything is written into a staging directory beside `out` and published by rename at the
end (`publish`: an existing output is moved aside, never deleted before its replacement is in
place), so a failure (disk full, interrupted run) never leaves a half-written checkpoint at
`out` and never loses the previous one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

from safetensors import SafetensorError
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..plan import Plan
from ..progress import step
from .export import Group, Transform, model_groups, write_groups
from .model_card import PLAN_FILE, SUMMARY_FILE, provenance, write_model_card
from .output_lock import releases_outputs
from .publish import check_output_dir, publish
from ..source.remote_code import write_remote_code, write_stock_identity
from .staging import discard_staging, staging_dir
from .substitution import substitution_output, write_substitution_config
from .write_error import write_error

#: Tokenizer-config keys that describe how this process loaded the tokenizer, not the tokenizer:
#: saved as they are, `local_files_only: true` would follow the checkpoint to its users.
_LOADING_KEYS = ("local_files_only", "is_local")

__all__ = ["PLAN_FILE", "SUMMARY_FILE", "check_output_dir", "needs_remote_code", "publish", "save_compressed", "save_with_summary", "staging_dir"]


def needs_remote_code(model: PreTrainedModel) -> bool:
    return bool(getattr(model.config, "moe_compress", None))


def _drop_loading_keys(path: Path) -> None:
    """Remove `_LOADING_KEYS` from a saved tokenizer config."""
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    if any(key in config for key in _LOADING_KEYS):
        path.write_text(json.dumps({k: v for k, v in config.items() if k not in _LOADING_KEYS}, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


#: Shards close at this size; a layer larger than that gets a shard of its own. Small shards
#: bound what waits in memory while a streamed save writes (see `sink.writer`).
DEFAULT_MAX_SHARD_BYTES = 2**30


def write_model(
    directory: Path, model: PreTrainedModel, groups: Iterable[Group], max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    transform: Transform | None = None,
) -> None:
    """Weights, config and generation config of `model` (weights from `groups`, each passed through
    `transform` in checkpoint names), as save_pretrained lays them out.

    The weights come first: a prune that plans each layer while it writes it (`engine.fused`) knows
    the output's structure, hence its config, only once the last group was produced."""
    directory.mkdir(parents=True, exist_ok=True)
    write_groups(directory, model, groups, max_shard_bytes, transform)
    model.config.dtype = str(model.dtype).removeprefix("torch.")
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(directory)
    if model.can_generate():
        model.generation_config.save_pretrained(directory)


@releases_outputs
def save_compressed(
    model: PreTrainedModel,
    out: str | Path,
    tokenizer: PreTrainedTokenizerBase | None = None,
    plan: Plan | Callable[[], Plan] | None = None,
    summary: dict | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    groups: Iterable[Group] | None = None,
    transform: Transform | None = None,
) -> Path:
    """Write `model` (and tokenizer, plan, summary) to `out`, with a model card (`sink.model_card`)
    saying what it is and how to load it; returns the directory.

    `model` is the compressed model in memory, or -- for a streamed run -- its skeleton on
    the meta device, with `groups` producing its tensors layer by layer. `transform` rewrites
    each group's checkpoint tensors on their way to disk (quantisation packs them there).
    `plan` may be a function that returns it once `groups` are consumed: a prune that plans each layer
    during the walk that writes it (`engine.fused`) has its plan -- and `model` its structure, `summary`
    its entries -- only then.
    """
    out = Path(out)
    check_output_dir(out, overwrite, [getattr(model, "name_or_path", None)])
    substitution = substitution_output(model, rewritten=transform is not None)
    work = staging_dir(out, "partial")
    staging = work / out.name
    try:
        with step(f"writing {out}"):
            write_model(staging, model, model_groups(model) if groups is None else groups, max_shard_bytes,
                        substitution[0] if substitution is not None else transform)
        if needs_remote_code(model):
            write_remote_code(staging, model)
        else:
            write_stock_identity(staging, model)
        if substitution is not None:
            write_substitution_config(staging, substitution[1])
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
            _drop_loading_keys(staging / "tokenizer_config.json")
        if callable(plan):
            plan = plan()
        if plan is not None:
            plan.save(staging / PLAN_FILE)
        if summary is not None:
            (staging / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str) + "\n")
        write_model_card(staging, provenance(getattr(model, "name_or_path", None) or None))
        publish(staging, out, overwrite)
    except (OSError, SafetensorError) as exc:
        raise write_error(out, exc) from None
    finally:
        discard_staging(work)
    return out


def save_with_summary(
    model: PreTrainedModel, out: str | Path | None, tokenizer: PreTrainedTokenizerBase | None, plan: Plan | Callable[[], Plan] | None,
    summary: dict, overwrite: bool, groups: Iterable[Group] | None = None,
) -> Path | None:
    """The common end of every compression call: save when `out` is given and add the checkpoint's size to `summary`."""
    if out is None:
        return None
    from ..arch.size import checkpoint_bytes

    output_dir = save_compressed(model, out, tokenizer, plan, summary, overwrite=overwrite, groups=groups)
    summary["checkpoint_bytes"] = checkpoint_bytes(output_dir)
    return output_dir
