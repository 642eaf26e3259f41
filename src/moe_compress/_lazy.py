"""Public names imported on first use, through a module-level `__getattr__` (PEP 562).

`import moe_compress` (and so `moe-compress --help`) must not import torch; the public API is
still `moe_compress.compress`, `moe_compress.perplexity`, ... Python calls a module's
`__getattr__` only for a name the module does not hold, and importing a submodule makes it an
attribute of its package: so no exported name may also be a submodule's name (the function
`finetune` lives in `finetuning`, `perplexity` in `evaluate.lm_perplexity`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def exports_on_first_use(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A module-level `__getattr__` for `package` that imports each of `exports` (public name ->
    relative module) when it is first looked up."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(exports[name], package), name)

    return __getattr__
