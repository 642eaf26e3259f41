"""One registry from transformers `model_type` to its adapter."""

from __future__ import annotations

from transformers import PretrainedConfig, PreTrainedModel

from ..errors import MoECompressError
from .adapter import MoEAdapter
from .families import FAMILIES

ADAPTERS: dict[str, MoEAdapter] = {adapter.model_type: adapter for adapter in FAMILIES}


def supported_model_types() -> list[str]:
    return sorted(ADAPTERS)


def get_adapter(model_or_config: PreTrainedModel | PretrainedConfig) -> MoEAdapter:
    """The adapter for a model or config; a clear error for anything we do not support."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    # Checkpoints saved with extra structure carry the family they were built from.
    extra = getattr(config, "moe_compress", None)
    if isinstance(extra, dict) and extra.get("base_model_type"):
        model_type = extra["base_model_type"]
    elif isinstance(model_type, str) and model_type.startswith("moe_compress_"):  # generated code, uniform again
        model_type = model_type.removeprefix("moe_compress_")
    if model_type not in ADAPTERS:
        raise MoECompressError(
            f"model type {model_type!r} is not supported. Supported MoE model types: "
            f"{', '.join(supported_model_types())}. If this is a dense (non-MoE) model there are no experts to compress."
        )
    return ADAPTERS[model_type]
