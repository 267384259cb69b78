"""Qwen3 dense models (``model_type: qwen3``)."""
from fasttune.families.base import LLAMA_STYLE_TARGETS, Family

FAMILY = Family(
    model_type="qwen3",
    chat_template="qwen3",
    target_modules=LLAMA_STYLE_TARGETS,
    pad_candidates=("<|endoftext|>",),
    unsloth=True,
    qk_norms=True,
    # llama.cpp's "neox" RoPE (Hugging Face's): no q/k reordering; q_norm/k_norm become attn_q_norm/attn_k_norm.
    gguf_arch="qwen3",
)
