"""The transformers + bitsandbytes + PEFT backend: runs anywhere, CPU included.

QLoRA the way the paper and PEFT describe it: the base loads in 4-bit NF4 with double
quantization (the compute dtype follows the device), ``prepare_model_for_kbit_training`` readies
it (norms in fp32, input gradients, gradient checkpointing), then PEFT attaches LoRA. On CUDA, Liger
kernels are applied to the model instance when ``liger-kernel`` is installed.
"""
from __future__ import annotations

import os

from fasttune.errors import UserError
from fasttune.model import trained_adapter
from fasttune.model.local_model import model_target_problem


def under_fsdp() -> bool:
    """``accelerate launch`` with an FSDP config sets this; FSDP then places and shards the weights."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")


def device_map_for(device: str) -> dict:
    """Where quantized weights are placed at load time (the Trainer cannot move them later).

    Under torchrun or accelerate each process takes the GPU of its local rank.
    """
    if device == "cuda":
        return {"": int(os.environ.get("LOCAL_RANK", "0"))}
    return {"": "cpu"}


def load_base(source: str, *, dtype: str, attention: str, device: str, quantization=None, revision: str | None = None,
              trust_remote_code: bool = False, token: str | None = None, device_map=None):
    """The base model in ``dtype``, 4-bit when ``quantization`` (a BitsAndBytesConfig) is given.

    Safetensors only: a checkpoint that ships only pickled ``.bin`` weights is refused by transformers.
    """
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {
        "dtype": getattr(torch, dtype),
        "attn_implementation": attention,
        "revision": revision,
        "trust_remote_code": trust_remote_code,
        "use_safetensors": True,
    }
    if token:
        kwargs["token"] = token
    if quantization is not None and under_fsdp():
        # FSDP-QLoRA (bitsandbytes' guide): 4-bit weights stored in the model's float dtype, so FSDP
        # can shard them with the rest; no device_map, FSDP places the shards.
        quantization.bnb_4bit_quant_storage = kwargs["dtype"]
        kwargs["quantization_config"] = quantization
    elif quantization is not None:
        kwargs["quantization_config"] = quantization
        kwargs["device_map"] = device_map or device_map_for(device)
    elif device_map is not None:
        kwargs["device_map"] = device_map
    return AutoModelForCausalLM.from_pretrained(source, **kwargs)


def is_quantized(model) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def frozen_embeddings_in(model, dtype):
    """The frozen input embeddings and lm_head back in ``dtype`` (the loaded 16-bit one).

    ``prepare_model_for_kbit_training`` (peft 0.21.2) lifts every 16-bit parameter to float32,
    these two included: for a 128k-256k vocabulary that is 1-4 GiB more of frozen weights (the
    memory plan's ``weights``). The norms stay float32 as PEFT made them; the logits are
    computed in the 16-bit dtype, as a model without LoRA computes them, and the loss upcasts them."""
    import torch

    if dtype not in (torch.float16, torch.bfloat16):
        return model
    head = model.get_output_embeddings()
    for module in {model.get_input_embeddings(), head} - {None}:
        if not module.weight.requires_grad:
            module.weight.data = module.weight.data.to(dtype)
    if head is not None:  # the final norm's float32 weight makes its output float32
        head.register_forward_pre_hook(_to_weight_dtype)
    return model


def _to_weight_dtype(module, args):
    return (args[0].to(module.weight.dtype), *args[1:])


def ready_for_lora(model, *, gradient_checkpointing: bool, gradient_checkpointing_kwargs: dict | None = None):
    """The base readied for LoRA training: ``prepare_model_for_kbit_training`` for a 4-bit base,
    else gradient checkpointing (with input gradients) where asked."""
    from peft import prepare_model_for_kbit_training

    if is_quantized(model) and not under_fsdp():  # (its fp32 norms would break FSDP's one-dtype flat shards)
        dtype = model.get_input_embeddings().weight.dtype
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
        return frozen_embeddings_in(model, dtype)
    if gradient_checkpointing:  # 16-bit LoRA, or 4-bit under FSDP
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
        model.enable_input_require_grads()
    return model


def attach_lora(model, lora_config, *, gradient_checkpointing: bool, gradient_checkpointing_kwargs: dict | None = None):
    """``model`` with LoRA attached (a PeftModel). Seed before calling: LoRA's A matrices are random."""
    from peft import get_peft_model

    model = ready_for_lora(model, gradient_checkpointing=gradient_checkpointing,
                           gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
    return get_peft_model(model, lora_config)


def apply_liger(model, device: str) -> str | None:
    """Apply Liger's Triton kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy) to the model
    instance on CUDA. Returns what was applied, or None where Liger is absent, unsupported, or there
    is no CUDA (Triton needs a GPU driver). Call before LoRA is attached."""
    if device != "cuda":
        return None
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        return None
    try:
        _apply_liger_kernel_to_instance(model=model)
    except Exception as err:  # an architecture Liger does not know, or a Liger/transformers mismatch
        return f"Liger not applied ({type(err).__name__}: {err})"
    return "Liger (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy)"


def load(source: str, recipe, plan, configs):
    """The runner's entry: base per the plan, Liger where possible, LoRA attached per the recipe.

    Returns ``(model, kernels)``: a PeftModel (the base model itself for method ``full``) and a
    description of the extra kernels applied (or None).
    """
    model = load_base(source, dtype=plan.dtype, attention=plan.attention, device=plan.device, quantization=configs.bnb,
                      revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code)
    kernels = apply_liger(model, plan.device)
    if configs.lora is None:
        return model, kernels

    # A local model's targets were checked when the recipe resolved; a hub model's can only be here.
    problem = model_target_problem(recipe.lora.get("target_modules"), model, recipe.model.name)
    if problem is not None:
        raise UserError(problem)
    sft = configs.sft
    if recipe.model.adapter:  # train on from it: its own weights and settings, trainable
        model = ready_for_lora(model, gradient_checkpointing=sft.gradient_checkpointing,
                               gradient_checkpointing_kwargs=sft.gradient_checkpointing_kwargs)
        return trained_adapter.attach(model, trained_adapter.locate(recipe.model.adapter).location), kernels
    return attach_lora(model, configs.lora, gradient_checkpointing=sft.gradient_checkpointing,
                       gradient_checkpointing_kwargs=sft.gradient_checkpointing_kwargs), kernels


def trainable_values(model) -> dict[int, object]:
    """The trainable parameters' values, by parameter, for :func:`keep_adapter_in_plan_dtype`."""
    return {id(param): param.detach().clone() for param in model.parameters() if param.requires_grad}


def keep_adapter_in_plan_dtype(model, plan, before: dict[int, object]) -> None:
    """Undo TRL's bf16 cast of QLoRA adapters where bf16 is not the plan.

    TRL 1.14.2's SFTTrainer casts every trainable parameter of a quantized model to bfloat16 (the
    QLoRA paper's choice, trl/trainer/sft_trainer.py). On a CPU, or a GPU without bf16, most small
    updates then round away; the adapter trains in float32 there (fp16 AMP needs fp32 masters).
    ``before`` (:func:`trainable_values`, taken before SFTTrainer was built) gives back the exact
    values, not the rounded ones: an adapter trained on (``model.adapter``) starts where it ended.
    """
    import torch

    if plan.dtype == "bfloat16":
        return
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            original = before.get(id(param))
            param.data = original.float() if original is not None else param.data.float()
