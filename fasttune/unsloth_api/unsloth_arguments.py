"""The arguments of Unsloth's ``FastLanguageModel.from_pretrained`` that fasttune has no use for.

Notebooks pass several of them at their defaults (the Qwen3 notebooks write ``load_in_8bit = False,
full_finetuning = False``), so a ported cell must not stop on them; a value other than the one
fasttune can honour is refused with the reason. Names and defaults: unsloth 2026.10.9,
``unsloth/models/loader.py``, ``FastLanguageModel.from_pretrained``.
"""
from __future__ import annotations

from fasttune.errors import Problem, UserError

# name -> (the values fasttune accepts, what the argument does in Unsloth / why fasttune refuses the rest)
ACCEPTED = {
    "load_in_8bit": ((False,), "8-bit LoRA: fasttune loads in 4 bit (load_in_4bit=True) or 16 bit (load_in_4bit=False)"),
    "fast_inference": ((False,), "vLLM generation inside Unsloth: fasttune generates with transformers"),
    "gpu_memory_utilization": (None, "vLLM's memory share (fast_inference only): no effect here"),
    "max_lora_rank": (None, "vLLM's largest LoRA rank (fast_inference only): no effect here"),
    "float8_kv_cache": ((False,), "vLLM's fp8 KV cache (fast_inference only)"),
    "disable_log_stats": (None, "vLLM's logging (fast_inference only): no effect here"),
    "fix_tokenizer": (None, "Unsloth's tokenizer repairs: fasttune sets the pad token itself (never EOS)"),
    "use_exact_model_name": (None, "Unsloth maps hub ids to its own uploads unless set: fasttune loads the name given"),
    "load_in_fp8": ((False,), "fp8 LoRA: fasttune loads in 4 bit or 16 bit"),
    "unsloth_tiled_mlp": ((False,), "Unsloth's tiled MLP kernel: not in fasttune"),
    "random_state": (None, "Unsloth seeds vLLM with it (fast_inference only); get_peft_model's random_state seeds LoRA"),
    "text_only": (None, "Unsloth's switch for vision checkpoints: fasttune loads causal LMs only"),
}
"""``None``: any value is accepted (it changes nothing in fasttune)."""


def check(kwargs: dict) -> None:
    """Refuse the arguments fasttune does not know, and known ones at a value it cannot honour."""
    unknown = sorted(key for key in kwargs if key not in ACCEPTED)
    if unknown:
        raise UserError(Problem("from_pretrained", unknown, "are not arguments fasttune understands",
                                "remove them (see help(fasttune.FastLanguageModel.from_pretrained))"))
    problems = [Problem(f"from_pretrained({key}=...)", value, f"is not supported: {why}",
                        f"leave {key} at {allowed[0]!r}")
                for key, value in kwargs.items() for allowed, why in [ACCEPTED[key]]
                if allowed is not None and value not in allowed]
    if problems:
        raise UserError(problems, "cannot load the model that way")
