"""The Plan: what to do to each MoE layer, separated from doing it.

A plan is pure data. It is written to JSON so users can inspect it, edit it and apply it
again to the same model (`--plan-out` / `--plan-in`), and it is validated against the
router's needs before any tensor is touched.

Because a plan file can be edited, nothing in it is trusted: every field is type-checked on
load (`keep: 1.5` is refused, not truncated), every number must be finite, and a plan records
the identity of the model it was made for (`ModelIdentity`: model type, decoder layers, experts
per MoE layer, top-k, hidden size, a weights fingerprint). Applying it checks that identity
against the model at hand, and the routing limits (top-k, groups) are the model's, never the
plan's own fields.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from rich.table import Table
from safetensors.torch import load_file, save_file

from .errors import MoECompressError, warn
from .finite import require_finite

PLAN_FORMAT = "moe-compress/plan@1"
FINGERPRINT_KINDS = ("content", "checkpoint")
#: How a run computes each kind of fingerprint (said when a plan's kind cannot be compared).
_COMPUTED_BY = {"content": "the model loaded in memory: --streaming off", "checkpoint": "the model opened from its checkpoint directory"}


def _vectors_path(plan_path: Path) -> Path:
    return plan_path.with_name(plan_path.stem + ".novices.safetensors")


def _permutations_path(plan_path: Path) -> Path:
    return plan_path.with_name(plan_path.stem + ".permutations.safetensors")


MERGE_ROUTERS = ("weighted", "centroid")


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


@dataclass(frozen=True)
class ModelIdentity:
    """What identifies the model a plan was made for.

    `fingerprints` hashes the weights, by kind: "content" (every byte of every tensor of an
    in-memory model, `observe.cache.content_fingerprint`) and "checkpoint" (the safetensors
    headers, sizes and mtimes of the checkpoint the weights were read from, unchanged,
    `observe.cache.checkpoint_fingerprint`). A run records every kind it can compute cheaply:
    a model loaded whole from a checkpoint both, a streamed one (whose bytes are never all in
    memory) the checkpoint's, a model handed over in memory its content's. Two fingerprints
    are compared only when they are of the same kind, so both kinds let a plan made in
    memory be applied streamed and the other way round. Plans written before the two kinds
    were recorded together hold one `fingerprint` of one `fingerprint_kind`; `from_dict`
    reads them as a one-entry `fingerprints`.
    """

    model_type: str
    num_layers: int
    experts_per_layer: dict[int, int]
    top_k: int
    hidden_size: int
    routing_groups: int = 1
    groups_per_token: int = 1
    fingerprints: dict[str, str] = field(default_factory=dict)
    dtype: str | None = None

    @property
    def own_fingerprint(self) -> str | None:
        """The one fingerprint caches are keyed by: the content hash of weights in memory, else the checkpoint's."""
        return self.fingerprints.get("content") or self.fingerprints.get("checkpoint")

    def to_dict(self) -> dict:
        body = asdict(self)
        body["experts_per_layer"] = {str(k): v for k, v in self.experts_per_layer.items()}
        return body

    @classmethod
    def from_dict(cls, data: object) -> ModelIdentity:
        where = "plan field 'identity'"
        _check_fields(data, _IDENTITY_FIELDS, where)
        experts = data["experts_per_layer"]
        if not isinstance(experts, dict) or not all(str(k).isdigit() and _is_int(v, 1) for k, v in experts.items()):
            raise MoECompressError(f"{where}: 'experts_per_layer' must map layer numbers to positive expert counts; got {experts!r}.")
        body = {k: v for k, v in data.items() if k not in _LEGACY_FINGERPRINT}
        if _LEGACY_FINGERPRINT & set(data):
            if "fingerprints" in data:
                raise MoECompressError(f"{where} has both 'fingerprints' and the older 'fingerprint'/'fingerprint_kind'; keep 'fingerprints' only.")
            legacy = data.get("fingerprint")
            body["fingerprints"] = {data.get("fingerprint_kind", "content"): legacy} if legacy else {}
        return cls(**{**body, "experts_per_layer": {int(k): v for k, v in experts.items()}})


# ---- type checks of plan files ---------------------------------------------------------------
def _is_int(value: object, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _list_of(check):
    return lambda v: isinstance(v, list) and all(check(x) for x in v)


def _optional(check):
    return lambda v: v is None or check(v)


#: field -> (test, what it must be, required)
_FieldSpec = tuple[Any, str, bool]
_LAYER_FIELDS: dict[str, _FieldSpec] = {
    "layer": (lambda v: _is_int(v, 0), "a layer index (integer >= 0)", True),
    "num_experts": (lambda v: _is_int(v, 1), "a positive integer", True),
    "keep": (_list_of(lambda v: _is_int(v, 0)), "a list of expert indices (integers >= 0)", True),
    "scores": (_optional(_list_of(_is_number)), "null or a list of finite numbers", False),
    "novices": (lambda v: isinstance(v, bool), "true or false", False),
    "clusters": (_optional(_list_of(lambda v: _is_int(v, 0))), "null or a list of integers >= 0", False),
    "condensed_weights": (_optional(_list_of(_is_number)), "null or a list of finite numbers", False),
    "drop": (lambda v: isinstance(v, bool), "true or false", False),
    "merges": (_optional(_list_of(_list_of(lambda v: _is_int(v, 0)))), "null or a list of lists of expert indices", False),
    "merge_weights": (_optional(_list_of(_list_of(_is_number))), "null or a list of lists of finite numbers", False),
    "merge_router": (lambda v: v in MERGE_ROUTERS, f"one of {', '.join(MERGE_ROUTERS)}", False),
}
_PLAN_FIELDS: dict[str, _FieldSpec] = {
    "model_type": (lambda v: isinstance(v, str) and bool(v), "a model type name", True),
    "top_k": (lambda v: _is_int(v, 1), "a positive integer", True),
    "layers": (_list_of(lambda v: isinstance(v, dict)), "a list of layer objects", True),
    "method": (lambda v: isinstance(v, str), "a string", False),
    "ratio": (_optional(_is_number), "null or a finite number", False),
    "budget": (_optional(lambda v: isinstance(v, str)), "null or a string", False),
    "routing_groups": (lambda v: _is_int(v, 1), "a positive integer", False),
    "groups_per_token": (lambda v: _is_int(v, 1), "a positive integer", False),
    "min_per_group": (lambda v: _is_int(v, 0), "an integer >= 0", False),
    "meta": (lambda v: isinstance(v, dict), "an object", False),
    "dropped_blocks": (_list_of(lambda v: _is_int(v, 0)), "a list of block indices (integers >= 0)", False),
    "num_layers": (_optional(lambda v: _is_int(v, 1)), "null or a positive integer", False),
    "identity": (lambda v: v is None or isinstance(v, dict), "null or an object", False),
}
_IDENTITY_FIELDS: dict[str, _FieldSpec] = {
    "model_type": (lambda v: isinstance(v, str) and bool(v), "a model type name", True),
    "num_layers": (lambda v: _is_int(v, 1), "a positive integer", True),
    "experts_per_layer": (lambda v: isinstance(v, dict), "an object", True),
    "top_k": (lambda v: _is_int(v, 1), "a positive integer", True),
    "hidden_size": (lambda v: _is_int(v, 1), "a positive integer", True),
    "routing_groups": (lambda v: _is_int(v, 1), "a positive integer", False),
    "groups_per_token": (lambda v: _is_int(v, 1), "a positive integer", False),
    "fingerprints": (
        lambda v: isinstance(v, dict) and all(k in FINGERPRINT_KINDS and isinstance(x, str) and x for k, x in v.items()),
        "an object mapping 'content' and/or 'checkpoint' to fingerprint strings", False,
    ),
    # the single fingerprint of plans written before both kinds were recorded (read as `fingerprints`)
    "fingerprint": (_optional(lambda v: isinstance(v, str)), "null or a string", False),
    "fingerprint_kind": (lambda v: v in FINGERPRINT_KINDS, "'content' or 'checkpoint'", False),
    "dtype": (_optional(lambda v: isinstance(v, str)), "null or a string", False),
}
_LEGACY_FINGERPRINT = {"fingerprint", "fingerprint_kind"}


def _check_fields(data: object, spec: dict[str, _FieldSpec], where: str) -> None:
    """Raise naming the first field of `data` that is missing, unknown or of the wrong type."""
    if not isinstance(data, dict):
        raise MoECompressError(f"{where} must be a JSON object; got {data!r}.")
    unknown = sorted(set(data) - set(spec))
    if unknown:
        raise MoECompressError(f"{where} has unknown field(s) {unknown}; known: {', '.join(spec)}.")
    for name, (test, expected, required) in spec.items():
        if name not in data:
            if required:
                raise MoECompressError(f"{where} lacks the required field {name!r} ({expected}).")
            continue
        if not test(data[name]):
            raise MoECompressError(f"{where}: field {name!r} must be {expected}; got {json.dumps(data[name])[:80]}.")


IGNORE_OPTION = "--ignore-plan-identity (API: ignore_plan_identity=True)"


def _unchecked(why: str, ignore: bool) -> None:
    """Refuse a plan whose weights cannot be compared with the model's, or with `ignore` warn and go on."""
    if not ignore:
        raise MoECompressError(
            f"this plan {why}, so nothing shows it was made for these weights. Recompute the plan for this model, "
            f"or pass {IGNORE_OPTION} to apply it unchecked."
        )
    warn(f"this plan {why}: applied with --ignore-plan-identity, checked against the model's layers and experts, not its weights.")


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
    #: The model this plan was made for (None in plans written before identities existed).
    identity: ModelIdentity | None = None

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
            if lp.novices and not lp.keep:
                raise MoECompressError(f"{where} keeps no expert; with novices at least one real expert must stay.")
            if lp.merges is not None:
                self._validate_merges(lp, where)
            if len(lp.keep) < self.top_k and not lp.novices:  # novices keep every router row: top_k stays reachable
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
        self._validate_numbers()
        merging = {lp.layer for lp in self.layers if lp.merges is not None and not lp.drop and lp.condensed_weights is None}
        stray = sorted(set(self.merge_permutations) - merging)
        if stray:
            raise MoECompressError(f"plan carries merge permutations for layer(s) {stray}, which merge no experts.")
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

    def _validate_numbers(self) -> None:
        """Every number finite; novice vectors one row per removed expert, for novice layers only."""
        if self.ratio is not None and not math.isfinite(self.ratio):
            raise MoECompressError(f"plan ratio must be a finite number; got {self.ratio}.")
        by_layer = {lp.layer: lp for lp in self.layers}
        for lp in self.layers:
            for name in ("scores", "condensed_weights"):
                values = getattr(lp, name)
                if values is not None and not all(math.isfinite(v) for v in values):
                    raise MoECompressError(f"plan layer {lp.layer}: {name} contain NaN or Inf; recompute the plan.")
        for layer, vectors in self.novice_vectors.items():
            lp = by_layer.get(layer)
            if lp is None or not lp.novices:
                raise MoECompressError(f"plan carries novice vectors for layer {layer}, which has no novices.")
            if vectors.dim() != 2 or vectors.shape[0] != len(lp.removed):
                raise MoECompressError(
                    f"plan novice vectors of layer {layer} have shape {list(vectors.shape)}; expected "
                    f"[{len(lp.removed)} removed experts, hidden size]."
                )
            require_finite(vectors, f"plan novice vectors of layer {layer}")

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
        made_for = self.identity
        if made_for is None:
            _unchecked("records no model identity (an older moe-compress wrote it, or it was built in code)", ignore_fingerprint)
            return
        structure = ("model_type", "num_layers", "experts_per_layer", "top_k", "hidden_size")
        for name in structure:
            if getattr(made_for, name) != getattr(model, name):
                raise MoECompressError(
                    f"plan was made for a model with {name} {getattr(made_for, name)}; this model has {getattr(model, name)}. "
                    "Apply a plan only to the model it was made for."
                )
        shared = [kind for kind in FINGERPRINT_KINDS if kind in made_for.fingerprints and kind in model.fingerprints]
        if not shared:
            recorded = made_for.fingerprints
            why = "records no weights fingerprint" if not recorded else (
                f"records only a {' and a '.join(recorded)} fingerprint, which this run cannot compute (that needs "
                f"{' or '.join(_COMPUTED_BY[k] for k in recorded)})"
            )
            _unchecked(why, ignore_fingerprint)
            return
        differing = [kind for kind in shared if made_for.fingerprints[kind] != model.fingerprints[kind]]
        if differing:
            kind = differing[0]
            dtype = f" (it was made on {made_for.dtype} weights, these are {model.dtype}: load with --dtype {made_for.dtype})" if made_for.dtype != model.dtype else ""
            message = (
                f"plan was made for other weights of this architecture ({kind} fingerprint {made_for.fingerprints[kind]}, this model "
                f"{model.fingerprints[kind]}){dtype}"
            )
            if not ignore_fingerprint:
                raise MoECompressError(f"{message}. Recompute the plan for these weights, or pass {IGNORE_OPTION} to apply it anyway.")
            warn(f"{message}; applied anyway, as --ignore-plan-identity asks.")

    # ---- serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict:
        body: dict[str, Any] = {"format": PLAN_FORMAT}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "layers":
                value = [asdict(lp) for lp in value]
            elif f.name == "identity":
                value = value.to_dict() if value is not None else None
            elif f.name in ("novice_vectors", "merge_permutations"):
                continue
            body[f.name] = value
        return body

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        """Build a plan from its JSON form, refusing any field of the wrong type by name."""
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise MoECompressError(f"not a moe-compress plan (expected format {PLAN_FORMAT!r}, got {found!r}).")
        body = {k: v for k, v in data.items() if k != "format"}
        _check_fields(body, _PLAN_FIELDS, "plan")
        for position, layer in enumerate(body["layers"]):
            _check_fields(layer, _LAYER_FIELDS, f"plan layer entry {position}")
        body["layers"] = [LayerPlan(**lp) for lp in body["layers"]]
        if body.get("identity") is not None:
            body["identity"] = ModelIdentity.from_dict(body["identity"])
        return cls(**body)

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
            kind = " (MoE dropped)" if lp.drop else " (condensed)" if lp.condensed_weights is not None else " (novices)" if lp.novices else ""
            kind = " (merged)" if lp.merges is not None and any(len(g) > 1 for g in lp.merges) else kind
            table.add_row(str(lp.layer), str(lp.num_experts), ("0" if lp.drop else str(len(lp.keep))) + kind, shown or "-")
        if self.dropped_blocks:
            table.add_row("blocks", "", "", "dropped: " + ", ".join(map(str, sorted(self.dropped_blocks))))
        return table
