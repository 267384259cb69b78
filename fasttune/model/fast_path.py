"""Did Unsloth take its fused LoRA fast path, and which settings would make it not?

Unsloth's ``get_peft_model`` swaps the forward of each decoder layer's attention (q/k/v and o)
and MLP for fused LoRA kernels when it can, and logs one summary line, "Unsloth <version>
patched N layers with N QKV layers, N O layers and N MLP layers." (through the
``unsloth_zoo.log`` logger; unsloth 2026.10.9). :func:`capture_summary` records that line while
``get_peft_model`` runs; :func:`parse_summary` reads the counts. Zero counts mean the slow path:
training still works, at roughly half the speed. Unsloth's CPU fallback patches nothing and logs
no summary: its counts are ``None``.

:func:`fast_path_losses` names, before any weights load, the recipe settings that make Unsloth
skip the kernels, so the user can fix them rather than find out from a slow run.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass

SUMMARY = re.compile(r"patched (\d+) layers with (\d+) QKV layers, (\d+) O layers and (\d+) MLP layers")
UNSLOTH_LOGGER = "unsloth_zoo.log"
FUSED_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class FastPathReport:
    """The patched-layer counts Unsloth reported; ``None`` where it reported none."""

    layers: int | None
    qkv: int | None
    o: int | None
    mlp: int | None
    note: str = ""
    """Unsloth's own explanation after the counts, if it gave one, or why there are no counts."""

    @property
    def fused(self) -> bool:
        """Every layer's attention and MLP run the fused kernels."""
        return bool(self.layers) and self.qkv == self.o == self.mlp == self.layers

    def describe(self) -> str:
        if self.layers is None:
            return f"fast path not reported ({self.note})" if self.note else "fast path not reported"
        counts = f"{self.qkv}/{self.layers} QKV, {self.o}/{self.layers} O, {self.mlp}/{self.layers} MLP layers fused"
        if self.fused:
            return f"fast path taken: {counts}"
        return f"SLOW PATH: {counts}" + (f" ({self.note})" if self.note else "")


def parse_summary(text: str) -> FastPathReport | None:
    """The counts in Unsloth's summary line, or ``None`` if ``text`` holds no such line."""
    found = SUMMARY.search(text)
    if found is None:
        return None
    layers, qkv, o, mlp = (int(n) for n in found.groups())
    note = text[found.end():].strip(" .\n")
    return FastPathReport(layers, qkv, o, mlp, note)


class _Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def capture_summary() -> Iterator[list[str]]:
    """Collect what Unsloth logs inside the block (its summary is a warning, shown regardless)."""
    recorder = _Recorder()
    logger = logging.getLogger(UNSLOTH_LOGGER)
    logger.addHandler(recorder)
    try:
        yield recorder.messages
    finally:
        logger.removeHandler(recorder)


def report_from_messages(messages: Sequence[str], cpu_fallback: bool) -> FastPathReport:
    for message in messages:
        report = parse_summary(message)
        if report is not None:
            return report
    if cpu_fallback:
        return FastPathReport(None, None, None, None, "Unsloth's CPU fallback: stock PEFT, no fused kernels")
    return FastPathReport(None, None, None, None, "Unsloth logged no patch summary")


def fast_path_losses(target_modules: Collection[str] | str | None, lora_dropout: float, bias: str, dtype: str) -> list[str]:
    """The settings that make Unsloth skip its fused kernels, each as ``key=value: why``."""
    losses = []
    if target_modules is not None and not isinstance(target_modules, str):
        missing = [name for name in FUSED_TARGETS if name not in target_modules]
        if missing:
            losses.append(f"lora.target_modules lacks {', '.join(missing)}: the fused kernels need LoRA on all of "
                          f"{', '.join(FUSED_TARGETS)}")
    if lora_dropout and os.environ.get("UNSLOTH_FUSED_LORA_DROPOUT", "1") == "0":
        # unsloth 2026.10.9 fuses dropout too, unless this variable turns that off (older releases never did).
        losses.append(f"lora.lora_dropout={lora_dropout}: with UNSLOTH_FUSED_LORA_DROPOUT=0 the fused kernels need dropout 0")
    if bias != "none":
        losses.append(f"lora.bias={bias}: the fused kernels need bias none")
    if dtype == "float32":
        losses.append("model.dtype=float32: the fused kernels need a 16-bit base (bfloat16 or float16)")
    return losses
