"""The registry of model families, keyed by Hugging Face ``model_type`` (torch-free).

Every module of this package that defines ``FAMILY`` is a family: adding one is adding its module
(and its recipes), with no list to update here. The modules hold only a ``Family`` record, so
importing them all costs a few milliseconds and no heavy library.
"""
from __future__ import annotations

import importlib
import pkgutil

from fasttune.families.base import Family


def _discover() -> dict[str, Family]:
    found: dict[str, Family] = {}
    for module_info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        family = getattr(importlib.import_module(f"{__name__}.{module_info.name}"), "FAMILY", None)
        if family is None:
            continue
        if family.model_type in found:
            raise RuntimeError(f"two family modules declare model_type {family.model_type!r}")
        found[family.model_type] = family
    return found


FAMILIES: dict[str, Family] = _discover()


def get_family(model_type: str) -> Family:
    """The family for ``model_type``; ``KeyError`` naming the known ones otherwise."""
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise KeyError(f"unknown family {model_type!r}; known: {', '.join(sorted(FAMILIES))}") from None


__all__ = ["FAMILIES", "Family", "get_family"]
