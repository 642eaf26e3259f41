"""Loading and saving checkpoints.

The names below are imported on first use (PEP 562): the light modules of this package
(`locate`, `publish`) are then importable without pulling in torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: public name -> the submodule that defines it
_EXPORTS = {
    "bundled_models": ".locate",
    "resolve_model": ".locate",
    "load_config": ".load",
    "load_model": ".load",
    "PLAN_FILE": ".save",
    "SUMMARY_FILE": ".save",
    "needs_remote_code": ".save",
    "save_compressed": ".save",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)


if TYPE_CHECKING:
    from .load import load_config, load_model
    from .locate import bundled_models, resolve_model
    from .save import PLAN_FILE, SUMMARY_FILE, needs_remote_code, save_compressed
