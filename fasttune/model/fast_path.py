"""Did Unsloth take its fused LoRA fast path? Read from what it logged.

Unsloth's ``get_peft_model`` swaps the forward of each decoder layer's attention (q/k/v and o)
and MLP for fused LoRA kernels when it can, and logs one summary line, "Unsloth <version>
patched N layers with N QKV layers, N O layers and N MLP layers." (through the
``unsloth_zoo.log`` logger; unsloth 2026.10.9). :func:`capture_summary` records that line while
``get_peft_model`` runs; :func:`parse_summary` reads the counts. Zero counts mean the slow path:
training still works, at roughly half the speed. Unsloth's CPU fallback patches nothing and logs
no summary: its counts are ``None``. (The settings that cost the fast path are named before
anything loads, by fasttune.machine.fast_path_losses.)
"""
from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

SUMMARY = re.compile(r"patched (\d+) layers with (\d+) QKV layers, (\d+) O layers and (\d+) MLP layers")
UNSLOTH_LOGGER = "unsloth_zoo.log"


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
