"""Load a model for compression, with clear errors for everything a user can get wrong.

A model is a local checkpoint directory, one of the bundled reference models (`ref-mixtral`,
`ref-deepseek`), or a Hugging Face Hub id (downloaded through transformers; offline, that
fails with a message that says so).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel
from transformers import PreTrainedTokenizerBase

from ..arch.registry import get_adapter
from ..errors import MoECompressError
from .export import record_origin
from .residency import StreamedWeights

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUNDLED_MODELS = ASSETS / "models"

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def bundled_models() -> list[str]:
    return sorted(p.name for p in BUNDLED_MODELS.iterdir() if (p / "config.json").is_file()) if BUNDLED_MODELS.is_dir() else []


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def resolve_model(name_or_path: str | Path) -> str:
    """A local directory for bundled names and existing paths; otherwise the Hub id itself."""
    path = Path(name_or_path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise MoECompressError(f"{path} is a directory but holds no config.json: it is not a model checkpoint.")
        return str(path)
    if path.exists():
        raise MoECompressError(f"{path} is a file; pass the checkpoint directory that contains config.json.")
    if str(name_or_path) in bundled_models():
        return str(BUNDLED_MODELS / str(name_or_path))
    looks_like_hub_id = str(name_or_path).count("/") == 1 and not str(name_or_path).startswith((".", "/"))
    if not looks_like_hub_id:
        raise MoECompressError(
            f"model {str(name_or_path)!r} not found: no such directory, and not a bundled model "
            f"({', '.join(bundled_models()) or 'none installed'}) or a Hub id like 'org/name'."
        )
    if _offline():
        raise MoECompressError(
            f"{name_or_path!r} looks like a Hugging Face Hub id, but HF_HUB_OFFLINE is set, so it cannot be downloaded. "
            "Download it first (e.g. `huggingface-cli download`) and pass the local directory."
        )
    return str(name_or_path)


def check_safetensors(directory: str | Path) -> None:
    """Open every safetensors shard's header; a truncated or corrupt file fails here, clearly."""
    for shard in sorted(Path(directory).glob("*.safetensors")):
        try:
            with safe_open(str(shard), framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError) as exc:
            raise MoECompressError(
                f"checkpoint file {shard} is corrupt or truncated ({exc}). Re-download or re-save the checkpoint."
            ) from None


def load_config(name_or_path: str | Path) -> tuple[str, PretrainedConfig]:
    source = resolve_model(name_or_path)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=True)
    except (OSError, ValueError, KeyError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MoECompressError(f"cannot read the config of {name_or_path}: {message}") from None
    get_adapter(config)
    return source, config


def load_model(
    name_or_path: str | Path, dtype: str = "auto", device: str = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Model (eval mode) and its tokenizer (None if the checkpoint has none)."""
    if dtype not in DTYPES:
        raise MoECompressError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}.")
    source, config = load_config(name_or_path)
    if Path(source).is_dir():
        check_safetensors(source)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, config=config, dtype=DTYPES[dtype], trust_remote_code=True)
    except (OSError, ValueError, RuntimeError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MoECompressError(f"cannot load model weights from {name_or_path}: {message}") from None
    if Path(source).is_dir():
        record_origin(model, source)
    return model.to(device).eval(), _load_tokenizer(source)


def _load_tokenizer(source: str) -> PreTrainedTokenizerBase | None:
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=True)
    except (OSError, ValueError, TypeError):
        return None


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


def load_streamed(name_or_path: str | Path, dtype: str = "auto") -> tuple[StreamedWeights, PreTrainedTokenizerBase | None]:
    """A model whose weights stay in its checkpoint until a stage needs one module of them.

    The skeleton is built on the meta device (parameters only: buffers such as rotary
    frequencies are computed as usual), so opening a 1 TB checkpoint costs its headers.
    """
    from accelerate import init_empty_weights

    from .checkpoint import Checkpoint

    if dtype not in DTYPES:
        raise MoECompressError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}.")
    source, config = load_config(name_or_path)
    if not Path(source).is_dir():
        raise MoECompressError(
            f"{name_or_path!r} is not a local checkpoint: streaming reads local safetensors shards. Download it first "
            "(e.g. `huggingface-cli download`) and pass the directory."
        )
    if getattr(config, "quantization_config", None):
        raise MoECompressError(f"{name_or_path} is a quantised checkpoint; streaming reads full-precision checkpoints only.")
    checkpoint = Checkpoint(source)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=_streamed_dtype(config, checkpoint, dtype), trust_remote_code=True)
    model.eval()
    return StreamedWeights(model, checkpoint), _load_tokenizer(source)
