"""The registry of model families, keyed by Hugging Face ``model_type`` (torch-free)."""
from __future__ import annotations

from fasttune.families import gemma2, llama, mistral, phi3, qwen2, qwen3
from fasttune.families.base import Family

FAMILIES: dict[str, Family] = {
    module.FAMILY.model_type: module.FAMILY for module in (llama, mistral, qwen2, qwen3, gemma2, phi3)
}


def get_family(model_type: str) -> Family:
    """The family for ``model_type``; ``KeyError`` naming the known ones otherwise."""
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise KeyError(f"unknown family {model_type!r}; known: {', '.join(sorted(FAMILIES))}") from None


__all__ = ["FAMILIES", "Family", "get_family"]
