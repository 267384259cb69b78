"""Backends load the base model for training: ``hf`` (transformers + PEFT) and ``unsloth``.

Each returns ``(model, peft_config)``: either a model with LoRA already attached and ``None``, or
the base model and the ``LoraConfig`` for TRL's SFTTrainer to attach.
"""
from __future__ import annotations


def load(backend: str, source: str, recipe, plan, bound):
    if backend == "unsloth":
        from fasttune.model.backends import unsloth

        return unsloth.load(source, recipe, plan, bound)
    from fasttune.model.backends import hf

    return hf.load(source, recipe, plan, bound)
