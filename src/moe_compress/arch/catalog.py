"""Which model types the installed transformers ships with its standard experts module.

The list is read from transformers itself (the modelling files that use the
`use_experts_implementation` decorator), so a new family that follows the common shapes shows
up here -- and is supported -- without a line of moe-compress code.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import PretrainedConfig
from transformers.models.auto import modeling_auto
from transformers.models.auto.configuration_auto import CONFIG_MAPPING, CONFIG_MAPPING_NAMES, model_type_to_module_name

from ..errors import MoECompressError
from .families import PROBE_CONFIG

DECORATOR = "@use_experts_implementation"
CAUSAL = modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
IMAGE_TEXT = modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
MULTIMODAL_KEYS = ("vision_config", "audio_config")


@lru_cache(maxsize=1)
def standard_moe_model_types() -> tuple[str, ...]:
    """Model types whose modelling code uses the standard experts module and that load as a language model."""
    models = Path(transformers.__file__).parent / "models"
    modules = {path.parent.name for path in models.glob("*/modeling_*.py") if DECORATOR in path.read_text()}
    return tuple(
        sorted(t for t in CONFIG_MAPPING_NAMES if model_type_to_module_name(t) in modules and (t in CAUSAL or t in IMAGE_TEXT))
    )


def base_model_type(config: PretrainedConfig) -> str | None:
    """The transformers family of a config; checkpoints saved with extra structure name theirs."""
    extra = getattr(config, "moe_compress", None)
    if isinstance(extra, dict) and extra.get("base_model_type"):
        return extra["base_model_type"]
    model_type = getattr(config, "model_type", None)
    if isinstance(model_type, str) and model_type.startswith("moe_compress_"):  # generated code, uniform again
        return model_type.removeprefix("moe_compress_")
    return model_type


def is_multimodal(config: PretrainedConfig) -> bool:
    return any(getattr(config, key, None) is not None for key in MULTIMODAL_KEYS)


def stock_classes(model_type: str | None, multimodal: bool) -> tuple[str, str] | None:
    """(Auto class, transformers class) that load a checkpoint of this family whole; None if none does.

    A multimodal checkpoint loads as image-text-to-text, so its vision tower is kept (and saved
    again); a text model as a causal LM.
    """
    if model_type in CAUSAL and not (multimodal and model_type in IMAGE_TEXT):
        return "AutoModelForCausalLM", CAUSAL[model_type]
    if model_type in IMAGE_TEXT:
        return "AutoModelForImageTextToText", IMAGE_TEXT[model_type]
    return None


def auto_model_class(config: PretrainedConfig) -> type:
    """The transformers Auto class that loads a checkpoint of this config whole (see `stock_classes`).

    Checkpoints with generated code register it for `AutoModelForCausalLM` (too).
    """
    model_type = getattr(config, "model_type", None)
    if getattr(config, "auto_map", None):
        _require_causal_lm_class(config)
        return transformers.AutoModelForCausalLM
    classes = stock_classes(model_type, is_multimodal(config))
    if classes is None:
        raise MoECompressError(f"model type {model_type!r} has no transformers class that runs it as a language model.")
    return getattr(transformers, classes[0])


def _require_causal_lm_class(config: PretrainedConfig) -> None:
    """AutoModelForCausalLM finds a model for a checkpoint's own config class only through the
    checkpoint's auto_map or transformers' registry; refuse now what it would refuse with a traceback."""
    if "AutoModelForCausalLM" in config.auto_map or type(config) in transformers.AutoModelForCausalLM._model_mapping:
        return
    model_type = getattr(config, "model_type", None)
    raise MoECompressError(
        f"model type {model_type!r}: the checkpoint's own config class {type(config).__name__} (its auto_map's AutoConfig) has no "
        "model class: its auto_map names none for AutoModelForCausalLM and transformers does not know the class. Add an "
        f"\"AutoModelForCausalLM\" entry to auto_map in config.json, or remove the \"AutoConfig\" entry to use transformers' own {model_type} classes."
    )


def build_skeleton(config: PretrainedConfig) -> nn.Module:
    """The model of `config` on the meta device: every module and shape, no weight memory.

    Always the stock transformers class of the family: a checkpoint's own code (ours or
    anyone's) is never imported to learn its structure.
    """
    model_type = base_model_type(config)
    classes = stock_classes(model_type, is_multimodal(config))
    if classes is None:
        raise MoECompressError(f"model type {model_type!r} has no transformers class that runs it as a language model.")
    with torch.device("meta"):
        if getattr(config, "auto_map", None) or model_type != getattr(config, "model_type", None):
            return getattr(transformers, classes[1])._from_config(config)
        return getattr(transformers, classes[0]).from_config(config)


def probe_config(model_type: str) -> PretrainedConfig:
    """The default config of a model type, completed where its defaults leave MoE fields unset."""
    values, _ = PROBE_CONFIG.get(model_type, ({}, ""))
    cls = CONFIG_MAPPING[model_type]
    sub = {k: v for k, v in values.items() if isinstance(v, dict) and k in (getattr(cls, "sub_configs", None) or {})}
    top = {k: v for k, v in values.items() if k not in sub}
    return cls(**top, **{name: cls.sub_configs[name](**kwargs) for name, kwargs in sub.items()})
