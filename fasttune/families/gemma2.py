"""Gemma 2 instruct models (``model_type: gemma2``)."""
from fasttune.families.base import LLAMA_STYLE_TARGETS, Family

FAMILY = Family(
    model_type="gemma2",
    chat_template="gemma",
    target_modules=LLAMA_STYLE_TARGETS,
    # Gemma's vocabulary has a real <pad> (id 0); turns end with <end_of_turn>.
    pad_candidates=("<pad>",),
    unsloth=True,
    decoder_norms=4,  # input, post-attention, pre- and post-feedforward
    gguf_arch="gemma2",
    gguf_norm_plus_one=True,
    # Soft-capping of attention scores and final logits, and the window of its sliding-window layers.
    gguf_metadata=("attn_logit_softcapping", "final_logit_softcapping", "sliding_window"),
)
