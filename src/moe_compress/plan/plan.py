"""The Plan: every MoE layer's action and the decoder blocks to drop, checked before any tensor is touched."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import ConfigDict, Field
from rich.table import Table
from safetensors.torch import load_file, save_file

from ..errors import MoECompressError
from ..finite import require_finite
from .identity import ModelIdentity, unchecked
from .layers import ACTIONS, LayerPlan, MergeLayer, NoviceLayer, RoutingLimits
from .reader import PLAN_FORMAT, current_form
from .strict import Strict

#: How the table marks a layer whose action is more than keeping experts.
_TABLE_KINDS = {"novices": " (novices)", "condense": " (condensed)", "drop_moe": " (MoE dropped)"}


def _vectors_path(plan_path: Path) -> Path:
    return plan_path.with_name(plan_path.stem + ".novices.safetensors")


def _permutations_path(plan_path: Path) -> Path:
    return plan_path.with_name(plan_path.stem + ".permutations.safetensors")


def _load_layer_tensors(path: Path, what: str) -> dict[int, torch.Tensor]:
    """Tensors saved beside a plan, keyed by layer number ({} when the file does not exist)."""
    if not path.is_file():
        return {}
    try:
        loaded = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error type for corrupt files
        raise MoECompressError(f"{what} {path} are corrupt ({exc}); re-save the plan.") from None
    if not all(k.isdigit() for k in loaded):
        raise MoECompressError(f"{what} {path} must be keyed by layer number; got {sorted(loaded)}.")
    return {int(k): v for k, v in loaded.items()}


def _same_tensors(a: dict[int, torch.Tensor], b: dict[int, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Plan(Strict):
    """What to do to a model: one action per MoE layer it changes (`layers`), the decoder
    blocks to remove, the routing limits the actions were checked against, and the identity of
    the model it was made for. It is a plan, not a model: mutable while a method builds it,
    checked by `validate` before it is applied or after it is read."""

    model_config = ConfigDict(frozen=False, arbitrary_types_allowed=True)

    model_type: str = Field(min_length=1, description="a model type name")
    top_k: int = Field(ge=1, description="a positive integer")
    layers: list[LayerPlan] = Field(description="a list of layer objects")
    method: str = Field("manual", description="a string")
    ratio: float | None = Field(None, description="null or a finite number")
    budget: str | None = Field(None, description="null or a string")
    routing_groups: int = Field(1, ge=1, description="a positive integer")
    groups_per_token: int = Field(1, ge=1, description="a positive integer")
    min_per_group: int = Field(1, ge=0, description="an integer >= 0")
    meta: dict = Field(default_factory=dict, description="an object")
    #: Whole decoder blocks to remove (original indices); the result renumbers its layers.
    dropped_blocks: list[Annotated[int, Field(ge=0)]] = Field(default_factory=list, description="a list of block indices (integers >= 0)")
    num_layers: int | None = Field(None, ge=1, description="null or a positive integer")
    #: Per novice layer, [removed experts, hidden] vectors (rows in ascending expert id).
    #: Tensors are not JSON: `save` writes them beside the plan as safetensors.
    novice_vectors: dict[int, torch.Tensor] = Field(default_factory=dict, exclude=True, repr=False)
    #: Per merge layer, [aligned members, intermediate] neuron permutations (int64), one row per
    #: merge member after the first, in plan order: the aligned member's neuron j is its original
    #: neuron perm[j]. Saved beside the plan as safetensors, like the novice vectors.
    merge_permutations: dict[int, torch.Tensor] = Field(default_factory=dict, exclude=True, repr=False)
    #: The model this plan was made for (None in plans written before identities existed).
    identity: ModelIdentity | None = Field(None, description="null or an object")

    @classmethod
    def _site(cls, loc: tuple, where: str) -> tuple[type[Strict], str, tuple, tuple]:
        if loc[:1] == ("identity",) and len(loc) > 1:
            return ModelIdentity, "plan field 'identity'", loc[:1], loc[1:]
        if loc[:1] == ("layers",) and len(loc) > 1 and isinstance(loc[1], int):
            tagged = len(loc) > 2 and loc[2] in ACTIONS
            return (ACTIONS[loc[2]] if tagged else cls), f"plan layer entry {loc[1]}", loc[:2], loc[3:] if tagged else loc[2:]
        return cls, where, (), loc

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Plan):
            return NotImplemented
        return (self.to_dict() == other.to_dict() and _same_tensors(self.novice_vectors, other.novice_vectors)
                and _same_tensors(self.merge_permutations, other.merge_permutations))

    # ---- queries ----------------------------------------------------------------------
    @property
    def limits(self) -> RoutingLimits:
        return RoutingLimits(self.top_k, self.routing_groups, self.groups_per_token, self.min_per_group)

    def is_uniform(self) -> bool:
        return len({len(lp.keep) for lp in self.layers}) <= 1

    def is_identity(self) -> bool:
        return not self.dropped_blocks and all(lp.untouched for lp in self.layers)

    def kept_counts(self) -> dict[int, int]:
        return {lp.layer: len(lp.keep) for lp in self.layers}

    # ---- validation -------------------------------------------------------------------
    def validate(self) -> None:
        """Raise MoECompressError if applying this plan would leave a router that cannot work.

        Each layer entry checked itself when it was built; this adds what needs the whole
        plan: one entry per layer, each action against the routing limits, the tensors saved
        beside the plan, and the dropped blocks.
        """
        seen = set()
        for lp in self.layers:
            if lp.layer in seen:
                raise MoECompressError(f"plan layer {lp.layer} appears twice; each MoE layer may have one entry.")
            seen.add(lp.layer)
            lp.check_routing(self.limits)
        self._validate_tensors()
        if len(set(self.dropped_blocks)) != len(self.dropped_blocks):
            raise MoECompressError(f"plan drops a block twice: {self.dropped_blocks}.")
        if self.num_layers is not None:
            if any(not b < self.num_layers for b in self.dropped_blocks):
                raise MoECompressError(f"dropped blocks {self.dropped_blocks} must be in 0..{self.num_layers - 1}.")
            if len(self.dropped_blocks) >= self.num_layers:
                raise MoECompressError("a plan cannot drop every decoder block.")

    def _validate_tensors(self) -> None:
        """Novice vectors: one finite row per removed expert of a novice layer; merge permutations: for merge layers only."""
        by_layer = {lp.layer: lp for lp in self.layers}
        for layer, vectors in self.novice_vectors.items():
            lp = by_layer.get(layer)
            if not isinstance(lp, NoviceLayer):
                raise MoECompressError(f"plan carries novice vectors for layer {layer}, which has no novices.")
            if vectors.dim() != 2 or vectors.shape[0] != len(lp.removed):
                raise MoECompressError(
                    f"plan novice vectors of layer {layer} have shape {list(vectors.shape)}; expected "
                    f"[{len(lp.removed)} removed experts, hidden size]."
                )
            require_finite(vectors, f"plan novice vectors of layer {layer}")
        stray = sorted(layer for layer in self.merge_permutations if not isinstance(by_layer.get(layer), MergeLayer))
        if stray:
            raise MoECompressError(f"plan carries merge permutations for layer(s) {stray}, which merge no experts.")
        for layer, permutations in self.merge_permutations.items():
            by_layer[layer].check_permutations(permutations)

    def check_model(
        self, model_type: str, experts_per_layer: dict[int, int], num_layers: int | None = None, top_k: int | None = None
    ) -> None:
        """Raise if this plan was made for a different model than the one it is applied to.

        `top_k` is the model's own (from its config): a plan edited to claim a smaller top-k
        must not let a layer keep fewer experts than the router picks.
        """
        if model_type != self.model_type:
            raise MoECompressError(f"plan was made for a {self.model_type!r} model, not {model_type!r}.")
        if top_k is not None and top_k != self.top_k:
            raise MoECompressError(
                f"plan says top_k={self.top_k}, but the model routes every token to {top_k} experts; "
                "the plan was edited or made for another model. Recompute it for this model."
            )
        if self.num_layers is not None and num_layers is not None and num_layers != self.num_layers:
            raise MoECompressError(f"plan was made for {self.num_layers} decoder layers; the model has {num_layers}.")
        if num_layers is not None and any(not 0 <= b < num_layers for b in self.dropped_blocks):
            raise MoECompressError(f"plan drops blocks {self.dropped_blocks}; the model's blocks are 0..{num_layers - 1}.")
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

    def check_identity(self, model: ModelIdentity, ignore_fingerprint: bool = False) -> None:
        """Raise unless this plan was made for `model` (see `ModelIdentity`).

        The structure (model type, layers, experts, top-k, hidden size, routing groups) must
        always match. The weights must match by every fingerprint kind both record; a plan
        that records none this run can compare (no identity, no fingerprint, or only a kind
        this run cannot compute) is refused as well, since an unchecked plan applied to other
        weights writes a wrong model without a word. `ignore_fingerprint` (--ignore-plan-identity)
        turns both weights refusals into a warning: for a plan meant for other weights of the
        same architecture, e.g. one made on a base model and applied to its fine-tune.
        """
        self.check_model(model.model_type, model.experts_per_layer, model.num_layers, model.top_k)
        if (self.routing_groups, self.groups_per_token) != (model.routing_groups, model.groups_per_token):
            raise MoECompressError(
                f"plan assumes {self.routing_groups} routing group(s), {self.groups_per_token} per token; the model has "
                f"{model.routing_groups} and {model.groups_per_token}. Recompute the plan for this model."
            )
        for layer, vectors in self.novice_vectors.items():
            if vectors.shape[1] != model.hidden_size:
                raise MoECompressError(f"plan novice vectors of layer {layer} have width {vectors.shape[1]}; the model's hidden size is {model.hidden_size}.")
        if self.identity is None:
            unchecked("records no model identity (an older moe-compress wrote it, or it was built in code)", ignore_fingerprint)
            return
        self.identity.check_made_for(model, ignore_fingerprint)

    # ---- serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON form: the current format, then every field in declaration order (tensors are saved beside it)."""
        return {"format": PLAN_FORMAT, **self.model_dump()}

    @classmethod
    def from_dict(cls, data: object) -> Plan:
        """A plan from the JSON form of any format moe-compress wrote, refusing any field of the wrong type by name."""
        return cls.parse(current_form(data), "plan")

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
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MoECompressError(f"plan file {path} is not valid JSON: {exc}.") from None
        try:
            plan = cls.from_dict(data)
        except MoECompressError as exc:
            raise MoECompressError(f"plan file {path}: {exc}") from None
        plan.novice_vectors = _load_layer_tensors(_vectors_path(path), "novice vectors")
        plan.merge_permutations = {k: v.long() for k, v in _load_layer_tensors(_permutations_path(path), "merge permutations").items()}
        plan.validate()
        return plan

    def table(self) -> Table:
        settings = [f"ratio={self.ratio}"] * (self.ratio is not None) + [f"budget={self.budget}"] * bool(self.budget)
        table = Table(title=", ".join([f"plan: {self.method}", *settings]))
        for column in ("layer", "experts", "kept", "removed"):
            table.add_column(column, justify="right" if column != "removed" else "left")
        for lp in self.layers:
            removed = lp.removed
            shown = ", ".join(map(str, removed[:16])) + (" ..." if len(removed) > 16 else "")
            merged = isinstance(lp, MergeLayer) and any(len(g) > 1 for g in lp.merges)
            kind = " (merged)" if merged else _TABLE_KINDS.get(lp.action, "")
            table.add_row(str(lp.layer), str(lp.num_experts), str(len(lp.keep)) + kind, shown or "-")
        if self.dropped_blocks:
            table.add_row("blocks", "", "", "dropped: " + ", ".join(map(str, sorted(self.dropped_blocks))))
        return table
