"""Merge a LoRA adapter into a 16-bit copy of its base model and save it (safetensors).

For QLoRA the adapter is merged into the base reloaded in 16-bit, not into the 4-bit weights:
merging into NF4 would re-quantize the sum and lose most of what was learned.
"""
from __future__ import annotations

from pathlib import Path

from fasttune.atomic_io import atomic_replace_dir, temp_dir_beside


def merge_adapter(source: str, adapter_dir: Path, out_dir: Path, tokenizer, save_dtype: str = "bfloat16",
                  revision: str | None = None, trust_remote_code: bool = False) -> Path:
    """Base + adapter merged in float32 on the CPU, saved as ``save_dtype`` to ``out_dir``."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, device_map={"": "cpu"}, revision=revision,
                                                trust_remote_code=trust_remote_code, use_safetensors=True)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged = merged.to(getattr(torch, save_dtype))
    tmp = temp_dir_beside(out_dir)
    merged.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    return atomic_replace_dir(tmp, out_dir)
