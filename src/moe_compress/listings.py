"""What `moe-compress families`, `methods` and `inspect` print, as data; the first two built once and kept.

Building either imports much (every MoE family's modelling code; every method, and torch with
them) only to read what the code says about itself, so the rows are kept (`remembered`, keyed
by the code and the transformers installed) and read back by later calls without importing
torch or transformers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from .arch.family_table import FamilyRow
from .errors import MoECompressError
from .loading import LoadSettings
from .remembered import remembered


def _build_family_rows() -> list[dict]:
    from .arch.table import compute_family_rows

    return [asdict(row) for row in compute_family_rows()]


def family_rows(refresh: bool = False) -> list[FamilyRow]:
    """Every MoE model type of the installed transformers, as discovery sees it."""
    return [FamilyRow(**row) for row in remembered("families", _build_family_rows, refresh)]


def _first_line(documented: Callable | type) -> str:
    return (documented.__doc__ or "-").strip().splitlines()[0].replace("`", "").rstrip(".")


def _build_method_rows() -> list[dict]:
    from .methods import METHODS
    from .stages import stages
    from .slimming import SLIM_METHODS
    from .slimming.quantize import SCOPES

    def shown(options: dict) -> str:
        return ", ".join(f"{k}={v}" for k, v in options.items()) or "-"

    rows = [
        {"table": "methods", "cells": [m.family, m.name, m.doc, shown({**m.options, "protect_super_experts": m.protect_default})]}
        for m in sorted(METHODS.values(), key=lambda m: (m.family, m.name))
    ]
    extra = {
        "slim": "; methods: " + "; ".join(f"{name}: {doc}" for name, doc in SLIM_METHODS.items()),
        "quantize": "; scope: " + "; ".join(f"{name}: {doc}" for name, doc in SCOPES.items()),
    }
    for kind, stage in sorted(stages().items()):
        if kind != "prune":  # its methods are the first table
            defaults = {name: info.default for name, info in stage.model_fields.items()}
            rows.append({"table": "stages", "cells": [kind, _first_line(stage) + extra.get(kind, ""), shown(defaults)]})
    return rows


def method_rows() -> list[dict]:
    """Every method and stage with its options: {"table": "methods" | "stages", "cells": [...]}."""
    return remembered("methods", _build_method_rows)


def _build_method_options() -> list[dict]:
    from .methods import METHODS
    from .methods.options import describe_options

    return [{"method": name, **option} for name, method in sorted(METHODS.items()) for option in describe_options(method)]


def method_options(name: str) -> list[dict]:
    """One method's options (name, type, default, help); an unknown method is an error naming the known ones."""
    rows = remembered("method-options", _build_method_options)
    known = sorted({row["method"] for row in rows})
    if name not in known:
        raise MoECompressError(f"unknown method {name!r}; available: {', '.join(known)}.")
    return [{k: v for k, v in row.items() if k != "method"} for row in rows if row["method"] == name]


def structure_of(model: str, load: LoadSettings) -> dict:
    """What `inspect` prints about `model`: from its config and shard headers alone, without torch, where
    its family's key layout is known (`source.header_report`); else from the modelling code (a meta
    skeleton: no weight is read), which then learns the layout for the family's next checkpoint."""
    from .source.header_report import structure_from_headers

    report = None if load.verify_checksums else structure_from_headers(model, load.dtype)
    return _with_modelling_code(model, load) if report is None else report


def _with_modelling_code(model: str, load: LoadSettings) -> dict:
    from .arch import get_adapter
    from .arch.size import structure_report
    from .source.key_layout import keep_layout, learn_layout
    from .source.load import resolve_model

    load.check(model)
    source = resolve_model(model)
    loaded, _, _ = load.open(model, "cpu", streaming=Path(source).is_dir())
    report = structure_report(model, loaded, get_adapter(loaded))
    layout = learn_layout(source, loaded.config) if Path(source).is_dir() else None
    if layout is not None:
        keep_layout(layout)
    return report
