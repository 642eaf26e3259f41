"""Write the generated modelling files that let non-stock checkpoints load anywhere.

The files depend on torch and transformers only, so `from_pretrained(path,
trust_remote_code=True)` works in a process that has never heard of moe_compress.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import PreTrainedModel

from ..arch.catalog import auto_model_class

TEMPLATES = Path(__file__).parent / "templates"
RUNTIME_SOURCE = Path(__file__).parent.parent / "runtime.py"
CONFIG_MODULE = "configuration_moe_compress"
MODEL_MODULE = "modeling_moe_compress"
RUNTIME_MODULE = "moe_compress_runtime"


def _render(template: str, values: dict[str, str]) -> str:
    text = (TEMPLATES / template).read_text()
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    return text


def _stock_class_name(obj: object) -> str:
    """The transformers class behind `obj`, also when it was loaded through generated code."""
    return next(c.__name__ for c in type(obj).__mro__ if c.__module__.startswith("transformers."))


def _stock_model_type(model: PreTrainedModel) -> str:
    return next(c.model_type for c in type(model.config).__mro__ if c.__module__.startswith("transformers."))


def write_stock_identity(directory: Path, model: PreTrainedModel) -> None:
    """Make a saved config name its transformers family again.

    A model loaded through the generated code whose structure became uniform again (a later
    stage evened the expert counts) is saved as a plain stock checkpoint.
    """
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config["model_type"] = _stock_model_type(model)
    config["architectures"] = [_stock_class_name(model)]
    config.pop("auto_map", None)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_remote_code(directory: Path, model: PreTrainedModel) -> None:
    """Add the generated files to a saved checkpoint and point its config at them."""
    base_type = model.config.moe_compress["base_model_type"]
    values = {
        "BASE_MODEL_TYPE": base_type,
        "BASE_CONFIG_CLASS": _stock_class_name(model.config),
        "BASE_MODEL_CLASS": _stock_class_name(model),
    }
    (directory / f"{CONFIG_MODULE}.py").write_text(_render("configuration_moe_compress.py.tmpl", values))
    (directory / f"{MODEL_MODULE}.py").write_text(_render("modeling_moe_compress.py.tmpl", values))
    (directory / f"{RUNTIME_MODULE}.py").write_text(RUNTIME_SOURCE.read_text())
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config["model_type"] = f"moe_compress_{base_type}"
    config["architectures"] = ["MoECompressForCausalLM"]
    config["auto_map"] = {
        "AutoConfig": f"{CONFIG_MODULE}.MoECompressConfig",
        "AutoModelForCausalLM": f"{MODEL_MODULE}.MoECompressForCausalLM",
    }
    # A vision-language wrapper also loads through the Auto class its stock checkpoints use.
    config["auto_map"][auto_model_class(model.config).__name__] = f"{MODEL_MODULE}.MoECompressForCausalLM"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
