"""A setting's value: text from the command line or a json value, as the value of its field's type, and the type
said in words (for problems) or in short (for --help and docs/CONFIG.md). Imports nothing heavy, as config.py."""

from __future__ import annotations

import json
import types
import typing
from typing import Any, Literal


def type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(json.dumps(c) for c in typing.get_args(tp))
    if is_optional(tp):
        return f"{type_name(strip_optional(tp))} | null"
    return {bool: "bool", int: "int", float: "float", str: "str"}[tp]


def expected_value(tp: Any) -> str:
    """What a value of `tp` is, in words, for a problem's "expected ...": true or false, a whole number, ..."""
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(json.dumps(c) for c in typing.get_args(tp))
    if is_optional(tp):
        return f"{expected_value(strip_optional(tp))}, or null"
    return {bool: "true or false", int: "a whole number", float: "a number", str: "text"}[tp]


def is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def strip_optional(tp: Any) -> Any:
    (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
    return inner


_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}
_NULL = {"null", "none"}


class BadValue(Exception):
    pass


def coerce_cli(tp: Any, text: str) -> Any:
    """A command-line string as a value of `tp`."""
    if is_optional(tp):
        return None if text.lower() in _NULL else coerce_cli(strip_optional(tp), text)
    if typing.get_origin(tp) is Literal:
        return coerce_json(tp, text)
    if tp is bool:
        if text.lower() in _TRUE | _FALSE:
            return text.lower() in _TRUE
        raise BadValue
    try:
        return tp(text)
    except ValueError:
        raise BadValue from None


def coerce_json(tp: Any, value: Any) -> Any:
    """A json value checked against `tp`: json already has types, so only widen int -> float."""
    if is_optional(tp):
        return None if value is None else coerce_json(strip_optional(tp), value)
    if typing.get_origin(tp) is Literal:
        if value in typing.get_args(tp):
            return value
        raise BadValue
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise BadValue


def cli_value(text: str | None) -> Any:
    """A command-line value of an EveryDream2 key we do not use, as its json would hold it: a bare flag is true,
    false/0/no false, null none, a number a number (so that `--disable_unet_training` is refused like `true`)."""
    if text is None or text.lower() in _TRUE | _FALSE:
        return text is None or text.lower() in _TRUE
    if text.lower() in _NULL:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def shown(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else repr(value)
