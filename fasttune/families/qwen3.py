"""Qwen3 dense models (``model_type: qwen3``)."""
from fasttune.families.base import LLAMA_STYLE_TARGETS, Family

FAMILY = Family(
    model_type="qwen3",
    display_name="Qwen 3",
    chat_template="qwen3",
    target_modules=LLAMA_STYLE_TARGETS,
    pad_candidates=("<|endoftext|>",),
    unsloth=True,
    gguf_arch="qwen3",
)
