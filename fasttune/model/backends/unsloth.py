"""The Unsloth backend: ``unsloth.FastLanguageModel`` with its fused LoRA kernels (CUDA).

``import unsloth`` patches transformers, TRL and PEFT for the whole process, so it must come
before anything imports them: :func:`fasttune.model.backends.import_unsloth` does that first.
Without CUDA, Unsloth runs its CPU fallback (stock transformers + PEFT): the glue is the same, the
kernels are not there.
"""
from __future__ import annotations

import sys

from fasttune.errors import Problem, UserError
from fasttune.model import trained_adapter
from fasttune.model.fast_path import FastPathReport, capture_summary, report_from_messages
from fasttune.model.local_model import model_target_problem


def import_first() -> None:
    import unsloth  # noqa: F401  (imported for its patches; must precede transformers/TRL/PEFT)


def on_cpu_fallback() -> bool:
    """Whether the imported Unsloth is its CPU fallback (it then defines DEVICE_TYPE ``cpu``)."""
    return getattr(sys.modules.get("unsloth"), "DEVICE_TYPE", None) == "cpu"


def load_base(source: str, *, max_seq_length: int, dtype: str | None, load_in_4bit: bool, revision: str | None = None,
              trust_remote_code: bool = False, token: str | None = None, full_finetuning: bool = False):
    """Unsloth's 4-bit (NF4, double quant) or 16-bit load. Its own tokenizer is returned too."""
    import torch
    from unsloth import FastLanguageModel

    kwargs = {"model_name": source, "max_seq_length": max_seq_length, "dtype": getattr(torch, dtype) if dtype else None,
              "load_in_4bit": load_in_4bit, "trust_remote_code": trust_remote_code, "full_finetuning": full_finetuning}
    if revision:
        kwargs["revision"] = revision
    if token:
        kwargs["token"] = token
    return FastLanguageModel.from_pretrained(**kwargs)


def attach_lora(model, *, r: int, target_modules, lora_alpha: float, lora_dropout: float, bias: str,
                use_gradient_checkpointing, random_state: int, use_rslora: bool = False, modules_to_save=None,
                **kwargs) -> tuple[object, FastPathReport]:
    """LoRA through Unsloth's ``get_peft_model``, and whether it fused each layer (its log line)."""
    from unsloth import FastLanguageModel

    with capture_summary() as messages:
        model = FastLanguageModel.get_peft_model(
            model, r=r, target_modules=target_modules, lora_alpha=lora_alpha, lora_dropout=lora_dropout, bias=bias,
            use_gradient_checkpointing=use_gradient_checkpointing, random_state=random_state, use_rslora=use_rslora,
            modules_to_save=modules_to_save, **kwargs)
    return model, report_from_messages(messages, on_cpu_fallback())


def attach_trained_adapter(model, adapter: str, *, use_gradient_checkpointing) -> tuple[object, FastPathReport]:
    """An existing adapter attached trainable, then Unsloth's fused LoRA patch over it: the order of
    Unsloth's own loader for an adapter folder (unsloth 2026.10.9, models/loader.py: PEFT's
    ``PeftModel.from_pretrained(..., is_trainable=True)``, then ``patch_peft_model``). Its CPU
    fallback has no patch to apply (stock PEFT), so there the PEFT model trains as loaded."""
    from unsloth import FastLanguageModel

    model = trained_adapter.attach(model, adapter)
    if on_cpu_fallback():
        return model, report_from_messages([], True)
    patch = getattr(FastLanguageModel, "patch_peft_model", None)
    if patch is None:  # an Unsloth that renamed it: say so rather than train on stock PEFT unannounced
        import unsloth

        raise UserError(Problem("model.backend", "unsloth", f"Unsloth {getattr(unsloth, '__version__', '?')} has no "
                                "FastLanguageModel.patch_peft_model, which fasttune calls to fuse an existing adapter",
                                "use model.backend=hf, or the Unsloth version fasttune is tested with (constraints.txt)"))
    with capture_summary() as messages:
        model = patch(model, use_gradient_checkpointing)
    return model, report_from_messages(messages, False)


def load(source: str, recipe, plan, configs):
    """The runner's entry: Unsloth load + LoRA. Returns ``(model, fast path report)``."""
    lora, sft = configs.lora, configs.sft
    model, _ = load_base(source, max_seq_length=sft.max_length, dtype=plan.dtype, load_in_4bit=configs.bnb is not None,
                         revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code)

    problem = model_target_problem(recipe.lora.get("target_modules"), model, recipe.model.name)  # a hub model's targets
    if problem is not None:
        raise UserError(problem)
    if recipe.model.adapter:
        return attach_trained_adapter(model, trained_adapter.locate(recipe.model.adapter).location,
                                      use_gradient_checkpointing="unsloth" if sft.gradient_checkpointing else False)
    return attach_lora(
        model, r=lora.r, target_modules=sorted(lora.target_modules), lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout, bias=lora.bias,
        use_gradient_checkpointing="unsloth" if sft.gradient_checkpointing else False,
        random_state=sft.seed, use_rslora=lora.use_rslora, modules_to_save=lora.modules_to_save)
