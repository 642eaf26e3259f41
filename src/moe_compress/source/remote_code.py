"""Write the generated modelling files that let non-stock checkpoints load anywhere, and
recognise them again.

The files depend on torch and transformers only, so `from_pretrained(path,
trust_remote_code=True)` works in a process that has never heard of moe_compress.

Recognising our own files is what lets moe-compress reload its outputs without
`--trust-remote-code` while refusing everyone else's code. A checkpoint counts as ours only
when its `auto_map` names exactly our two classes and every `.py` file beside its config is
byte for byte what this installed moe-compress would write for the checkpoint's base model
type. A hash recorded in the checkpoint would not do: whoever edits the code can edit the hash.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import PreTrainedModel

from ..arch.catalog import MULTIMODAL_KEYS, auto_model_class, stock_classes
from ..runtime import is_substitution, standard_per_layer_config

TEMPLATES = Path(__file__).parent / "templates"
RUNTIME_SOURCE = Path(__file__).parent.parent / "runtime.py"
CONFIG_MODULE = "configuration_moe_compress"
MODEL_MODULE = "modeling_moe_compress"
RUNTIME_MODULE = "moe_compress_runtime"
#: The `auto_map` our checkpoints carry; a vision-language family adds its own Auto class (`own_auto_map`).
AUTO_MAP = {
    "AutoConfig": f"{CONFIG_MODULE}.MoECompressConfig",
    "AutoModelForCausalLM": f"{MODEL_MODULE}.MoECompressForCausalLM",
}


#: The class for checkpoints that store fused experts one weight per expert (`sink.per_expert`), and
#: the key of `config.moe_compress` that lists those tensors.
PER_EXPERT_CLASS = f"{MODEL_MODULE}.MoECompressPerExpertForCausalLM"
PER_EXPERT_KEY = "per_expert_tensors"
#: The class for checkpoints in the expert-substitution format (`sink.substitution`).
SUBSTITUTED_CLASS = f"{MODEL_MODULE}.MoECompressSubstitutedForCausalLM"
#: The key of `config.moe_compress` that gives each routed expert's bit width, when they differ
#: (`slimming.expert_bits`); its checkpoints' modelling file ends with `mixed_bits.py.tmpl`.
EXPERT_BITS_KEY = "expert_bits"


def own_auto_map(auto_class: str, per_expert: bool = False, substituted: bool = False) -> dict[str, str]:
    """Our `auto_map` for a family whose stock checkpoints load through `auto_class` (`per_expert`: fused experts
    stored per expert; `substituted`: the expert-substitution format)."""
    model_class = SUBSTITUTED_CLASS if substituted else PER_EXPERT_CLASS if per_expert else AUTO_MAP["AutoModelForCausalLM"]
    return {**AUTO_MAP, "AutoModelForCausalLM": model_class, auto_class: model_class}


def _per_expert(spec: object) -> bool:
    return isinstance(spec, dict) and bool(spec.get(PER_EXPERT_KEY))


def _mixed_bits(spec: object) -> bool:
    return isinstance(spec, dict) and bool(spec.get(EXPERT_BITS_KEY))
GENERATED_FILES = (f"{CONFIG_MODULE}.py", f"{MODEL_MODULE}.py", f"{RUNTIME_MODULE}.py")


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


def generated_files(base_type: str, config_class: str, model_class: str, mixed_bits: bool = False) -> dict[str, str]:
    """File name -> text of the generated modelling code for one base family (`mixed_bits`: the modelling
    file ends with the conversions that dequantise each routed expert by its own width)."""
    values = {"BASE_MODEL_TYPE": base_type, "BASE_CONFIG_CLASS": config_class, "BASE_MODEL_CLASS": model_class}
    values["MIXED_BITS"] = _render("mixed_bits.py.tmpl", values) if mixed_bits else ""
    return {
        f"{CONFIG_MODULE}.py": _render("configuration_moe_compress.py.tmpl", values),
        f"{MODEL_MODULE}.py": _render("modeling_moe_compress.py.tmpl", values),
        f"{RUNTIME_MODULE}.py": RUNTIME_SOURCE.read_text(),
    }


def expected_files(base_type: str, multimodal: bool = False, mixed_bits: bool = False) -> dict[str, str] | None:
    """What this moe-compress writes for a checkpoint of `base_type` (None: not a transformers language model).

    The class names come from transformers' own registry, never from the checkpoint; a
    multimodal checkpoint (one with a vision or audio config) is the image-text-to-text class.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    config_class = CONFIG_MAPPING_NAMES.get(base_type)
    classes = stock_classes(base_type, multimodal)
    if not isinstance(config_class, str) or classes is None:
        return None
    return generated_files(base_type, config_class, classes[1], mixed_bits)


def _multimodal(config: dict) -> bool:
    return any(config.get(key) is not None for key in MULTIMODAL_KEYS)


def is_own_remote_code(config: dict, python_files: dict[str, bytes]) -> bool:
    """Whether a checkpoint's code is exactly what this moe-compress generates.

    `config` is the parsed config.json; `python_files` maps every `.py` file name that sits
    beside it to its bytes. Nothing here imports or executes the checkpoint's files.
    """
    extra = config.get("moe_compress")
    base_type = extra.get("base_model_type") if isinstance(extra, dict) else None
    # the expert-substitution format keeps the family's model type: serving engines pick their model by it
    model_type = base_type if is_substitution(extra) else f"moe_compress_{base_type}"
    if not isinstance(base_type, str) or config.get("model_type") != model_type:
        return False
    classes = stock_classes(base_type, _multimodal(config))
    if classes is None or config.get("auto_map") != own_auto_map(classes[0], _per_expert(extra), is_substitution(extra)):
        return False
    expected = expected_files(base_type, _multimodal(config), _mixed_bits(extra))
    if expected is None or set(python_files) != set(expected):
        return False
    return all(python_files[name] == text.encode() for name, text in expected.items())


def write_stock_identity(directory: Path, model: PreTrainedModel) -> None:
    """Make a saved config name its transformers family again.

    A model loaded through the generated code whose structure became uniform again (a later
    stage evened the expert counts) is saved as a plain stock checkpoint; the copies of our
    generated files that `save_pretrained` made for it are removed, since nothing points to them.
    """
    for name in GENERATED_FILES:
        (directory / name).unlink(missing_ok=True)
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config["model_type"] = _stock_model_type(model)
    config["architectures"] = [_stock_class_name(model)]
    config.pop("auto_map", None)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_remote_code(directory: Path, model: PreTrainedModel) -> None:
    """Add the generated files to a saved checkpoint and point its config at them."""
    base_type = model.config.moe_compress["base_model_type"]
    files = generated_files(base_type, _stock_class_name(model.config), _stock_class_name(model), _mixed_bits(model.config.moe_compress))
    for name, text in files.items():
        (directory / name).write_text(text)
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    spec = model.config.moe_compress
    if is_substitution(spec):  # the family's identity, for engines that read the format (`sink.substitution`)
        config["model_type"], config["architectures"] = base_type, [_stock_class_name(model)]
    else:
        config["model_type"], config["architectures"] = f"moe_compress_{base_type}", ["MoECompressForCausalLM"]
    config["auto_map"] = own_auto_map(auto_model_class(model.config).__name__, _per_expert(spec), is_substitution(spec))
    _declare_per_layer_structure(config, config["moe_compress"])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _declare_per_layer_structure(config: dict, spec: dict) -> None:
    """State what transformers' standard `per_layer_config` can say of the structure (per-layer expert
    counts, dropped MoE sub-layers) in the text config, beside any overrides the family has itself.

    Loaders that read that schema (vLLM's heterogeneous loader, transformers' modelling once it
    reads it) see the real shapes; keys are zero-padded as transformers writes them. A family whose
    config class validates its own per-layer overrides may refuse ours (Dots3 requires every layer
    of one attention type to share its overrides): then nothing is declared, the spec says so
    (`standard_per_layer_config: false`), and `config.moe_compress` alone describes the structure.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    stated = standard_per_layer_config(spec)
    if not stated:
        return
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    before = text.get("per_layer_config")
    overrides = {int(index): dict(values) for index, values in (before or {}).items()}
    for index, values in stated.items():
        overrides.setdefault(index, {}).update(values)
    digits = len(str(max(overrides)))
    text["per_layer_config"] = {str(index).zfill(digits): overrides[index] for index in sorted(overrides)}
    try:  # the family's own config class must accept it, as transformers will read it
        CONFIG_MAPPING[spec["base_model_type"]](**{k: v for k, v in config.items() if k not in ("model_type", "auto_map", "architectures")})
    except Exception:  # noqa: BLE001 -- any refusal of the class's own validation
        if before is None:
            del text["per_layer_config"]
        else:
            text["per_layer_config"] = before
        spec["standard_per_layer_config"] = False


def bind_model_classes(config, source: str) -> None:
    """Point transformers' Auto classes at the model classes of `source`'s own code, for `config`'s class.

    transformers keys a checkpoint's generated code by the bytes of each file: checkpoints whose
    configuration files are the same share one config class, while their modelling files (mixed
    bits or not, per-expert or substituted classes) may differ. Once one of them is loaded, the
    Auto classes map that shared config class to its model class and build every later one with
    it, never reading the later checkpoint's modelling file (a mixed-width checkpoint then fails to
    convert its weights). Registering this checkpoint's own classes before each load, for the
    config class it was read with, makes every load use its own code. A stock config class is left
    alone: transformers reads the checkpoint's model code for it each time, and registering would
    replace the stock model class for every checkpoint of that type in the process.
    """
    import transformers
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    if type(config).__module__.startswith("transformers."):
        return
    for auto_name, class_ref in (getattr(config, "auto_map", None) or {}).items():
        auto_class = getattr(transformers, auto_name, None)
        if auto_name == "AutoConfig" or auto_class is None or not hasattr(auto_class, "register"):
            continue
        auto_class.register(type(config), get_class_from_dynamic_module(class_ref, source), exist_ok=True)
