"""A method's options as data: their types (the annotations of the method's `plan` parameters),
defaults and help, and option values given as text (`prune --option KEY=VALUE`) read by those types.

One reader for every method: a new method's options need no command-line code of their own.
"""

from __future__ import annotations

import inspect
import math
import types
import typing
from typing import Any

from ..errors import MoECompressError, param
from .registry import PROTECT, PROTECT_HELP, Method, get_method

_NONE = ("none", "null")
_BOOLS = {"true": True, "false": False}


def option_types(method: Method) -> dict[str, Any]:
    """Option name -> its type: the `plan` parameter's annotation, else the type of its default (Any for None)."""
    hints = typing.get_type_hints(method.plan) if inspect.isfunction(method.plan) else {}
    defaults = method.resolved_options({})
    return {name: hints.get(name, Any if default is None else type(default)) for name, default in defaults.items()} | {PROTECT: bool}


def type_words(annotation: Any) -> str:
    """'an integer', 'a number or none', "true or false or 'model'": what a value of this type is written as."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(type_words(a) for a in args))
    if origin is typing.Literal:
        return " or ".join(map(repr, args))
    words = {bool: "true or false", int: "an integer", float: "a finite number", str: "text", type(None): "none"}
    return words.get(annotation, "text")


def _read(annotation: Any, text: str) -> Any:
    """`text` as a value of `annotation`; ValueError when it is none."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        for member in sorted(args, key=lambda a: a is str):  # free text last: '0.5' is a number before it is text
            try:
                return _read(member, text)
            except ValueError:
                continue
        raise ValueError(text)
    if origin is typing.Literal:
        if text in args:
            return text
        raise ValueError(text)
    if annotation is type(None):
        if text.lower() in _NONE:
            return None
        raise ValueError(text)
    if annotation is bool:
        return _BOOLS[text.lower()] if text.lower() in _BOOLS else _fail(text)
    if annotation is int:
        return int(text)
    if annotation is float:
        value = float(text)
        return value if math.isfinite(value) else _fail(text)
    return text


def _fail(text: str) -> Any:
    raise ValueError(text)


def unknown_option(method: Method, key: str) -> str | None:
    """What is wrong with naming option `key` of `method` (the options it has), None when it has it."""
    types_ = option_types(method)
    return None if key in types_ else f"method {method.name!r} has no option {key!r}; its options: {', '.join(sorted(types_))}."


def read_option(method: Method, key: str, text: str, name: str | None = None) -> Any:
    """The value of option `key` of `method` given as `text`; `name` is what the error calls the option
    (default: the key). An unknown key names the known ones."""
    problem = unknown_option(method, key)
    if problem:
        raise MoECompressError(problem)
    types_ = option_types(method)
    try:
        return _read(types_[key], text)
    except ValueError:
        raise MoECompressError(f"{name or key} must be {type_words(types_[key])}; got {text!r}.") from None


def describe_options(method: Method) -> list[dict[str, str]]:
    """Each option of `method`: name, type, default and help, as text (`moe-compress methods NAME`)."""
    types_ = option_types(method)
    helps = {**method.option_help, PROTECT: PROTECT_HELP}

    def shown(value: Any) -> str:
        return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)

    return [{"name": name, "type": type_words(types_[name]), "default": shown(default), "help": helps.get(name, "-")}
            for name, default in {**method.options, PROTECT: method.protect_default}.items()]


#: Options that count things (clusters, probe tokens, sequences per batch): at least one.
COUNTS = ("clusters", "probe_tokens", "global_clusters", "batch")


def read_options(method: str, given: dict[str, tuple[str, Any]], pairs: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """A method's option dict from options as a user gave them: key -> (the name the user wrote, its value:
    text, read by the option's type, or a value already typed), and `pairs` of text, KEY=VALUE (`prune
    --option`), each key given once. Counting options must be at least one."""
    given = dict(given)
    for pair in pairs:
        key, sep, text = (part.strip() for part in pair.partition("="))
        if not sep or key in given:
            raise MoECompressError(f"{param('option')} {pair}: give each option once, as KEY=VALUE (`moe-compress methods {method}` lists them).")
        given[key] = (f"{param('option')} {key}", text)
    for key in COUNTS:  # typed counts first: a bad count is the error even for an option the method lacks
        name, value = given.get(key, ("", None))
        if isinstance(value, int) and value < 1:
            raise MoECompressError(f"{name} must be a positive integer; got {value}.")
    chosen = get_method(method) if given else None
    options = {key: read_option(chosen, key, value, name) if isinstance(value, str) else value for key, (name, value) in given.items()}
    for key in set(COUNTS) & options.keys():
        if isinstance(options[key], int) and options[key] < 1:
            raise MoECompressError(f"{given[key][0]} must be a positive integer; got {options[key]}.")
    return options
