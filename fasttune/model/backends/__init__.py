"""Backends load the base model and attach LoRA: ``hf`` (transformers + PEFT) and ``unsloth``.

:func:`import_unsloth` runs first in a training process whose plan says ``unsloth`` (called by
fasttune.prepare.plan_machine); :func:`load` then returns ``(model, Engine)``: the model with LoRA
attached (the bare base for full fine-tuning) and what the engine actually did.
"""
from __future__ import annotations

from dataclasses import dataclass

from fasttune.errors import Problem, UserError
from fasttune.model.backends import hf, unsloth
from fasttune.model.backends.unsloth import import_first


@dataclass
class Engine:
    """What loaded the model, and how: printed, and written into config.yaml and report.md."""

    backend: str
    reason: str
    dtype: str
    attention: str
    device: str
    fast_path: object | None = None
    """fasttune.model.fast_path.FastPathReport (unsloth backend), else None."""
    kernels: str | None = None
    """Extra kernels applied on the hf backend (Liger), else None."""
    dtype_reason: str = ""
    loaded_from: tuple[str, ...] = ()
    """The local folders the weights were read from (the base, an adapter): a save must not replace them."""

    def describe(self) -> str:
        parts = [f"backend {self.backend} ({self.reason})", f"dtype {self.dtype}" + (f" ({self.dtype_reason})" if self.dtype_reason else ""), f"attention {self.attention}",
                 f"device {self.device}"]
        if self.fast_path is not None:
            parts.append(self.fast_path.describe())
        if self.kernels:
            parts.append(f"kernels: {self.kernels}")
        return "; ".join(parts)


def import_unsloth(explicit: bool, key: str = "model.backend") -> str | None:
    """Import Unsloth before transformers, TRL and PEFT. ``None`` when it imported; otherwise the
    reason to fall back to ``hf`` ("Unsloth raised X"), or a UserError when Unsloth was asked for
    by name (``explicit``)."""
    try:
        import_first()
    except Exception as err:  # any failure inside Unsloth's import (CUDA/driver/version mismatch)
        first_line = (str(err).strip().splitlines() or [""])[0][:200]
        reason = f"Unsloth raised {type(err).__name__}: {first_line}"
        if explicit:
            raise UserError(Problem(key, "unsloth", f"cannot be used: {reason}",
                                    f"use {key}=auto or {key}=hf, or repair the install: "
                                    "pip install 'fasttune[unsloth]' -c constraints.txt")) from None
        return reason
    return None


def load(source: str, recipe, plan, configs):
    """``(model, Engine)`` for ``plan.backend``. A hub id whose weights are not cached while the
    hub is unreachable (or HF_HUB_OFFLINE is set) is a SourceUnavailable that says what to do."""
    from pathlib import Path

    from fasttune import hub

    try:
        return _load(source, recipe, plan, configs)
    except OSError as err:
        if Path(source).is_dir() or not hub.offline_reason():
            raise
        raise hub.not_cached("model", source, "model.name", err) from None


def _load(source: str, recipe, plan, configs):
    engine = Engine(plan.backend, plan.backend_reason, plan.dtype, plan.attention, plan.device_name,
                    dtype_reason=plan.dtype_reason)
    if plan.backend == "unsloth":
        model, engine.fast_path = unsloth.load(source, recipe, plan, configs)
        return model, engine

    model, engine.kernels = hf.load(source, recipe, plan, configs)
    return model, engine
