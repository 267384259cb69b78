"""Llama 3.x instruct models and other ``model_type: llama`` checkpoints (SmolLM2 among them)."""
from fasttune.families.base import LLAMA_STYLE_TARGETS, Family

FAMILY = Family(
    model_type="llama",
    display_name="Llama 3 / SmolLM2",
    chat_template="llama3",
    target_modules=LLAMA_STYLE_TARGETS,
    # Llama 3.1+ reserves <|finetune_right_pad_id|> (id 128004) for padding; SmolLM2 has
    # <|endoftext|> (id 0) besides its end-of-turn <|im_end|>.
    pad_candidates=("<|finetune_right_pad_id|>", "<|endoftext|>", "<unk>"),
    unsloth=True,
    gguf_arch="llama",
)
