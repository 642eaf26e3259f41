"""From a model or a config to its adapter: discovery plus the declared exceptions."""

from __future__ import annotations

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from ..errors import MoECompressError
from .adapter import MoEAdapter
from .catalog import base_model_type, standard_moe_model_types
from .discovery import discover, discover_from_config
from .families import OVERRIDES, REFUSED

_FROM_CONFIG: dict[tuple[str, str], MoEAdapter] = {}


def supported_model_types() -> list[str]:
    """Model types of the installed transformers that use its standard experts module and are not refused."""
    return sorted(t for t in standard_moe_model_types() if t not in REFUSED)


def refusal(model_type: str | None) -> str | None:
    """Why a model type cannot be compressed, or None when it can."""
    if model_type in REFUSED:
        return REFUSED[model_type]
    if model_type not in standard_moe_model_types():
        return "not an MoE model type with the transformers standard experts module"
    return None


def get_adapter(model_or_config: PreTrainedModel | PretrainedConfig) -> MoEAdapter:
    """The adapter for a model (real or on the meta device) or a config; a clear error for anything we refuse.

    From a config alone, the model's skeleton is built on the meta device once per config.
    """
    config = getattr(model_or_config, "config", model_or_config)
    model_type = base_model_type(config)
    reason = refusal(model_type)
    if reason is not None:
        dense = "" if model_type in REFUSED else " If this is a dense (non-MoE) model there are no experts to compress."
        raise MoECompressError(
            f"model type {model_type!r} is not supported: {reason}.{dense} `moe-compress families` lists the supported types."
        )
    overrides = OVERRIDES.get(model_type, ({}, ""))[0]
    if isinstance(model_or_config, nn.Module):
        return discover(model_or_config, model_type, config, overrides)
    key = (model_type, config.to_json_string(use_diff=False))
    if key not in _FROM_CONFIG:
        _FROM_CONFIG[key] = discover_from_config(config, model_type, overrides)
    return _FROM_CONFIG[key]
