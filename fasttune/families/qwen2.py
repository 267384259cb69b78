"""Qwen2 and Qwen2.5 instruct models (``model_type: qwen2``)."""
from fasttune.families.base import LLAMA_STYLE_TARGETS, Family

FAMILY = Family(
    model_type="qwen2",
    chat_template="qwen2_5",
    target_modules=LLAMA_STYLE_TARGETS,
    # Qwen ends turns with <|im_end|>; <|endoftext|> (id 151643) is its documented pad token.
    pad_candidates=("<|endoftext|>",),
    unsloth=True,
    # llama.cpp's "neox" RoPE (Hugging Face's): no q/k reordering; the q/k/v biases are ordinary tensors.
    gguf_arch="qwen2",
)
