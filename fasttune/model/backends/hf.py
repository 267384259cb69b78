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


def keep_adapter_in_plan_dtype(model, plan) -> None:
    """Undo TRL's bf16 cast of QLoRA adapters where bf16 is not the plan.

    TRL 1.14.2's SFTTrainer casts every trainable parameter of a quantized model to bfloat16 (the
    QLoRA paper's choice, trl/trainer/sft_trainer.py). On a CPU, or a GPU without bf16, most small
    updates then round away; the adapter trains in float32 there (fp16 AMP needs fp32 masters).
    """
    import torch

    if plan.dtype == "bfloat16":
        return
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
