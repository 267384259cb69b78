"""The transformers + bitsandbytes + PEFT backend: runs anywhere, CPU included."""
from __future__ import annotations


def load(source: str, recipe, plan, bound):
    """Base model in the plan's dtype (4-bit NF4 for QLoRA); TRL attaches the LoRA config."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {
        "dtype": getattr(torch, plan.dtype),
        "attn_implementation": plan.attention,
        "revision": recipe.model.revision,
        "trust_remote_code": recipe.model.trust_remote_code,
        "use_safetensors": True,
    }
    if bound.bnb is not None:
        kwargs["quantization_config"] = bound.bnb
        # 4-bit weights are placed at load time; the Trainer cannot move a quantized model later.
        kwargs["device_map"] = {"": 0 if plan.device == "cuda" else "cpu"}
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    return model, bound.lora
