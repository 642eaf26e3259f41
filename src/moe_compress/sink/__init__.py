"""Where a run writes its result: the checkpoint (streamed layer by layer, with per-layer changes
passed in as callables, so nothing here knows a stage), its config and generated code, the model
card, and the output directory itself (staged beside it, locked, renamed into place).

The names below are imported on first use (PEP 562): `publish` and the lock are then importable
without pulling in torch and transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import exports_on_first_use

#: public name -> the submodule that defines it
_EXPORTS = {
    "PLAN_FILE": ".save",
    "SUMMARY_FILE": ".save",
    "needs_remote_code": ".save",
    "save_compressed": ".save",
}
__all__ = sorted(_EXPORTS)
__getattr__ = exports_on_first_use(__name__, _EXPORTS)

if TYPE_CHECKING:
    from .save import PLAN_FILE, SUMMARY_FILE, needs_remote_code, save_compressed
