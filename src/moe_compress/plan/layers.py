"""What a plan does to one MoE layer: one action per layer, each a class that checks itself.

A layer entry names its `action`, and carries that action's fields and no other:

* `keep` (`KeepLayer`): plain expert pruning; the kept experts and their router rows stay.
* `novices` (`NoviceLayer`, MoNE): removed experts become constant vectors; every router row stays.
* `merge` (`MergeLayer`): each kept expert becomes a weighted average of a group of experts.
* `condense` (`CondenseLayer`, CD-MoE): no router; every token goes through the kept experts.
* `drop_moe` (`DropMoeLayer`): the MoE sub-layer is removed, attention stays.

One class per action rather than one record with every action's optional fields: the record
let a layer be novices and condensed at once, and every consumer re-derived the action from
field combinations (`novices or drop or condensed_weights`). Whole decoder blocks are not a
layer action: a dropped block may hold no MoE layer at all, and dropping one renumbers every
later layer, so `Plan.dropped_blocks` stays a plan-level list.

What needs only the layer (kept ids in range and distinct, merge groups and weights, one
condensed weight per kept expert) is checked when an entry is built or read; what needs the
plan's routing limits (top-k, routing groups) is `check_routing`, run by `Plan.validate`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal, Self

import torch
from pydantic import Field, model_validator

from ..errors import MoECompressError
from .strict import Strict

ExpertIndex = Annotated[int, Field(ge=0)]
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


class _Layer(Strict):
    """One MoE layer's entry: its index and how many routed experts it has before the plan."""

    action: str
    layer: int = Field(ge=0, description="a layer index (integer >= 0)")
    num_experts: int = Field(ge=1, description="a positive integer")

    @classmethod
    def _where(cls, data: dict) -> str:
        layer = data.get("layer")
        return f"plan layer {layer}" if isinstance(layer, int) else "plan layer entry"

    @property
    def untouched(self) -> bool:
        """Whether applying this entry leaves the layer as it is."""
        return False

    def check_routing(self, limits: RoutingLimits) -> None:
        """Raise if the layer's router could not pick `limits.top_k` experts after this action.
        Only actions that keep a router over fewer experts can fail it."""


class _Selecting(_Layer):
    """An action that keeps some routed experts (original ids); `scores` (one per expert, the
    method's ranking) and `clusters` (one cluster id per expert) are the method's notes."""

    keep: list[ExpertIndex] = Field(description="a list of expert indices (integers >= 0)")
    scores: list[float] | None = Field(None, description="null or a list of finite numbers")
    clusters: list[ExpertIndex] | None = Field(None, description="null or a list of integers >= 0")

    @model_validator(mode="after")
    def _kept_experts_exist(self) -> Self:
        where = f"plan layer {self.layer}"
        if len(set(self.keep)) != len(self.keep):
            raise MoECompressError(f"{where}: kept experts contain duplicates: {self.keep}.")
        bad = [e for e in self.keep if not e < self.num_experts]
        if bad:
            raise MoECompressError(f"{where}: expert indices {bad} are out of range 0..{self.num_experts - 1}.")
        return self

    @property
    def removed(self) -> list[int]:
        kept = set(self.keep)
        return [e for e in range(self.num_experts) if e not in kept]

    @property
    def untouched(self) -> bool:
        return len(self.keep) == self.num_experts


class _Routed(_Selecting):
    """An action after which the router picks among the kept experts alone: each token still
    needs top_k of them, and a grouped router the same number in every group."""

    def check_routing(self, limits: RoutingLimits) -> None:
        where = f"plan layer {self.layer}"
        if len(self.keep) < limits.top_k:
            raise MoECompressError(
                f"{where} keeps {len(self.keep)} experts, fewer than top_k={limits.top_k}: every token routes to "
                f"{limits.top_k} experts. Keep at least {limits.top_k} experts per layer (lower the ratio)."
            )
        if limits.groups > 1:
            size = self.num_experts // limits.groups
            per_group = [sum(1 for e in self.keep if e // size == g) for g in range(limits.groups)]
            if len(set(per_group)) != 1 or per_group[0] < limits.min_units():
                raise MoECompressError(
                    f"{where}: group-limited routing needs the same number of kept experts in each of its "
                    f"{limits.groups} groups, at least {limits.min_units()} each; this plan keeps {per_group}."
                )


class KeepLayer(_Routed):
    """Plain expert pruning: kept experts keep their weights and router rows, the rest are deleted."""

    action: Literal["keep"] = "keep"


class NoviceLayer(_Selecting):
    """MoNE: every removed expert is replaced by a constant vector (`Plan.novice_vectors`, zeros
    when the plan carries none), and its router row stays, so top_k stays reachable whatever is
    kept; one real expert must stay."""

    action: Literal["novices"] = "novices"

    @model_validator(mode="after")
    def _keeps_an_expert(self) -> Self:
        if not self.keep:
            raise MoECompressError(f"plan layer {self.layer} keeps no expert; with novices at least one real expert must stay.")
        return self


class MergeLayer(_Routed):
    """Kept expert i (ascending ids) becomes the weighted average of the experts `merges[i]`
    (itself first) with `merge_weights[i]`; its router row is the same average of theirs
    ("weighted") or its own ("centroid"). Neuron permutations aligning the members, if any,
    are `Plan.merge_permutations`."""

    action: Literal["merge"] = "merge"
    merges: list[list[ExpertIndex]] = Field(description="a list of lists of expert indices")
    merge_weights: list[list[float]] = Field(description="a list of lists of finite numbers")
    merge_router: Literal["weighted", "centroid"] = Field("weighted", description=f"one of {', '.join(MERGE_ROUTERS)}")

    @model_validator(mode="after")
    def _groups_fit(self) -> Self:
        """One group per kept expert (itself first), disjoint, with one weight per member."""
        where = f"plan layer {self.layer}"
        if len(self.merges) != len(self.keep) or [group[:1] for group in self.merges] != [[e] for e in sorted(self.keep)]:
            raise MoECompressError(f"{where}: merges need one group per kept expert, in ascending order, each starting with that expert.")
        if [len(w) for w in self.merge_weights] != [len(g) for g in self.merges]:
            raise MoECompressError(f"{where}: merge_weights need one weight per merged expert.")
        if any(v < 0 for w in self.merge_weights for v in w) or any(sum(w) <= 0 for w in self.merge_weights):
            raise MoECompressError(f"{where}: merge weights must be finite, non-negative and not all zero in a group.")
        members = [e for group in self.merges for e in group]
        if any(not e < self.num_experts for e in members) or len(set(members)) != len(members):
            raise MoECompressError(f"{where}: merged experts must be distinct ids in 0..{self.num_experts - 1}; got {self.merges}.")
        return self

    def check_routing(self, limits: RoutingLimits) -> None:
        super().check_routing(limits)
        if limits.groups > 1:
            size = self.num_experts // limits.groups
            if any(e // size != group[0] // size for group in self.merges for e in group):
                raise MoECompressError(f"plan layer {self.layer}: group-limited routing: experts may only merge within their routing group of {size}.")

    def check_permutations(self, permutations: torch.Tensor) -> None:
        """Raise unless `permutations` has one row per aligned member (each group's members after
        the first, in plan order), each a permutation of the expert's neurons."""
        aligned = sum(len(group) - 1 for group in self.merges)
        valid = permutations.dim() == 2 and permutations.shape[0] == aligned
        if valid and aligned:
            ordered = torch.sort(permutations.long(), dim=1).values
            valid = torch.equal(ordered, torch.arange(permutations.shape[1]).expand_as(ordered))
        if not valid:
            raise MoECompressError(f"plan layer {self.layer}: merge permutations must be {aligned} rows, each a permutation of the expert's neurons.")


class CondenseLayer(_Selecting):
    """CD-MoE: the router is removed; every token goes through the kept experts (ascending ids),
    each scaled by its constant weight, plus the shared experts. Keeping none leaves the shared ones."""

    action: Literal["condense"] = "condense"
    condensed_weights: list[float] = Field(description="a list of finite numbers, one per kept expert")

    @model_validator(mode="after")
    def _one_weight_per_expert(self) -> Self:
        if len(self.condensed_weights) != len(self.keep) or self.keep != sorted(self.keep):
            raise MoECompressError(f"plan layer {self.layer}: a condensed layer needs one weight per kept expert, experts in ascending order.")
        return self

    @property
    def untouched(self) -> bool:
        return False


class DropMoeLayer(_Layer):
    """The MoE sub-layer is removed (attention stays): it keeps no expert."""

    action: Literal["drop_moe"] = "drop_moe"

    @property
    def keep(self) -> list[int]:
        return []

    @property
    def removed(self) -> list[int]:
        return list(range(self.num_experts))


#: One MoE layer's entry of a plan, told apart by its `action`.
LayerPlan = Annotated[KeepLayer | NoviceLayer | MergeLayer | CondenseLayer | DropMoeLayer, Field(discriminator="action")]
#: action -> the class of entries with that action
ACTIONS: dict[str, type[_Layer]] = {cls.model_fields["action"].default: cls for cls in (KeepLayer, NoviceLayer, MergeLayer, CondenseLayer, DropMoeLayer)}
