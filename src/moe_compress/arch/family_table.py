"""The families table as data: one row per MoE model type of the installed transformers.

Building it (`table.compute_family_rows`) imports the modelling code of every MoE family and
builds each on the meta device -- tens of seconds -- so the rows are kept (`remembered`) and
`moe-compress families` reads them back without importing torch or transformers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..remembered import remembered


@dataclass(frozen=True)
class FamilyRow:
    model_type: str
    supported: bool
    reason: str = ""  # why not, when refused
    router: str = ""
    shared_experts: str = ""
    outputs: str = ""
    notes: str = ""


def _build() -> list[dict]:
    from .table import compute_family_rows

    return [asdict(row) for row in compute_family_rows()]


def family_rows(refresh: bool = False) -> list[FamilyRow]:
    """Every MoE model type of the installed transformers, as discovery sees it (built once, then read back)."""
    return [FamilyRow(**row) for row in remembered("families", _build, refresh)]


def markdown(rows: list[FamilyRow]) -> str:
    lines = ["| model type | supported | router | shared experts | stock-loadable outputs | notes |", "|---|---|---|---|---|---|"]
    for row in rows:
        status = "yes" if row.supported else f"no: {row.reason}"
        cells = [f"`{row.model_type}`", status, row.router, row.shared_experts, row.outputs, row.notes]
        lines.append("| " + " | ".join(cell.replace("|", "/") for cell in cells) + " |")
    return "\n".join(lines) + "\n"
