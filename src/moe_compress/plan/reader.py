"""Plan files of every format moe-compress ever wrote, read as the current one.

A plan file outlives the version that wrote it (it sits beside every compressed checkpoint,
and `--plan-in` replays it), so each format stays readable. The formats:

* `moe-compress/plan@1`: one record per layer with the fields of every action, unused ones
  null or false: `layer`, `num_experts`, `keep`, `scores`; later also `novices`, `clusters`,
  then `condensed_weights` and `drop`, then `merges`, `merge_weights`, `merge_router`. The
  plan grew `dropped_blocks` and `num_layers`, then `identity`, whose single `fingerprint` of
  one `fingerprint_kind` later became `fingerprints` by kind. Every variant is a fixture
  under tests/data/plans/.
* `moe-compress/plan@2` (current): a layer entry names its `action` and holds that action's
  fields only (`plan.layers`); the identity holds `fingerprints` only.

An older format is rewritten into the current one's shape here, and then validated by the
current model like any current file, so a plan is checked by one set of rules whatever wrote it.
"""

from __future__ import annotations

import json

from ..errors import MoECompressError
from .identity import FINGERPRINT_KINDS
from .layers import MERGE_ROUTERS

PLAN_FORMAT = "moe-compress/plan@2"
_FORMAT_1 = "moe-compress/plan@1"
_FLAGS = ("novices", "drop")
_LEGACY_FINGERPRINT = ("fingerprint", "fingerprint_kind")


def current_form(data: object) -> dict:
    """A parsed plan file's body (without `format`) in the current format's shape."""
    found = data.get("format") if isinstance(data, dict) else type(data).__name__
    if not isinstance(data, dict) or found not in (PLAN_FORMAT, _FORMAT_1):
        newer = isinstance(found, str) and found.startswith("moe-compress/plan@")
        raise MoECompressError(
            f"plan format {found!r} is newer than this moe-compress reads ({PLAN_FORMAT}); upgrade moe-compress." if newer else
            f"not a moe-compress plan (expected format {PLAN_FORMAT!r} or the older {_FORMAT_1!r}, got {found!r})."
        )
    body = {k: v for k, v in data.items() if k != "format"}
    return body if found == PLAN_FORMAT else _from_format_1(body)


def layer_action(entry: dict) -> str:
    """The action of a layer entry of either format."""
    return entry["action"] if "action" in entry else _format_1_action(entry)


def _format_1_action(entry: dict) -> str:
    """A format-1 record's action, read from its fields as format-1 surgery read them (drop,
    then condensed weights, then novices, then merges)."""
    if entry.get("drop"):
        return "drop_moe"
    if entry.get("condensed_weights") is not None:
        return "condense"
    if entry.get("novices"):
        return "novices"
    return "merge" if entry.get("merges") is not None else "keep"


def _from_format_1(body: dict) -> dict:
    if isinstance(body.get("layers"), list):
        body["layers"] = [_layer_from_format_1(entry, position) for position, entry in enumerate(body["layers"])]
    if isinstance(body.get("identity"), dict):
        body["identity"] = _identity_from_format_1(body["identity"])
    return body


def _layer_from_format_1(entry: object, position: int) -> object:
    """A format-1 layer record as the entry of its action: the flags become `action`, and the
    fields format 1 wrote on every layer unused (null, false, the default merge router) go."""
    if not isinstance(entry, dict):
        return entry  # refused by the current model, naming the entry
    where = f"plan layer entry {position}"
    if "action" in entry:
        raise MoECompressError(f"{where} names an action, which format {_FORMAT_1!r} has not; write the file as {PLAN_FORMAT!r}.")
    for flag in _FLAGS:
        if flag in entry and not isinstance(entry[flag], bool):
            raise MoECompressError(f"{where}: field {flag!r} must be true or false; got {json.dumps(entry[flag])[:80]}.")
    chosen = {"drop": entry.get("drop"), "condensed_weights": entry.get("condensed_weights") is not None,
              "novices": entry.get("novices"), "merges": entry.get("merges") is not None}
    if sum(map(bool, chosen.values())) > 1:
        both = [name for name, on in chosen.items() if on]
        raise MoECompressError(f"{where} combines {' and '.join(both)}; a layer takes one action: keep one of them.")
    action = _format_1_action(entry)
    body = {k: v for k, v in entry.items() if k not in _FLAGS and v is not None}
    if action != "merge" and body.get("merge_router") in MERGE_ROUTERS:
        del body["merge_router"]
    if action == "drop_moe" and body.get("keep") == []:
        del body["keep"]
    return {"action": action, **body}


def _identity_from_format_1(identity: dict) -> dict:
    """One `fingerprint` of one `fingerprint_kind` (or none) as `fingerprints`."""
    if not any(name in identity for name in _LEGACY_FINGERPRINT):
        return identity
    where = "plan field 'identity'"
    if "fingerprints" in identity:
        raise MoECompressError(f"{where} has both 'fingerprints' and the older 'fingerprint'/'fingerprint_kind'; keep 'fingerprints' only.")
    fingerprint, kind = identity.get("fingerprint"), identity.get("fingerprint_kind", "content")
    if fingerprint is not None and not isinstance(fingerprint, str):
        raise MoECompressError(f"{where}: field 'fingerprint' must be null or a string; got {json.dumps(fingerprint)[:80]}.")
    if kind not in FINGERPRINT_KINDS:
        raise MoECompressError(f"{where}: field 'fingerprint_kind' must be 'content' or 'checkpoint'; got {json.dumps(kind)[:80]}.")
    body = {k: v for k, v in identity.items() if k not in _LEGACY_FINGERPRINT}
    return {**body, "fingerprints": {kind: fingerprint} if fingerprint else {}}
