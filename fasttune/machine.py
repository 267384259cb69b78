"""What this machine can do, and what a run of a given recipe would use on it.

``detect()`` looks at the hardware and the installed libraries (it imports torch); ``plan()`` turns
those facts + recipe into the backend, dtype, attention and device of a run, each with its reason,
and refuses a GPU recipe on a machine without one before any weights load. A plan is made once
and never changed: where Unsloth fails to import, the plan is made again with that failure
(``unsloth_failure``), by fasttune.prepare.
"""
from __future__ import annotations

import importlib.util
import os
from collections.abc import Collection
from dataclasses import dataclass

from fasttune.config import Recipe
from fasttune.errors import Problem, UserError
from fasttune.families import Family, get_family
from fasttune.families.base import LLAMA_STYLE_TARGETS


@dataclass(frozen=True)
class MachineFacts:
    cuda: bool
    device_name: str
    gpu_memory_gb: float | None
    bf16: bool
    """Whether the GPU computes in bfloat16 (Ampere and newer)."""
    torch_version: str
    unsloth_installed: bool


def detect() -> MachineFacts:
    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        props = torch.cuda.get_device_properties(0)
        return MachineFacts(True, props.name, round(props.total_memory / 2**30, 1), torch.cuda.is_bf16_supported(),
                            torch.__version__, _unsloth_installed())
    return MachineFacts(False, "CPU", None, False, torch.__version__, _unsloth_installed())


def _unsloth_installed() -> bool:
    # find_spec locates the package without importing it: importing unsloth patches transformers,
    # TRL and PEFT for the whole process, which only the training process may do.
    return importlib.util.find_spec("unsloth") is not None


@dataclass(frozen=True)
class MachinePlan:
    device: str
    """``cuda`` or ``cpu``."""
    device_name: str
    dtype: str
    """Compute dtype of the base weights and LoRA: bfloat16, float16 or float32."""
    dtype_reason: str
    backend: str
    """``unsloth`` or ``hf``."""
    backend_reason: str
    attention: str
    notes: tuple[str, ...] = ()

    def summary(self) -> str:
        return f"backend {self.backend} ({self.backend_reason}); dtype {self.dtype} ({self.dtype_reason}); attention {self.attention}; device {self.device_name}"


def plan(recipe: Recipe, facts: MachineFacts, force_cpu: bool = False, unsloth_failure: str | None = None) -> MachinePlan:
    """Decide device, dtype, backend and attention for ``recipe`` on a machine with ``facts``.

    ``unsloth_failure``: why Unsloth failed to import in this process (the backend is then ``hf``,
    with that reason)."""
    on_gpu = facts.cuda and not force_cpu
    device = "cuda" if on_gpu else "cpu"
    device_name = facts.device_name if on_gpu else "CPU"
    notes = []

    if recipe.model.dtype != "auto":
        dtype, dtype_reason = recipe.model.dtype, "set by the recipe"
    else:
        dtype, dtype_reason = device_dtype(facts, on_gpu)

    family = get_family(recipe.family)
    backend, backend_reason = choose_backend(recipe.model.backend, "model.backend", on_gpu=on_gpu, cuda=facts.cuda,
                                             unsloth_installed=facts.unsloth_installed, family=family,
                                             full=recipe.method == "full")
    if backend == "unsloth" and unsloth_failure:
        backend, backend_reason = "hf", unsloth_failure
        notes.append(f"backend falling back to hf: {unsloth_failure}")
    if backend == "unsloth" and not on_gpu:
        notes.append("Unsloth without CUDA runs its CPU fallback: stock transformers + PEFT, none of its fused kernels")
    elif backend == "unsloth":
        lora = recipe.lora  # PEFT's defaults where the recipe is silent: dropout 0, bias none
        for loss in fast_path_losses(lora.get("target_modules"), lora.get("lora_dropout", 0.0), lora.get("bias", "none"), dtype):
            notes.append(f"Unsloth's fused fast path will be skipped: {loss}")

    runs_here = on_gpu or force_cpu or not recipe.needs_gpu  # a GPU recipe on a CPU machine stops before loading anyway
    if recipe.model.attn_implementation == "flash_attention_2" and backend == "hf" and runs_here:
        # transformers refuses it only when the weights load: without CUDA, or without the flash-attn package.
        missing = "no CUDA device is in use" if not on_gpu else (
            "the flash-attn package is not installed" if importlib.util.find_spec("flash_attn") is None else "")
        if missing:
            raise UserError(Problem("model.attn_implementation", "flash_attention_2", f"cannot run here: {missing}",
                                    "use model.attn_implementation=sdpa (the default), or pip install flash-attn on a CUDA machine"))
    if on_gpu and recipe.gpu_memory_gb and facts.gpu_memory_gb and facts.gpu_memory_gb < recipe.gpu_memory_gb:
        notes.append(f"this recipe is sized for {recipe.gpu_memory_gb} GB; {facts.device_name} has {facts.gpu_memory_gb} GB: "
                     "lower train.per_device_train_batch_size or train.max_length if it runs out of memory")
    return MachinePlan(device, device_name, dtype, dtype_reason, backend, backend_reason,
                       "unsloth" if backend == "unsloth" else recipe.model.attn_implementation, tuple(notes))


def device_dtype(facts: MachineFacts, on_gpu: bool) -> tuple[str, str]:
    """``(dtype, reason)`` the device dictates: bf16 where the GPU has it, fp16 below Ampere, fp32 on the CPU."""
    if not on_gpu:
        why = "no CUDA device" if not facts.cuda else "--cpu was given"
        return "float32", f"{why}: 16-bit training on a CPU is slow and TRL refuses bf16 there"
    if facts.bf16:
        return "bfloat16", f"{facts.device_name} supports bf16"
    return "float16", f"{facts.device_name} has no bf16 (pre-Ampere)"


def choose_backend(wanted: str, key: str, *, on_gpu: bool, cuda: bool, unsloth_installed: bool, family: Family | None,
                   full: bool = False) -> tuple[str, str]:
    """``(backend, reason)`` for a request of ``auto``, ``unsloth`` or ``hf``.

    ``auto`` takes Unsloth when it is installed, a CUDA device is in use and the family is one its
    fused path supports; otherwise ``hf``, with the first reason that ruled Unsloth out. An explicit
    ``unsloth`` is honoured wherever Unsloth can run at all (without CUDA that is its CPU fallback)
    and refused, naming why, where it cannot. (An Unsloth that fails to import is handled where it is
    imported: fasttune.model.backends.import_unsloth.)
    """
    if wanted == "hf":
        return "hf", f"{key}=hf"
    blockers = []
    if not unsloth_installed:
        blockers.append("Unsloth is not installed (pip install 'fasttune[unsloth]' -c constraints.txt)")
    if family is None:
        blockers.append("fasttune has no family for this model type, so Unsloth support is unknown")
    elif not family.unsloth:
        blockers.append(f"Unsloth's fused path does not support family {family.model_type}")
    if full:
        blockers.append("full fine-tuning runs on the hf backend")
    if wanted == "unsloth":
        if blockers:
            raise UserError(Problem(key, "unsloth", "cannot run here: " + "; ".join(blockers),
                                    f"use {key}=auto (falls back to transformers + PEFT), or run where the above holds"))
        return "unsloth", f"{key}=unsloth" + ("" if on_gpu else "; no CUDA device, so Unsloth's CPU fallback")
    if not on_gpu:
        blockers.insert(0, "no CUDA device" if not cuda else "--cpu was given")
    if blockers:
        return "hf", blockers[0]
    return "unsloth", "CUDA + Unsloth installed + supported family"


def require_gpu(recipe: Recipe, facts: MachineFacts, force_cpu: bool) -> None:
    """Refuse, at once, a GPU recipe on a machine without CUDA (unless --cpu)."""
    if recipe.needs_gpu and not facts.cuda and not force_cpu:
        raise UserError(Problem(
            "recipe", recipe.name,
            f"needs a CUDA GPU with about {recipe.gpu_memory_gb} GB; this machine has none (torch {facts.torch_version})",
            f"check it without a GPU: `python -m fasttune recipe {recipe.name} --dry-run`; see the whole pipeline on "
            "this CPU: `python -m fasttune recipe demo`; or force the CPU with --cpu (tiny models only)"),
            "this recipe needs a GPU")


def fast_path_losses(target_modules: Collection[str] | str | None, lora_dropout: float, bias: str, dtype: str) -> list[str]:
    """The settings that make Unsloth skip its fused LoRA kernels, each as ``key=value: why``
    (unsloth 2026.10.9, ``FastLanguageModel.get_peft_model``): named before any weights load, so
    the user can fix them rather than find out from a slow run (fasttune.model.fast_path reads
    what Unsloth then actually did)."""
    losses = []
    if target_modules is not None and not isinstance(target_modules, str):
        missing = [name for name in LLAMA_STYLE_TARGETS if name not in target_modules]
        if missing:
            losses.append(f"lora.target_modules lacks {', '.join(missing)}: the fused kernels need LoRA on all of "
                          f"{', '.join(LLAMA_STYLE_TARGETS)}")
    if lora_dropout and os.environ.get("UNSLOTH_FUSED_LORA_DROPOUT", "1") == "0":
        # unsloth 2026.10.9 fuses dropout too, unless this variable turns that off (older releases never did).
        losses.append(f"lora.lora_dropout={lora_dropout}: with UNSLOTH_FUSED_LORA_DROPOUT=0 the fused kernels need dropout 0")
    if bias != "none":
        losses.append(f"lora.bias={bias}: the fused kernels need bias none")
    if dtype == "float32":
        losses.append("model.dtype=float32: the fused kernels need a 16-bit base (bfloat16 or float16)")
    return losses
