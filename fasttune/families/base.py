"""What a model family is: the facts that differ per Hugging Face ``model_type``.

A family holds facts (LoRA targets, chat template, pad policy, Unsloth support, GGUF
architecture); settings live in recipes. Adding a family is one module in this package plus its
recipe files.
"""
from __future__ import annotations

from dataclasses import dataclass

# The seven projections of a Llama-style decoder layer. LoRA on all of them is one of the
# conditions for Unsloth's fused fast path (unsloth 2026.10.9, FastLanguageModel.get_peft_model).
LLAMA_STYLE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Family:
    """One model family, keyed by its Hugging Face ``model_type``."""

    model_type: str
    """``config.model_type`` of the checkpoints this family covers (e.g. ``"mistral"``)."""
    display_name: str
    """Human name for tables (e.g. ``"Mistral"``)."""
    chat_template: str
    """Name of the default training chat template (a ``.jinja`` in ``families/templates``)."""
    target_modules: tuple[str, ...]
    """Module names LoRA adapts; all projections of the layer by default."""
    pad_candidates: tuple[str, ...]
    """Tokens to pad with, in order of preference. Never the end-of-turn token: that one is trained."""
    unsloth: bool
    """Whether Unsloth's ``FastLanguageModel`` supports this family."""
    gguf_arch: str
    """llama.cpp's architecture name (``general.architecture`` in a GGUF file)."""
    trust_remote_code: bool = False
    """Whether checkpoints of this family need custom code (none of the shipped ones do)."""
