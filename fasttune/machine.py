"""What this machine can do, and what a run of a given recipe would use on it.

``facts()`` looks at the hardware and the installed libraries (it imports torch); ``plan()`` turns
facts + recipe into the backend, dtype, attention and device of a run, each with its reason, and
refuses a GPU recipe on a machine without one before any weights load.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

from fasttune.config import Recipe
from fasttune.errors import Problem, UserError
from fasttune.families import get_family


@dataclass(frozen=True)
class MachineFacts:
    cuda: bool
    device_name: str
    gpu_memory_gb: float | None
    bf16: bool
    """Whether the GPU computes in bfloat16 (Ampere and newer)."""
    torch_version: str
    unsloth_installed: bool


def facts() -> MachineFacts:
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


@dataclass
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
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return f"backend {self.backend} ({self.backend_reason}); dtype {self.dtype} ({self.dtype_reason}); attention {self.attention}; device {self.device_name}"


def plan(recipe: Recipe, found: MachineFacts, force_cpu: bool = False) -> MachinePlan:
    """Decide device, dtype, backend and attention for ``recipe`` on a machine with ``found``."""
    on_gpu = found.cuda and not force_cpu
    device = "cuda" if on_gpu else "cpu"
    device_name = found.device_name if on_gpu else "CPU"
    notes = []

    if recipe.model.dtype != "auto":
        dtype, dtype_reason = recipe.model.dtype, "set by the recipe"
    elif not on_gpu:
        dtype, dtype_reason = "float32", "CPU: 16-bit training on a CPU is slow and bf16 is refused by TRL there"
    elif found.bf16:
        dtype, dtype_reason = "bfloat16", f"{found.device_name} supports bf16"
    else:
        dtype, dtype_reason = "float16", f"{found.device_name} has no bf16 (pre-Ampere)"

    family = get_family(recipe.family)
    wanted = recipe.model.backend
    reasons_against = []
    if not on_gpu:
        reasons_against.append("no CUDA device" if not found.cuda else "--cpu was given")
    if not found.unsloth_installed:
        reasons_against.append("Unsloth is not installed (pip install 'fasttune[unsloth]' -c constraints.txt)")
    if not family.unsloth:
        reasons_against.append(f"Unsloth's fused path does not support family {family.model_type}")
    if recipe.method == "full":
        reasons_against.append("full fine-tuning runs on the hf backend")
    if wanted == "unsloth" and reasons_against:
        raise UserError(Problem("model.backend", "unsloth", "cannot run here: " + "; ".join(reasons_against),
                                "use model.backend=auto (falls back to transformers + PEFT), or run where the above holds"))
    if wanted == "hf":
        backend, backend_reason = "hf", "set by the recipe"
    elif reasons_against:
        backend, backend_reason = "hf", reasons_against[0]
    else:
        backend, backend_reason = "unsloth", "CUDA + Unsloth installed + supported family"

    if on_gpu and recipe.gpu_memory_gb and found.gpu_memory_gb and found.gpu_memory_gb < recipe.gpu_memory_gb:
        notes.append(f"this recipe is sized for {recipe.gpu_memory_gb} GB; {found.device_name} has {found.gpu_memory_gb} GB: "
                     "lower train.per_device_train_batch_size or train.max_length if it runs out of memory")
    return MachinePlan(device, device_name, dtype, dtype_reason, backend, backend_reason,
                       "unsloth" if backend == "unsloth" else recipe.model.attn_implementation, notes)


def require_gpu(recipe: Recipe, found: MachineFacts, force_cpu: bool) -> None:
    """Refuse, at once, a GPU recipe on a machine without CUDA (unless --cpu)."""
    if recipe.needs_gpu and not found.cuda and not force_cpu:
        raise UserError(Problem(
            "recipe", recipe.name,
            f"needs a CUDA GPU with about {recipe.gpu_memory_gb} GB; this machine has none (torch {found.torch_version})",
            f"check it without a GPU: `python -m fasttune recipe {recipe.name} --dry-run`; see the whole pipeline on "
            "this CPU: `python -m fasttune recipe demo`; or force the CPU with --cpu (tiny models only)"),
            "this recipe needs a GPU")
