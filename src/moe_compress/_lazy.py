"""Packages whose public names are imported on first use.

`import moe_compress` (and so `moe-compress --help`) must not import torch; the public API is
still `moe_compress.compress`, `moe_compress.perplexity`, ... A package calls `lazy_package`
with its exports; the names are imported when first looked up.

One subtlety: a submodule and a public function may share a name (`moe_compress.finetune`,
`moe_compress.evaluate.perplexity`). Importing the submodule makes Python set it as an
attribute of the package, which would then shadow the function. The eager `from .finetune
import finetune` this replaces bound the function last; `LazyPackage.__setattr__` keeps that
meaning: the package attribute is the function, and the submodule stays in `sys.modules`.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from collections.abc import Callable
from typing import Any


class LazyPackage(ModuleType):
    _lazy_exports: dict[str, str]

    def __getattr__(self, name: str) -> Any:
        exports = self.__dict__.get("_lazy_exports", {})
        if name not in exports:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name], self.__name__), name)
        ModuleType.__setattr__(self, name, value)  # later lookups skip this method
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        exports = self.__dict__.get("_lazy_exports", {})
        if isinstance(value, ModuleType) and name in exports and value.__name__ == f"{self.__name__}.{name}":
            value = getattr(value, name)  # the submodule was just imported: the public name is its function
        ModuleType.__setattr__(self, name, value)

    def __dir__(self) -> list[str]:
        return sorted({*self.__dict__, *self.__dict__.get("_lazy_exports", {})})


def lazy_package(name: str, exports: dict[str, str]) -> list[str]:
    """Make package `name` import `exports` (public name -> relative module) on first use; returns `__all__`."""
    module = sys.modules[name]
    module.__class__ = LazyPackage
    module.__dict__["_lazy_exports"] = exports
    return sorted(exports)


def exports_on_first_use(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A module-level `__getattr__` (PEP 562) for a sub-package whose names share no submodule's name:
    `package` imports each of `exports` (public name -> relative module) when it is first looked up."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(exports[name], package), name)

    return __getattr__
