"""Phi-3 and Phi-3.5 mini instruct (``model_type: phi3``)."""
from fasttune.families.base import Family

FAMILY = Family(
    model_type="phi3",
    chat_template="phi3",
    # Phi-3 fuses q/k/v into qkv_proj and gate/up into gate_up_proj (transformers'
    # modeling_phi3.py), so LoRA targets the four projections that exist.
    target_modules=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    # <|endoftext|> (id 32000) is Phi-3's pad token; turns end with <|end|> (id 32007).
    pad_candidates=("<|endoftext|>", "<unk>"),
    # Unsloth ships its own llama-fied Phi-3 uploads (model_type llama); its fused LoRA path needs
    # separate q/k/v and gate/up projections, which native phi3 checkpoints do not have.
    unsloth=False,
    gguf_arch="phi3",
    # The fused qkv_proj and gate_up_proj are written as they are (attn_qkv, ffn_up with both
    # halves); llama.cpp splits them at run time. The RoPE dimensions follow partial_rotary_factor,
    # and a non-zero sliding window is how llama.cpp tells Phi-4-style checkpoints from Phi-3.
    gguf_metadata=("rope_dimension_count", "rope_scaling_orig_ctx_len", "sliding_window"),
)
