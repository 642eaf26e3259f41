"""The strict base of every plan object, and its errors in one line a user can act on.

A plan file can be edited by hand, so nothing in it is trusted: every field has an exact type
(`keep: 1.5` is refused, not truncated; `true` is not an integer), every number is finite,
and a key the object does not know is refused rather than ignored (a misspelt field would
otherwise silently fall back to its default). Each field's `description` says what it must
be, and pydantic's error becomes one `MoECompressError` line naming the object, the field
and that description, whether the plan was read from a file or built in code.
"""

from __future__ import annotations

import json
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, ValidatorFunctionWrapHandler, model_validator
from pydantic_core import ErrorDetails

from ..errors import MoECompressError

#: the validation context of `Strict.parse`
_PARSING = {"parsing": "plan file"}
#: error types that mean "this is not an object at all"
_NOT_AN_OBJECT = {"model_type", "model_attributes_type", "dict_type"}


class Strict(BaseModel):
    """Unknown keys refused, types exact, numbers finite; frozen unless a subclass says otherwise."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)

    @model_validator(mode="wrap")
    @classmethod
    def _one_line(cls, data: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo) -> Any:
        """An object built in code raises `MoECompressError`; inside `parse` the error is left to
        `parse`, which knows where in the file it is (a layer entry's position, say)."""
        if info.context == _PARSING:
            return handler(data)
        try:
            return handler(data)
        except ValidationError as exc:
            raise MoECompressError(describe(exc, cls, data, cls._where(data if isinstance(data, dict) else {}))) from None

    @classmethod
    def parse(cls, data: object, where: str) -> Self:
        """`data` (parsed JSON) as this model; `where` names it in errors."""
        try:
            return cls.model_validate(data, context=_PARSING)
        except ValidationError as exc:
            raise MoECompressError(describe(exc, cls, data, where)) from None

    @classmethod
    def _where(cls, data: dict) -> str:
        """How errors name an object built in code from `data`."""
        return "plan"

    @classmethod
    def _site(cls, loc: tuple, where: str) -> tuple[type[Strict], str, tuple, tuple]:
        """For an error at `loc`: the model it is in, how errors name that, the keys leading to
        it in the input, and the rest of `loc` inside it.

        A model holding others overrides this so an error deep in a plan names the layer entry
        or sub-object it is in (and skips a union's tag, which `loc` holds but the input does not).
        """
        return cls, where, (), loc


def describe(exc: ValidationError, model: type[Strict], data: object, where: str) -> str:
    """The first problem of `exc` as one line: unknown fields first (a misspelt key explains the
    missing one), then the first error in field order."""
    errors = exc.errors()
    unknown = [e for e in errors if e["type"] == "extra_forbidden"]
    error = (unknown or errors)[0]
    owner, named, path, rest = model._site(error["loc"], where)
    found = _value(data, path)
    if not rest:
        return _whole(error, named, found)
    name = str(rest[0])
    field = owner.model_fields.get(name)
    expected = field.description if field is not None else None
    if error["type"] == "extra_forbidden":
        names = sorted(str(e["loc"][-1]) for e in unknown if model._site(e["loc"], where)[1] == named)
        return f"{named} has unknown field(s) {names}; known: {', '.join(owner.model_fields)}."
    if error["type"] == "missing":
        return f"{named} lacks the required field {name!r} ({expected})."
    if error["type"] == "finite_number":
        return f"{named}: field {name!r} must be {expected}; {name} {'contain' if len(rest) > 1 else 'is'} NaN or Inf."
    return f"{named}: field {name!r} must be {expected}; got {_shown(_value(found, rest[:1]))}."


def _whole(error: ErrorDetails, where: str, value: object) -> str:
    """An error about an object as a whole: not an object, or an unknown or missing tag."""
    context = error.get("ctx") or {}
    if error["type"] == "union_tag_invalid":
        return f"{where}: field {context['discriminator']} must be one of {context['expected_tags']}; got {context['tag']!r}."
    if error["type"] == "union_tag_not_found":
        return f"{where} lacks the required field {context['discriminator']}."
    if error["type"] in _NOT_AN_OBJECT:
        return f"{where} must be a JSON object; got {_shown(value)}."
    return f"{where}: {error['msg']}."


def _value(data: object, loc: tuple) -> object:
    """What `data` (a dict from JSON, or the keywords of a model built in code) holds at `loc`."""
    for part in loc:
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and isinstance(part, int) and part < len(data):
            data = data[part]
        elif isinstance(data, BaseModel) and isinstance(part, str) and hasattr(data, part):
            data = getattr(data, part)
    return data


def _shown(value: object) -> str:
    return json.dumps(value, default=repr)[:80]
