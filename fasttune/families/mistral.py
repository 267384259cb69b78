"""Mistral 7B instruct (v0.1-v0.3) and other ``model_type: mistral`` checkpoints."""
from fasttune.families.base import LLAMA_STYLE_TARGETS, Family

FAMILY = Family(
    model_type="mistral",
    chat_template="mistral",
    target_modules=LLAMA_STYLE_TARGETS,
    # Mistral's SentencePiece vocabularies have no pad token; <unk> (id 0) is never produced by
    # the tokenizer, so padding with it cannot collide with the trained </s>.
    pad_candidates=("<unk>",),
    unsloth=True,
    # llama.cpp's convert_hf_to_gguf.py writes Mistral checkpoints with the llama architecture.
    gguf_arch="llama",
    gguf_interleave_qk_rows=True,
    gguf_metadata=("vocab_size", "rope_dimension_count"),
)
