"""What a model family is: the facts that differ per Hugging Face ``model_type``.

A family holds facts (LoRA targets, chat template, pad policy, Unsloth support, and what a GGUF
export must know about it); settings live in recipes. Adding a family is one module in this package
(defining ``FAMILY``; the registry finds it) plus its recipe files.
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
    chat_template: str
    """Name of the default training chat template (a ``.jinja`` in ``families/templates``)."""
    target_modules: tuple[str, ...]
    """Module names LoRA adapts; all projections of the layer by default."""
    pad_candidates: tuple[str, ...]
    """Tokens to pad with, in order of preference. Never the end-of-turn token: that one is trained."""
    unsloth: bool
    """Whether Unsloth's ``FastLanguageModel`` supports this family."""
    decoder_norms: int = 2
    """RMSNorms of hidden size in each decoder layer (their weights count in the memory plan)."""
    qk_norms: bool = False
    """Whether each decoder layer also norms queries and keys per head (a weight of head_dim each)."""
    gguf_arch: str | None = None
    """llama.cpp's architecture name (``general.architecture`` in a GGUF file); ``None``: the family
    has no GGUF export (a recipe asking for one is refused before training)."""
    gguf_interleave_qk_rows: bool = False
    """Whether the rows of ``q_proj``/``k_proj`` are reordered per head on export. llama.cpp's RoPE
    for this architecture rotates adjacent pairs of a head's dimensions (0,1), (2,3)... while
    Hugging Face rotates dimension i with i + head_dim/2; architectures on llama.cpp's "neox"
    rotation (Hugging Face's) need no reordering (convert_hf_to_gguf.py, LlamaModel.permute)."""
    gguf_norm_plus_one: bool = False
    """Whether every ``*norm.weight`` is written plus one: this family's Hugging Face RMSNorm
    multiplies by ``1 + weight``, llama.cpp's by ``weight``."""
    gguf_metadata: tuple[str, ...] = ()
    """The ``<arch>.*`` keys llama.cpp reads for this architecture beyond those every decoder has,
    named after ``gguf.GGUFWriter.add_<name>``; the export station computes each from config.json
    (``fasttune/export/gguf_writer.py``, ``_EXTRA_METADATA``)."""
