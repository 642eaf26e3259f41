"""Where a run reads its model from: locating it, trusting (or refusing) its code, opening it in
memory or streamed one decoder layer at a time from its safetensors shards, and checking that the
files are what their headers claim.

The names below are imported on first use (PEP 562): `locate` is then importable without
pulling in torch and transformers.
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
}
__all__ = sorted(_EXPORTS)
__getattr__ = exports_on_first_use(__name__, _EXPORTS)

if TYPE_CHECKING:
    from .load import load_config, load_model
    from .locate import bundled_models, resolve_model
