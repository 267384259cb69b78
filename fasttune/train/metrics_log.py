"""The run's written record of what the trainer logged: ``metrics.jsonl``, one JSON object a line.

Each ``Trainer.log`` call (a training logging step, an evaluation, the end-of-training summary)
becomes one line, written and flushed at once, so a killed run keeps everything it logged up to
the kill. Resuming appends to the same file, after dropping the rows of steps the resumed checkpoint does not hold. fasttune.report reads it back (``read_metrics``).
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable

from transformers import TrainerCallback

from fasttune.atomic_io import atomic_write_text
from fasttune.report import eval_set_of, metrics_path



class MetricsLog(TrainerCallback):
    """Append every ``on_log`` payload to a JSONL file, from the main process only.

    Each line holds ``step`` (``state.global_step``), ``epoch`` (``state.epoch``), ``time``
    (unix seconds), ``elapsed_s`` (seconds since this session's ``on_train_begin``, or since this
    callback was made for logs that come before training, such as a baseline evaluation), then
    every logged key as the trainer named it (``loss``, ``grad_norm``, ``learning_rate``,
    ``eval_loss``, ``train_runtime``, ...), except that in an evaluation of a named eval set TRL's own
    eval metrics carry the set's name too (:func:`name_the_eval_set`). A non-finite float is written
    as ``null``: strict JSON has no NaN, and other tools (jq, JavaScript) must be able to read the file.

    ``path`` is the file when its name ends in ``.jsonl``, otherwise the run directory that
    holds ``metrics.jsonl`` (it need not exist yet). ``eval_sets`` are the names of the named eval sets
    (the keys of ``data.eval_path``, ``PreparedData.eval_sets``); none for a single eval set.
    """

    def __init__(self, path: str | os.PathLike[str], eval_sets: Iterable[str] = ()):
        self.path = metrics_path(path)
        self.eval_sets = tuple(eval_sets)
        self._start = time.monotonic()
        self._checked_tail = False

    def on_train_begin(self, args, state, control, **kwargs):
        self._start = time.monotonic()
        if state.is_world_process_zero:
            _drop_steps_after(self.path, state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero:
            return
        record: dict[str, Any] = {
            "step": state.global_step,
            "epoch": state.epoch,
            "time": round(time.time(), 3),
            "elapsed_s": round(time.monotonic() - self._start, 3),
        }
        record.update({key: _plain(value) for key, value in name_the_eval_set(logs or {}, self.eval_sets).items()})
        self.append(record)

    def append(self, record: dict[str, Any]) -> None:
        """Write one record as a line and flush it to the operating system."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self._checked_tail:
            _drop_torn_tail(self.path)
            self._checked_tail = True
        line = json.dumps(record, allow_nan=False, ensure_ascii=False) + "\n"
        # Opened per line: logging steps are seconds apart, and a closed file cannot hold
        # unflushed data when the process is killed.
        with open(self.path, "a", encoding="utf-8") as out:
            out.write(line)


def name_the_eval_set(logs: dict[str, Any], eval_sets: Iterable[str]) -> dict[str, Any]:
    """``logs`` (a copy) with the eval metrics TRL adds named after the eval set they are of (one of the
    names ``eval_sets``, :func:`fasttune.report.eval_set_of`). TRL 1.14.2's ``SFTTrainer.log`` adds
    ``eval_entropy``, ``eval_mean_token_accuracy``, ``eval_num_tokens`` to every evaluation's logs without
    the set's name that transformers gives the rest (``eval_<name>_loss``): with several sets, each set's
    would read as every set's. They become ``eval_<name>_entropy``, ...; a key of that name already there
    (the user's compute_metrics) is left as it is. Other logs, and those of a single eval set, are unchanged."""
    name = eval_set_of(logs, eval_sets)
    if not name:
        return dict(logs)
    prefix = f"eval_{name}_"
    out = {}
    for key, value in logs.items():
        named = prefix + key[len("eval_"):] if key.startswith("eval_") and not key.startswith(prefix) else key
        out[key if named in logs else named] = value
    return out


def _plain(value: Any) -> Any:
    """A logged value as JSON can hold it: tensors and numpy scalars become Python numbers."""
    if hasattr(value, "item") and callable(value.item):
        try:
            value = value.item()
        except (ValueError, RuntimeError):
            # A tensor with more than one element: keep it readable rather than fail the run.
            value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _drop_steps_after(path: Path, step: int) -> None:
    """Training starts (or resumes) at ``step`` (the checkpoint's, 0 from the start): the rows a
    stopped session logged after it are thrown away with that session's work, so the record holds
    each step once (rows before training, such as a baseline evaluation, are step 0 and stay)."""
    if not path.exists():
        return
    _drop_torn_tail(path)
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(kept))


def _drop_torn_tail(path: Path) -> None:
    # A run killed mid-write leaves a last line without its newline. Appending after it would
    # glue the next record onto the fragment and damage both, so cut the fragment off first.
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        f.truncate(f.read().rfind(b"\n") + 1)
