"""The families table's rows as data, and their markdown (the README's copy).

Torch-free on purpose: `moe-compress families` prints rows read back from the cache
(`listings.family_rows`) with nothing heavier imported; `table` builds them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FamilyRow:
    model_type: str
    supported: bool
    reason: str = ""  # why not, when refused
    router: str = ""
    shared_experts: str = ""
    outputs: str = ""
    notes: str = ""


def markdown(rows: list[FamilyRow]) -> str:
    lines = ["| model type | supported | router | shared experts | stock-loadable outputs | notes |", "|---|---|---|---|---|---|"]
    for row in rows:
        status = "yes" if row.supported else f"no: {row.reason}"
        cells = [f"`{row.model_type}`", status, row.router, row.shared_experts, row.outputs, row.notes]
        lines.append("| " + " | ".join(cell.replace("|", "/") for cell in cells) + " |")
    return "\n".join(lines) + "\n"
