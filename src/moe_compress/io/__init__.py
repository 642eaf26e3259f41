"""Loading and saving checkpoints.

The names below are imported on first use (PEP 562): the light modules of this package
(`locate`, `publish` and the modules it uses) are then importable without pulling in torch and
transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import exports_on_first_use

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


__getattr__ = exports_on_first_use(__name__, _EXPORTS)


if TYPE_CHECKING:
    from .load import load_config, load_model
    from .locate import bundled_models, resolve_model
    from .save import PLAN_FILE, SUMMARY_FILE, needs_remote_code, save_compressed
