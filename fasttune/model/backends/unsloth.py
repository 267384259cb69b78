"""The Unsloth backend: ``unsloth.FastLanguageModel`` with its fused LoRA kernels (CUDA only).

``import unsloth`` patches transformers, TRL and PEFT for the whole process, so the runner calls
:func:`import_first` before anything imports those libraries.
"""
from __future__ import annotations


def import_first() -> None:
    import unsloth  # noqa: F401  (imported for its patches; must precede transformers/TRL/PEFT)


def load(source: str, recipe, plan, bound):
    """4-bit or 16-bit base through Unsloth, LoRA attached through Unsloth's get_peft_model."""
    import torch
    from unsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(
        model_name=source,
        max_seq_length=bound.sft.max_length,
        dtype=getattr(torch, plan.dtype),
        load_in_4bit=bound.bnb is not None,
        trust_remote_code=recipe.model.trust_remote_code,
    )
    lora = bound.lora
    model = FastLanguageModel.get_peft_model(
        model,
        r=lora.r,
        target_modules=sorted(lora.target_modules),
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        bias=lora.bias,
        use_gradient_checkpointing="unsloth" if bound.sft.gradient_checkpointing else False,
        random_state=bound.sft.seed,
        use_rslora=lora.use_rslora,
    )
    return model, None
