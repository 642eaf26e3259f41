"""The identity of the model a plan was made for, and the check that it is the model at hand.

An unchecked plan applied to other weights writes a wrong model without a word, so a plan
records what it was made for (model type, decoder layers, experts per MoE layer, top-k,
hidden size, routing groups, weights fingerprints) and applying it compares that record
with the model, never the plan's own fields.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from ..errors import MoECompressError, param, warn
from .strict import Strict

FINGERPRINT_KINDS = ("content", "checkpoint")
#: How a run computes each kind of fingerprint (said when a plan's kind cannot be compared).
_COMPUTED_BY = {"content": f"the model loaded in memory: {param('streaming')} off", "checkpoint": "the model opened from its checkpoint directory"}
IGNORE_OPTION = param("ignore_plan_identity")

Positive = Annotated[int, Field(ge=1)]


class ModelIdentity(Strict):
    """What identifies the model a plan was made for.

    `fingerprints` hashes the weights, by kind: "content" (every byte of every tensor of an
    in-memory model, `walk.cache.content_fingerprint`) and "checkpoint" (the safetensors
    headers, sizes and mtimes of the checkpoint the weights were read from, unchanged,
    `walk.cache.checkpoint_fingerprint`). A run records every kind it can compute cheaply:
    a model loaded whole from a checkpoint both, a streamed one (whose bytes are never all in
    memory) the checkpoint's, a model handed over in memory its content's. Two fingerprints
    are compared only when they are of the same kind, so both kinds let a plan made in
    memory be applied streamed and the other way round. (Plans of format 1 written before the
    two kinds were recorded together hold one `fingerprint` of one `fingerprint_kind`: the
    reader turns them into a one-entry `fingerprints`.)
    """

    model_type: str = Field(min_length=1, description="a model type name")
    num_layers: Positive = Field(description="a positive integer")
    experts_per_layer: dict[Annotated[int, Field(ge=0)], Positive] = Field(
        description="an object mapping layer numbers to positive expert counts"
    )
    top_k: Positive = Field(description="a positive integer")
    hidden_size: Positive = Field(description="a positive integer")
    routing_groups: Positive = Field(1, description="a positive integer")
    groups_per_token: Positive = Field(1, description="a positive integer")
    fingerprints: dict[Literal["content", "checkpoint"], Annotated[str, Field(min_length=1)]] = Field(
        default_factory=dict, description="an object mapping 'content' and/or 'checkpoint' to fingerprint strings"
    )
    dtype: str | None = Field(None, description="null or a string")

    @classmethod
    def _where(cls, data: dict) -> str:
        return "plan field 'identity'"

    @field_validator("experts_per_layer", mode="before")
    @classmethod
    def _layer_numbers(cls, value: object) -> object:
        """JSON object keys are strings: read "3" as layer 3 (anything else stays and is refused)."""
        if isinstance(value, dict):
            return {int(k) if isinstance(k, str) and k.isdigit() else k: v for k, v in value.items()}
        return value

    @property
    def own_fingerprint(self) -> str | None:
        """The one fingerprint caches are keyed by: the content hash of weights in memory, else the checkpoint's."""
        return self.fingerprints.get("content") or self.fingerprints.get("checkpoint")

    def check_made_for(self, model: ModelIdentity, ignore_fingerprint: bool) -> None:
        """Raise unless `model` (the model at hand) is the one this identity records.

        The structure must always match; the weights must match by every fingerprint kind both
        record. When no kind can be compared, the plan is refused as unchecked; with
        `ignore_fingerprint` (--ignore-plan-identity) both weights refusals become a warning.
        """
        for name in ("model_type", "num_layers", "experts_per_layer", "top_k", "hidden_size"):
            if getattr(self, name) != getattr(model, name):
                raise MoECompressError(
                    f"plan was made for a model with {name} {getattr(self, name)}; this model has {getattr(model, name)}. "
                    "Apply a plan only to the model it was made for."
                )
        shared = [kind for kind in FINGERPRINT_KINDS if kind in self.fingerprints and kind in model.fingerprints]
        if not shared:
            recorded = self.fingerprints
            why = "records no weights fingerprint" if not recorded else (
                f"records only a {' and a '.join(recorded)} fingerprint, which this run cannot compute (that needs "
                f"{' or '.join(_COMPUTED_BY[k] for k in recorded)})"
            )
            unchecked(why, ignore_fingerprint)
            return
        differing = [kind for kind in shared if self.fingerprints[kind] != model.fingerprints[kind]]
        if differing:
            kind = differing[0]
            dtype = f" (it was made on {self.dtype} weights, these are {model.dtype}: load with {param('dtype')} {self.dtype})" if self.dtype != model.dtype else ""
            message = (
                f"plan was made for other weights of this architecture ({kind} fingerprint {self.fingerprints[kind]}, this model "
                f"{model.fingerprints[kind]}){dtype}"
            )
            if not ignore_fingerprint:
                raise MoECompressError(f"{message}. Recompute the plan for these weights, or pass {IGNORE_OPTION} to apply it anyway.")
            warn(f"{message}; applied anyway, as {IGNORE_OPTION} asks.")


def unchecked(why: str, ignore: bool) -> None:
    """Refuse a plan whose weights cannot be compared with the model's, or with `ignore` warn and go on."""
    if not ignore:
        raise MoECompressError(
            f"this plan {why}, so nothing shows it was made for these weights. Recompute the plan for this model, "
            f"or pass {IGNORE_OPTION} to apply it unchecked."
        )
    warn(f"this plan {why}: applied with {IGNORE_OPTION}, checked against the model's layers and experts, not its weights.")
