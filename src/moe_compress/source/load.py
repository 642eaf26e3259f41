"""Load a model for compression, with clear errors for everything a user can get wrong.

A model is a local checkpoint directory, one of the bundled reference models (`ref-mixtral`,
`ref-deepseek`), or a Hugging Face Hub id (downloaded through transformers; offline, that
fails with a message that says so).

Safe by default: a checkpoint is data, not a program.
  * Code shipped inside it (an `auto_map` in config.json or tokenizer_config.json) runs only
    with `trust_remote_code=True` (`--trust-remote-code`). The check reads the JSON files
    before transformers sees the checkpoint, so refused code is never imported. The
    generated code of moe-compress's own outputs is recognised byte for byte
    (`remote_code.is_own_remote_code`) and loads without the flag.
  * Weights are read from safetensors only; pickle files (`pytorch_model.bin`) can execute
    code when unpickled and are refused. Shards named by an index must lie inside the
    checkpoint directory.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as transformers_logging

from ..arch.adapter import text_config
from ..arch.catalog import auto_model_class
from ..arch.registry import get_adapter
from ..errors import MoECompressError, param, warn
from ..finite import require_finite_weights
from ..progress import progress_enabled
from .alignment import align_weights
from .checkpoint import Checkpoint
from .origin import record_origin
from .locate import ASSETS, BUNDLED_MODELS, bundled_models, offline, resolve_model  # noqa: F401 (re-exported)
from .remote_code import AUTO_MAP, bind_model_classes, expected_files, is_own_remote_code
from .residency import PreQuantized, StreamedWeights, shape_mismatch
from .sanity import check_dtypes, check_fp8_scales, check_loaded

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")
TRUST_HINT = "pass --trust-remote-code (Python: trust_remote_code=True) only if you trust its author"


def check_device(device: str | torch.device) -> torch.device:
    """The device, or a clear error when it does not exist on this machine."""
    try:
        chosen = torch.device(device)
    except (RuntimeError, ValueError):
        raise MoECompressError(f"{param('device')} {device!r} is not a device; use cpu, cuda or cuda:N.") from None
    if chosen.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise MoECompressError(f"{param('device')} {device} asked for a GPU, but this machine has no usable CUDA GPU; use {param('device')} cpu.")
        if chosen.index is not None and chosen.index >= count:
            raise MoECompressError(f"{param('device')} {device}: this machine has {count} CUDA GPU(s) (cuda:0..cuda:{count - 1}).")
    elif chosen.type == "mps" and not torch.backends.mps.is_available():
        raise MoECompressError(f"{param('device')} {device}: MPS is not available on this machine; use {param('device')} cpu.")
    elif chosen.type not in ("cpu", "cuda", "mps"):
        raise MoECompressError(f"{param('device')} {device}: moe-compress runs on cpu, cuda or mps.")
    return chosen


# ---- files of a checkpoint, read as data ---------------------------------------------------
def _checkpoint_file(source: str, name: str) -> Path | None:
    """A file of the checkpoint on local disk (downloaded first for a Hub id), or None if it has none."""
    if Path(source).is_dir():
        path = Path(source) / name
        return path if path.is_file() else None
    from transformers.utils import cached_file

    try:
        found = cached_file(source, name, _raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False)
    except OSError:
        return None
    return Path(found) if found else None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MoECompressError(f"{path} is corrupt: not valid JSON ({exc}). Re-download or re-save the checkpoint.") from None
    if not isinstance(data, dict):
        raise MoECompressError(f"{path} is corrupt: it must hold a JSON object.")
    return data


def _code_references(auto_map: object) -> list[str]:
    """Module references ('module.Class', 'repo--module.Class') of an `auto_map` value."""
    if not isinstance(auto_map, dict):
        return []
    refs = []
    for value in auto_map.values():
        refs += [v for v in (value if isinstance(value, list | tuple) else [value]) if isinstance(v, str)]
    return refs


def _python_files(source: str, config: dict) -> dict[str, bytes]:
    """The checkpoint's Python files: every `.py` beside a local config, or ours as served by the Hub."""
    if Path(source).is_dir():
        return {p.name: p.read_bytes() for p in Path(source).glob("*.py") if p.is_file()}
    extra = config.get("moe_compress")
    multimodal = any(config.get(key) is not None for key in ("vision_config", "audio_config"))
    expected = expected_files(extra.get("base_model_type", ""), multimodal) if isinstance(extra, dict) else None
    found = {name: _checkpoint_file(source, name) for name in expected or {}}
    return {name: path.read_bytes() for name, path in found.items() if path is not None}


def remote_code_allowed(source: str, trust_remote_code: bool = False, shown_as: str | None = None) -> bool:
    """Whether transformers may run the checkpoint's own code (`trust_remote_code` to pass on).

    No `auto_map`: False (stock classes only). Our own generated code: True. Anything else:
    True if the user trusts it, otherwise refused here, before any of it is imported.
    """
    shown_as = shown_as or source
    config_path = _checkpoint_file(source, "config.json")
    config = _read_json(config_path) if config_path else {}
    tokenizer_path = _checkpoint_file(source, "tokenizer_config.json")
    tokenizer_config = _read_json(tokenizer_path) if tokenizer_path else {}
    refs = _code_references(config.get("auto_map")) + _code_references(tokenizer_config.get("auto_map"))
    if not refs:
        return False
    if not _code_references(tokenizer_config.get("auto_map")) and is_own_remote_code(config, _python_files(source, config)):
        return True
    if trust_remote_code:
        return True
    modules = ", ".join(sorted({ref.rsplit(".", 1)[0] for ref in refs}))
    ours = AUTO_MAP.items() <= (config.get("auto_map") or {}).items()
    origin = " (it claims to be a moe-compress output, but its code differs from what this version writes)" if ours else ""
    raise MoECompressError(
        f"{shown_as} ships Python code that would run on loading (auto_map: {modules}){origin}; it was not run. "
        f"To allow it, {TRUST_HINT}."
    )


def check_weight_files(directory: str | Path, config: PretrainedConfig) -> Checkpoint:
    """Read every safetensors header through `Checkpoint`, which refuses pickle-only checkpoints and
    index entries outside the directory: a truncated or corrupt file fails here, clearly; so does
    an FP8 weight without its scale."""
    checkpoint = Checkpoint(directory)
    check_fp8_scales(checkpoint, _quantization_config(config) or {})
    return checkpoint


def _quantization_config(config: PretrainedConfig) -> dict | None:
    stored = getattr(config, "quantization_config", None)
    return (stored if isinstance(stored, dict) else stored.to_dict()) if stored else None


@contextmanager
def transformers_quiet() -> Iterator[None]:
    """transformers logs multi-line load reports as warnings; we turn what matters into our own
    errors. Its progress bars follow ours (off with MOE_COMPRESS_QUIET=1)."""
    before = transformers_logging.get_verbosity()
    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.set_verbosity_error()
    if not progress_enabled():
        transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(before)
        if bars:
            transformers_logging.enable_progress_bar()


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


# ---- loading -----------------------------------------------------------------------------
def _config(source: str, trusted: bool, shown_as: str) -> PretrainedConfig:
    try:
        with transformers_quiet():
            config = AutoConfig.from_pretrained(source, trust_remote_code=trusted)
            if trusted:
                bind_model_classes(config, source)
    except (OSError, ValueError, KeyError) as exc:
        raise MoECompressError(f"cannot read the config of {shown_as}: {_first_line(exc)}") from None
    _check_top_k(source, config, shown_as)
    return config


def _check_top_k(source: str, config: PretrainedConfig, shown_as: str) -> None:
    """Every budget and plan depends on top-k: a config that states none is refused now (by
    `MoEAdapter.top_k`), and one whose config.json leaves it to the config class's default
    -- what transformers then runs the model with -- says so."""
    adapter = get_adapter(config)
    top_k = adapter.top_k(config)
    path = _checkpoint_file(source, "config.json")
    stored = _read_json(path) if path else {}
    target = text_config(config)
    if target is not config:  # a multimodal wrapper: the MoE keys are in its text config
        stored = stored.get("text_config") if isinstance(stored.get("text_config"), dict) else {}
    aliases = type(target).attribute_map
    names = {adapter.top_k_key, aliases.get(adapter.top_k_key)} | {alias for alias, key in aliases.items() if key == adapter.top_k_key}
    if stored and not names & set(stored):
        warn(f"{shown_as}: config.json does not state top-k ({adapter.top_k_key!r}); using {type(target).__name__}'s default, "
             f"{top_k}, as transformers does. If the model routes each token to another number of experts, add it to config.json.")


def _open(name_or_path: str | Path, trust_remote_code: bool) -> tuple[str, bool, PretrainedConfig]:
    """(source, whether its code may run, config): the start every loader shares."""
    source = resolve_model(name_or_path)
    trusted = remote_code_allowed(source, trust_remote_code, str(name_or_path))
    return source, trusted, _config(source, trusted, str(name_or_path))


def load_config(name_or_path: str | Path, trust_remote_code: bool = False) -> tuple[str, PretrainedConfig]:
    """(resolved source, config) of a supported MoE model; code in the checkpoint runs only if trusted."""
    source, _, config = _open(name_or_path, trust_remote_code)
    return source, config


def _has_tokenizer_files(source: str) -> bool:
    return not Path(source).is_dir() or any((Path(source) / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(source: str, trusted: bool, shown_as: str) -> PreTrainedTokenizerBase | None:
    """The checkpoint's tokenizer; None when it ships none, an error when its files are broken."""
    if not _has_tokenizer_files(source):
        return None
    try:
        with transformers_quiet():
            return AutoTokenizer.from_pretrained(source, trust_remote_code=trusted)
    except Exception as exc:  # tokenizers raises bare Exceptions for corrupt files
        if not Path(source).is_dir() and isinstance(exc, OSError | ValueError | TypeError):
            return None  # a Hub repo without a tokenizer
        raise MoECompressError(
            f"the tokenizer of {shown_as} is corrupt or unreadable ({_first_line(exc)}). Re-download or re-save its tokenizer files."
        ) from None


def _check_loading_info(info: dict, shown_as: str) -> None:
    """Refuse weights that do not fit the config (transformers would initialise them randomly)."""
    mismatched = sorted(info.get("mismatched_keys") or [])
    if mismatched:
        key, saved, expected = mismatched[0]
        raise MoECompressError(
            f"{shown_as}: {len(mismatched)} weight(s) do not match the shapes its config.json describes, e.g. {key} is "
            f"{list(saved)} in the checkpoint but {list(expected)} in the model. The config and the weights belong to different models."
        )
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise MoECompressError(
            f"{shown_as}: {len(missing)} weight(s) the config needs are missing from the checkpoint, e.g. {missing[0]}. "
            "Re-download or re-save the checkpoint."
        )


def load_model(
    name_or_path: str | Path, dtype: str = "auto", device: str = "cpu", trust_remote_code: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Model (eval mode) and its tokenizer (None if the checkpoint has none)."""
    if dtype not in DTYPES:
        raise MoECompressError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}.")
    target = check_device(device)
    shown_as = str(name_or_path)
    source, trusted, config = _open(name_or_path, trust_remote_code)
    checkpoint = check_weight_files(source, config) if Path(source).is_dir() else None
    try:
        with transformers_quiet():
            model, info = auto_model_class(config).from_pretrained(
                source, config=config, dtype=DTYPES[dtype], trust_remote_code=trusted,
                use_safetensors=True, output_loading_info=True, ignore_mismatched_sizes=True,
            )
    except (OSError, ValueError, RuntimeError) as exc:
        message = _first_line(exc)
        if "above report" in message:  # transformers points at a log we silenced; say what it means
            message = "its weights could not be converted to this model's layout (the checkpoint does not match its config.json)"
        raise MoECompressError(f"cannot load model weights from {name_or_path}: {message}") from None
    _check_loading_info(info, shown_as)
    if checkpoint is None:  # a Hub id: transformers read it from its cache
        require_finite_weights(model, shown_as)
    else:
        check_loaded(model, checkpoint, shown_as, quantized=_quantization_config(config) is not None)
    if checkpoint is not None:
        record_origin(model, checkpoint)  # the headers check_weight_files read: not read again
    model = model.to(target).eval()
    align_weights(model)  # mapped from the file at its offsets: realigned as streaming realigns (source.alignment)
    return model, load_tokenizer(source, trusted, shown_as)


def meta_skeleton(auto_class, config: PretrainedConfig, dtype: torch.dtype, trust_remote_code: bool) -> PreTrainedModel:
    """The model with every parameter on the meta device: its structure, no weights.

    Built under `torch.device("meta")` so nothing is allocated (accelerate's
    `init_empty_weights` creates each parameter on the CPU first: 30 GB for one of
    DeepSeek-V3's fused expert tensors). Buffers that are computed rather than stored (rotary
    frequencies) are then rebuilt by transformers' own loading steps, as `from_pretrained`
    does; stored buffers stay on meta until their layer is read. What is still on meta is marked
    initialised first, so that transformers' weight initialisation computes only the buffers that are
    not stored: drawing random values into meta tensors does nothing but take time (0.27 s per
    skeleton of ref-deepseek, in torch's Python reference kernels, and it grows with the layers).
    """
    with torch.device("meta"):
        model = auto_class.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model._move_missing_keys_from_meta_to_device(set(), None, None, None)
    for stored in model.state_dict(keep_vars=True).values():
        if stored.device.type == "meta":  # initialising one is a no-op that takes time
            stored._is_hf_initialized = True
    model._initialize_missing_keys(False)
    return model.eval()


def _streamed_dtype(config: PretrainedConfig, checkpoint, dtype: str) -> torch.dtype:
    """The dtype a streamed model computes in: as asked, or (auto) the config's, else the checkpoint's."""
    if dtype != "auto":
        return DTYPES[dtype]
    configured = getattr(config, "dtype", None)
    if isinstance(configured, str):
        configured = getattr(torch, configured, None)
    if isinstance(configured, torch.dtype):
        return configured
    stored = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
    return next((stored[info.dtype] for info in checkpoint.tensors.values() if info.dtype in stored), torch.float32)


def load_streamed(name_or_path: str | Path, dtype: str = "auto", trust_remote_code: bool = False,
                  pin: bool = True) -> tuple[StreamedWeights, PreTrainedTokenizerBase | None]:
    """A model whose weights stay in its checkpoint until a stage needs one module of them.

    The skeleton is built on the meta device (parameters only: buffers such as rotary frequencies are computed as
    usual), so opening a 1 TB checkpoint costs its headers. `pin` fixes glibc's mmap threshold for the process, as a
    streamed run needs (it frees a layer per step: `source.allocator`); not where only the structure is read
    (`preflight.skeleton`), so that a run that then loads the model whole keeps glibc's own thresholds.
    """
    from .allocator import pin_mmap_threshold

    if pin:
        pin_mmap_threshold()
    if dtype not in DTYPES:
        raise MoECompressError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}.")
    shown_as = str(name_or_path)
    source, trusted, config = _open(name_or_path, trust_remote_code)
    if not Path(source).is_dir():
        raise MoECompressError(
            f"{name_or_path!r} is not a local checkpoint: streaming reads local safetensors shards. Download it first "
            "(e.g. `huggingface-cli download`) and pass the directory."
        )
    checkpoint = check_weight_files(source, config)
    quantization = _dequantizer(config, shown_as)
    model = meta_skeleton(auto_model_class(config), config, _streamed_dtype(config, checkpoint, dtype), trusted)
    weights = StreamedWeights(model, checkpoint, quantization)
    check_dtypes(model, checkpoint, weights.targets, weights.carried, quantized=quantization is not None)
    _check_expert_counts(weights)
    return weights, load_tokenizer(source, trusted, shown_as)


def _check_expert_counts(weights: StreamedWeights) -> None:
    """The experts the config describes must be the ones the weights hold: each router's stored
    size, from the shard headers, against the skeleton's. A whole load learns this from
    transformers' mismatched keys; a streamed one would otherwise learn it only when a layer is
    read, after `inspect` had printed the config's count and a run had calibrated earlier layers."""
    model = weights.model
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    state = model.state_dict(keep_vars=True)
    for index in adapter.moe_layer_indices(model):
        for name in weights.state_names(adapter.router(adapter.moe_block(layers[index]))):
            keys = weights.targets.get(name, [])
            stored = weights.checkpoint.tensors[keys[0]].shape if len(keys) == 1 else None
            if stored is not None and math.prod(stored) != state[name].numel():
                raise shape_mismatch(name, stored, tuple(state[name].shape))


#: Pre-quantised formats read by dequantising each layer as it is loaded (transformers' own ops).
DEQUANTISABLE = {"fp8": "FineGrainedFP8Config", "mxfp4": "Mxfp4Config"}


def _dequantizer(config: PretrainedConfig, shown_as: str) -> PreQuantized | None:
    """For a pre-quantised checkpoint: its quantisation config and a quantizer that dequantises on load.

    The skeleton is then built as the plain model (the config loses `quantization_config`);
    the quantizer's conversions turn each stored weight and its scales into the compute dtype
    when a layer is materialised, and the original config is kept for writing the output in
    the same format (see `sink.export.raw_groups`).
    """
    import transformers
    from transformers.quantizers import AutoHfQuantizer

    stored = _quantization_config(config)
    if not stored:
        return None
    method = stored.get("quant_method")
    if method not in DEQUANTISABLE:
        raise MoECompressError(
            f"{shown_as} is quantised with {method!r}; moe-compress reads full-precision checkpoints and "
            f"{', '.join(sorted(DEQUANTISABLE))} ones. Use the full-precision checkpoint."
        )
    config_class = getattr(transformers, DEQUANTISABLE[method])
    settings = {k: v for k, v in stored.items() if k in config_class.__init__.__code__.co_varnames and k != "dequantize"}
    quantizer = AutoHfQuantizer.from_config(config_class(**settings, dequantize=True), pre_quantized=True)
    del config.quantization_config
    return PreQuantized(stored, quantizer)
