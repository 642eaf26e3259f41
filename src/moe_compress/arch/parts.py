"""A model's parameters by part and the `inspect` report built from them, as plain data (no torch).

Two counters fill them: `arch.size` from a model (or its meta skeleton), and
`source.header_report` from a checkpoint's config and shard headers alone; the report is
assembled here once, so both print the same thing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class ModelSize:
    attention: int = 0
    routed_experts: int = 0
    shared_experts: int = 0
    router: int = 0
    other: int = 0  # embeddings, norms, dense MLPs, output head
    active_per_token: int = 0
    bytes: int = 0
    experts_per_layer: dict[int, int] = field(default_factory=dict)
    top_k: int = 0
    num_layers: int = 0

    @property
    def total(self) -> int:
        return self.attention + self.routed_experts + self.shared_experts + self.router + self.other

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def layer_row(index: int, moe: bool, experts: int, shared_modules: int) -> dict:
    """One decoder layer of the report."""
    return {"layer": index, "kind": "moe" if moe else "dense", "experts": experts, "shared_modules": shared_modules}


def report(name: str, model_type: str, dtype: str, layers: list[dict], size: ModelSize) -> dict:
    """What `inspect` prints (`report.tables.structure_tables`, or as JSON)."""
    return {"model": name, "model_type": model_type, "top_k": size.top_k, "dtype": dtype, "layers": layers, "size": size.to_dict()}
