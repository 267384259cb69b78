"""Turning command-line text and YAML scalars into the types a config field declares (torch-free).

Used for fasttune's own recipe sections and for the library classes they feed (SFTConfig,
LoraConfig, BitsAndBytesConfig), so ``train.learning_rate=1e-4`` and ``learning_rate: 2e-4`` in
YAML (which YAML 1.1 reads as a string) both arrive as floats.
"""
from __future__ import annotations

import re
import types
import typing

import yaml

_INT = re.compile(r"^[+-]?\d+$")


def parse_value(text: str) -> object:
    """A command-line value: true/false, null, int, float, a [list] or {mapping}, else the text."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("null", "none", "~"):
        return None
    if _INT.match(text.strip()):
        return int(text)
    try:
        return float(text)
    except ValueError:
        pass
    if text.strip()[:1] in ("[", "{"):
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError:
            return text
    return text


def describe(annotation: object) -> str:
    """A short human name for a type annotation (``float``, ``int or null``, ``list of str``)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        names = [describe(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin in (list, tuple):
        args = typing.get_args(annotation)
        return f"list of {describe(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    return getattr(annotation, "__name__", str(annotation))


def coerce(value: object, annotation: object) -> object:
    """``value`` converted to ``annotation``; ``ValueError`` when it cannot be.

    Annotations this does not understand (enums, classes of a library) pass the value through
    unchanged: the library's own constructor checks those.
    """
    origin = typing.get_origin(annotation)
    if annotation is typing.Any or annotation is object:
        return value
    if origin is typing.Literal:
        if value in typing.get_args(annotation):
            return value
        raise ValueError(f"must be {describe(annotation)}")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None:
            if type(None) in args:
                return None
            raise ValueError(f"must be {describe(annotation)}")
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg)
            except ValueError:
                continue
        raise ValueError(f"must be {describe(annotation)}")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"must be {describe(annotation)}")
        args = typing.get_args(annotation)
        return [coerce(v, args[0]) for v in value] if args else list(value)
    if origin is dict:
        if isinstance(value, dict):
            return value
        raise ValueError("must be a mapping")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ValueError("must be true or false")
    if annotation is int:
        if isinstance(value, bool):
            raise ValueError("must be an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and _INT.match(value.strip()):
            return int(value)
        raise ValueError("must be an integer")
    if annotation is float:
        if isinstance(value, bool):
            raise ValueError("must be a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError("must be a number")
    if annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError("must be text")
    return value
