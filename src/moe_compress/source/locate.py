"""Where a model named on the command line is: a directory, a bundled reference model or a Hub id.

Imports nothing heavy, so a mistyped model name is answered before torch or transformers load
(the CLI checks it first).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import MoECompressError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUNDLED_MODELS = ASSETS / "models"


def bundled_models() -> list[str]:
    return sorted(p.name for p in BUNDLED_MODELS.iterdir() if (p / "config.json").is_file()) if BUNDLED_MODELS.is_dir() else []


def offline() -> bool:
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
    text = str(name_or_path)
    # 'org/name' is a Hub id; 'slim24/' (a trailing slash) or 'runs/x' (where runs/ exists) is a path that is missing.
    looks_like_hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~")) and not text.endswith("/") and not Path(text.split("/")[0]).is_dir()
    if not looks_like_hub_id:
        raise MoECompressError(
            f"model {str(name_or_path)!r} not found: no such directory, and not a bundled model "
            f"({', '.join(bundled_models()) or 'none installed'}) or a Hub id like 'org/name'."
        )
    if offline():
        raise MoECompressError(
            f"{name_or_path!r} looks like a Hugging Face Hub id, but HF_HUB_OFFLINE is set, so it cannot be downloaded. "
            "Download it first (e.g. `huggingface-cli download`) and pass the local directory."
        )
    return str(name_or_path)
