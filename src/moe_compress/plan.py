"""The Plan: what to do to each MoE layer, separated from doing it.

A plan is pure data. It is written to JSON so users can inspect it, edit it and apply it
again to the same model (`--plan-out` / `--plan-in`), and it is validated against the
router's needs before any tensor is touched.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.table import Table
from safetensors.torch import load_file, save_file

from .errors import MoECompressError

PLAN_FORMAT = "moe-compress/plan@1"


def _vectors_path(plan_path: Path) -> Path:
    return plan_path.with_name(plan_path.stem + ".novices.safetensors")


def _permutations_path(plan_path: Path) -> Path:
    return plan_path.with_name(plan_path.stem + ".permutations.safetensors")


MERGE_ROUTERS = ("weighted", "centroid")


@dataclass(frozen=True)
class RoutingLimits:
    """What a layer must keep for its router to work: top_k experts, and for grouped routers
    at least `min_per_group` in every one of `groups` groups."""

    top_k: int
    groups: int = 1
    groups_per_token: int = 1
    min_per_group: int = 1

    def min_units(self) -> int:
        """Fewest experts per group such that every token can still pick top_k experts."""
        reachable = math.ceil(self.top_k / self.groups_per_token) if self.groups > 1 else self.top_k
        return max(reachable, self.min_per_group)


@dataclass
class LayerPlan:
    """Decision for one MoE layer: which routed experts (original indices) are kept.

    With `novices`, the removed experts' router rows stay and each removed expert is replaced
    by a vector (MoNE); otherwise router rows of removed experts are deleted too.
    With `condensed_weights`, the layer is condensed (CD-MoE): no router, every token goes
    through the kept experts (sorted ids) scaled by these constants, plus shared experts.
    With `drop`, the whole MoE sub-layer is removed (attention stays).
    `clusters` optionally records the cluster id of each expert, for methods that cluster.
    With `merges`, kept expert i (in ascending id order) becomes the weighted average of the
    original experts `merges[i]` (itself first) with `merge_weights[i]`; its router row is
    the same weighted average of theirs (`merge_router="weighted"`) or its own ("centroid").
    """

    layer: int
    num_experts: int
    keep: list[int]
    scores: list[float] | None = None
    novices: bool = False
    clusters: list[int] | None = None
    condensed_weights: list[float] | None = None
    drop: bool = False
    merges: list[list[int]] | None = None
    merge_weights: list[list[float]] | None = None
    merge_router: str = "weighted"

    @property
    def removed(self) -> list[int]:
        kept = set(self.keep)
        return [e for e in range(self.num_experts) if e not in kept]


@dataclass
class Plan:
    model_type: str
    top_k: int
    layers: list[LayerPlan]
    method: str = "manual"
    ratio: float | None = None
    budget: str | None = None
    routing_groups: int = 1
    groups_per_token: int = 1
    min_per_group: int = 1
    meta: dict = field(default_factory=dict)
    #: Whole decoder blocks to remove (original indices); the result renumbers its layers.
    dropped_blocks: list[int] = field(default_factory=list)
    num_layers: int | None = None
    #: Per layer, [removed experts, hidden] novice vectors (rows in ascending expert id).
    #: Tensors are not JSON: `save` writes them beside the plan as safetensors.
    novice_vectors: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    #: Per layer, [aligned members, intermediate] neuron permutations (int64), one row per merge
    #: member after the first, in plan order: the aligned member's neuron j is its original
    #: neuron perm[j]. Saved beside the plan as safetensors, like the novice vectors.
    merge_permutations: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    # ---- queries ----------------------------------------------------------------------
    @property
    def limits(self) -> RoutingLimits:
        return RoutingLimits(self.top_k, self.routing_groups, self.groups_per_token, self.min_per_group)

    def is_uniform(self) -> bool:
        return len({len(lp.keep) for lp in self.layers}) <= 1

    def is_identity(self) -> bool:
        return not self.dropped_blocks and all(
            len(lp.keep) == lp.num_experts and not lp.drop and lp.condensed_weights is None for lp in self.layers
        )

    def kept_counts(self) -> dict[int, int]:
        return {lp.layer: len(lp.keep) for lp in self.layers}

    # ---- validation -------------------------------------------------------------------
    def validate(self) -> None:
        """Raise MoECompressError if applying this plan would leave a router that cannot work."""
        seen = set()
        min_units = self.limits.min_units()
        for lp in self.layers:
            where = f"plan layer {lp.layer}"
            if lp.layer in seen:
                raise MoECompressError(f"{where} appears twice; each MoE layer may have one entry.")
            seen.add(lp.layer)
            if len(set(lp.keep)) != len(lp.keep):
                raise MoECompressError(f"{where}: kept experts contain duplicates: {lp.keep}.")
            bad = [e for e in lp.keep if not 0 <= e < lp.num_experts]
            if bad:
                raise MoECompressError(f"{where}: expert indices {bad} are out of range 0..{lp.num_experts - 1}.")
            if lp.drop:
                continue
            if lp.condensed_weights is not None:
                if len(lp.condensed_weights) != len(lp.keep) or lp.keep != sorted(lp.keep):
                    raise MoECompressError(f"{where}: a condensed layer needs one weight per kept expert, experts in ascending order.")
                continue
            if lp.merges is not None:
                self._validate_merges(lp, where)
            if len(lp.keep) < self.top_k:
                raise MoECompressError(
                    f"{where} keeps {len(lp.keep)} experts, fewer than top_k={self.top_k}: every token routes to "
                    f"{self.top_k} experts. Keep at least {self.top_k} experts per layer (lower the ratio)."
                )
            groups = self.routing_groups
            if groups > 1 and not lp.novices:
                size = lp.num_experts // groups
                per_group = [sum(1 for e in lp.keep if e // size == g) for g in range(groups)]
                if len(set(per_group)) != 1 or per_group[0] < min_units:
                    raise MoECompressError(
                        f"{where}: group-limited routing needs the same number of kept experts in each of its "
                        f"{groups} groups, at least {min_units} each; this plan keeps {per_group}."
                    )
        if len(set(self.dropped_blocks)) != len(self.dropped_blocks):
            raise MoECompressError(f"plan drops a block twice: {self.dropped_blocks}.")
        if self.num_layers is not None:
            if any(not 0 <= b < self.num_layers for b in self.dropped_blocks):
                raise MoECompressError(f"dropped blocks {self.dropped_blocks} must be in 0..{self.num_layers - 1}.")
            if len(self.dropped_blocks) >= self.num_layers:
                raise MoECompressError("a plan cannot drop every decoder block.")

    def _validate_merges(self, lp: LayerPlan, where: str) -> None:
        """Merge groups: one per kept expert (itself first), disjoint, weighted, within one routing group."""
        if lp.novices:
            raise MoECompressError(f"{where}: a layer cannot both merge experts and keep novices.")
        if lp.merge_router not in MERGE_ROUTERS:
            raise MoECompressError(f"{where}: merge_router must be one of {', '.join(MERGE_ROUTERS)}; got {lp.merge_router!r}.")
        kept = sorted(lp.keep)
        weights = lp.merge_weights
        if len(lp.merges) != len(kept) or [group[:1] for group in lp.merges] != [[e] for e in kept]:
            raise MoECompressError(f"{where}: merges need one group per kept expert, in ascending order, each starting with that expert.")
        if weights is None or [len(w) for w in weights] != [len(g) for g in lp.merges]:
            raise MoECompressError(f"{where}: merge_weights need one weight per merged expert.")
        if any(not math.isfinite(v) or v < 0 for w in weights for v in w) or any(sum(w) <= 0 for w in weights):
            raise MoECompressError(f"{where}: merge weights must be finite, non-negative and not all zero in a group.")
        members = [e for group in lp.merges for e in group]
        bad = [e for e in members if not 0 <= e < lp.num_experts]
        if bad or len(set(members)) != len(members):
            raise MoECompressError(f"{where}: merged experts must be distinct ids in 0..{lp.num_experts - 1}; got {lp.merges}.")
        if self.routing_groups > 1:
            size = lp.num_experts // self.routing_groups
            if any(e // size != group[0] // size for group in lp.merges for e in group):
                raise MoECompressError(f"{where}: group-limited routing: experts may only merge within their routing group of {size}.")
        permutations = self.merge_permutations.get(lp.layer)
        if permutations is not None:
            aligned = sum(len(group) - 1 for group in lp.merges)
            valid = permutations.dim() == 2 and permutations.shape[0] == aligned
            if valid and aligned:
                ordered = torch.sort(permutations.long(), dim=1).values
                valid = torch.equal(ordered, torch.arange(permutations.shape[1]).expand_as(ordered))
            if not valid:
                raise MoECompressError(f"{where}: merge permutations must be {aligned} rows, each a permutation of the expert's neurons.")

    def check_model(self, model_type: str, experts_per_layer: dict[int, int], num_layers: int | None = None) -> None:
        """Raise if this plan was made for a different model than the one it is applied to."""
        if model_type != self.model_type:
            raise MoECompressError(f"plan was made for a {self.model_type!r} model, not {model_type!r}.")
        if self.num_layers is not None and num_layers is not None and num_layers != self.num_layers:
            raise MoECompressError(f"plan was made for {self.num_layers} decoder layers; the model has {num_layers}.")
        for lp in self.layers:
            if lp.layer not in experts_per_layer:
                raise MoECompressError(
                    f"plan names layer {lp.layer}, which is not an MoE layer of this model "
                    f"(MoE layers: {sorted(experts_per_layer)})."
                )
            if experts_per_layer[lp.layer] != lp.num_experts:
                raise MoECompressError(
                    f"plan expects {lp.num_experts} experts in layer {lp.layer}; the model has {experts_per_layer[lp.layer]}."
                )

    # ---- serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict:
        body = asdict(self)
        body.pop("novice_vectors")
        body.pop("merge_permutations")
        return {"format": PLAN_FORMAT, **body}

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        if data.get("format") != PLAN_FORMAT:
            raise MoECompressError(f"not a moe-compress plan (expected format {PLAN_FORMAT!r}, got {data.get('format')!r}).")
        body = {k: v for k, v in data.items() if k != "format"}
        try:
            body["layers"] = [LayerPlan(**lp) for lp in body["layers"]]
            return cls(**body)
        except (KeyError, TypeError) as exc:
            raise MoECompressError(f"plan is malformed: {exc}.") from None

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        if self.novice_vectors:
            save_file({str(k): v.contiguous() for k, v in self.novice_vectors.items()}, str(_vectors_path(path)))
        if self.merge_permutations:
            save_file({str(k): v.contiguous() for k, v in self.merge_permutations.items()}, str(_permutations_path(path)))

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        path = Path(path)
        if not path.is_file():
            raise MoECompressError(f"plan file {path} does not exist.")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise MoECompressError(f"plan file {path} is not valid JSON: {exc}.") from None
        plan = cls.from_dict(data)
        if _vectors_path(path).is_file():
            plan.novice_vectors = {int(k): v for k, v in load_file(str(_vectors_path(path))).items()}
        if _permutations_path(path).is_file():
            plan.merge_permutations = {int(k): v.long() for k, v in load_file(str(_permutations_path(path))).items()}
        plan.validate()
        return plan

    def table(self) -> Table:
        table = Table(title=f"plan: {self.method}, ratio={self.ratio}, budget={self.budget}")
        for column in ("layer", "experts", "kept", "removed"):
            table.add_column(column, justify="right" if column != "removed" else "left")
        for lp in self.layers:
            removed = lp.removed
            shown = ", ".join(map(str, removed[:16])) + (" ..." if len(removed) > 16 else "")
            kind = " (MoE dropped)" if lp.drop else " (condensed)" if lp.condensed_weights is not None else " (novices)" if lp.novices else ""
            kind = " (merged)" if lp.merges is not None and any(len(g) > 1 for g in lp.merges) else kind
            table.add_row(str(lp.layer), str(lp.num_experts), ("0" if lp.drop else str(len(lp.keep))) + kind, shown or "-")
        if self.dropped_blocks:
            table.add_row("blocks", "", "", "dropped: " + ", ".join(map(str, sorted(self.dropped_blocks))))
        return table
