"""Llama 3.x instruct models and other ``model_type: llama`` checkpoints (SmolLM2 among them)."""
from fasttune.families.base import LLAMA_STYLE_TARGETS, Family

FAMILY = Family(
    model_type="llama",
    chat_template="llama3",
    target_modules=LLAMA_STYLE_TARGETS,
    # Llama 3.1+ reserves <|finetune_right_pad_id|> (id 128004) for padding; SmolLM2 has
    # <|endoftext|> (id 0) besides its end-of-turn <|im_end|>.
    pad_candidates=("<|finetune_right_pad_id|>", "<|endoftext|>", "<unk>"),
    unsloth=True,
    gguf_arch="llama",
    gguf_interleave_qk_rows=True,
    # What llama.cpp's convert_hf_to_gguf.py (LlamaModel) writes besides the common keys.
    gguf_metadata=("vocab_size", "rope_dimension_count"),
)
