"""What the user watches while ``Trainer.train()`` runs.

On a terminal: one live rich bar with step/max_steps, epoch, latest loss, learning rate, tokens/s,
elapsed and remaining time, and peak GPU memory when CUDA is present. Anywhere else (CI logs, a
file, a pipe, a dumb terminal): no cursor tricks, one plain line per logging step. Evaluations
and the end-of-training summary are printed as lines in both cases. Only the main process draws.

Use it through ``use_rich_progress(trainer)``, which also removes the trainer's own tqdm bar, and
hold it as a context manager so the live display is stopped even when training raises::

    with use_rich_progress(trainer) as progress:
        trainer.train()
"""
from __future__ import annotations

import time
from typing import Any, Iterable

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn
from transformers import PrinterCallback, ProgressCallback, TrainerCallback
from transformers import trainer as hf_trainer

from fasttune.report import eval_set_of
from fasttune.train.metrics_log import name_the_eval_set

# Keys that say nothing to a person watching: total_flos is a cumulative FLOP count and epoch is
# already shown with the step.
_QUIET_KEYS = ("total_flos", "epoch")


class RichProgress(TrainerCallback):
    """A rich display of training progress, as a ``TrainerCallback``.

    Args:
        console: where to draw; a default ``rich.console.Console()`` (stdout) when not given. The
            live bar is used only when ``console.is_interactive`` (a real, non-dumb terminal).
        tokens_per_step: tokens one optimizer step consumes, when the caller knows it (packed
            fixed-length batches: ``batch_size * grad_accum * seq_len * world_size``). Without it
            tokens/s comes from ``state.num_input_tokens_seen`` when the trainer counts tokens
            (``TrainingArguments(include_num_input_tokens_seen="all" | "non_padding")``), else from
            the ``num_tokens`` that TRL's ``SFTTrainer`` logs, else it is not shown.
        eval_sets: the names of the named eval sets (``trainer.eval_dataset``'s keys when it is a dict):
            each set's evaluation is shown as ``eval <name>``, its metrics without ``eval_<name>_``.
    """

    def __init__(self, console: Console | None = None, tokens_per_step: int | None = None, eval_sets: Iterable[str] = ()):
        self.console = console if console is not None else Console()
        self.tokens_per_step = tokens_per_step
        self.eval_sets = tuple(eval_sets)
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._reset()

    def _reset(self) -> None:
        self._start = time.monotonic()
        self._start_step = 0
        self._start_tokens = 0
        self._trainer_counts_tokens = False
        self._logged_tokens: int | None = None
        self._loss: float | None = None
        self._lr: float | None = None
        self._cuda = False

    # -- context manager: the display never outlives a failed train() --

    def __enter__(self) -> RichProgress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the live display if one is running; safe to call any number of times."""
        if self._progress is not None:
            progress, self._progress, self._task = self._progress, None, None
            progress.stop()

    # -- trainer events --

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.close()
        self._reset()
        self._start_step = state.global_step
        self._start_tokens = state.num_input_tokens_seen
        counting = getattr(args, "include_num_input_tokens_seen", "no")
        self._trainer_counts_tokens = counting not in ("no", False)
        self._cuda = torch.cuda.is_available()
        if self.console.is_interactive:
            self._progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"),
                console=self.console,
                refresh_per_second=4,
            )
            self._task = self._progress.add_task(
                "train", total=state.max_steps, completed=state.global_step, stats=self._stats(state)
            )
            self._progress.start()

    def on_step_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self._refresh(state)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if "num_tokens" in logs:
            self._logged_tokens = int(logs["num_tokens"])
        if "loss" in logs:
            self._loss = logs["loss"]
            self._lr = logs.get("learning_rate", self._lr)
            if self._progress is not None:
                self._refresh(state)
            else:
                self._print(f"step {state.global_step}/{state.max_steps}  {self._stats(state)}")
        elif any(key.startswith("eval_") for key in logs):
            name = eval_set_of(logs, self.eval_sets)
            label = f"eval {name}" if name else "eval"
            shown = _key_values(name_the_eval_set(logs, self.eval_sets), f"eval_{name}_" if name else "eval_")  # TRL's metrics too: no eval_ left
            self._print(f"{label}  step {state.global_step}/{state.max_steps}  {shown}")
        elif "train_runtime" in logs:
            self._print(f"done  step {state.global_step}/{state.max_steps}  {_key_values(logs, '')}")
        else:
            self._print(f"log  step {state.global_step}/{state.max_steps}  {_key_values(logs, '')}")

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self._refresh(state)
            self.close()

    # -- drawing --

    def _refresh(self, state) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=state.global_step, stats=self._stats(state))

    def _print(self, line: str) -> None:
        # markup/highlight off: logged values are data, not rich markup, and CI logs get no escape
        # codes. soft_wrap keeps each record on one line whatever the console width.
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def _tokens(self, state) -> int | None:
        if self.tokens_per_step:
            return (state.global_step - self._start_step) * self.tokens_per_step
        if self._trainer_counts_tokens:
            return state.num_input_tokens_seen - self._start_tokens
        return self._logged_tokens

    def _stats(self, state) -> str:
        elapsed = time.monotonic() - self._start
        done = state.global_step - self._start_step
        parts = []
        if state.epoch is not None:
            parts.append(f"epoch {state.epoch:.2f}")
        if self._loss is not None:
            parts.append(f"loss {self._loss:.4f}")
        if self._lr is not None:
            parts.append(f"lr {self._lr:.2e}")
        tokens = self._tokens(state)
        if tokens and elapsed > 0:
            parts.append(f"{tokens / elapsed:,.0f} tok/s")
        parts.append(f"elapsed {_clock(elapsed)}")
        if done > 0 and state.max_steps > 0:
            parts.append(f"remaining {_clock((state.max_steps - state.global_step) * elapsed / done)}")
        if self._cuda:
            parts.append(f"peak mem {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
        return "  ".join(parts)


def use_rich_progress(
    trainer, console: Console | None = None, tokens_per_step: int | None = None
) -> RichProgress:
    """Replace ``trainer``'s default progress output with a ``RichProgress`` and return it.

    The trainer adds a tqdm bar (or, with ``disable_tqdm``, a printer of raw log dicts; in
    notebooks, its notebook widget) in its constructor; two displays would fight over the
    terminal, so those are removed. The named eval sets are the keys of ``trainer.eval_dataset``
    when it is a dict (what transformers' Trainer evaluates set by set).
    """
    for default in {ProgressCallback, PrinterCallback, hf_trainer.DEFAULT_PROGRESS_CALLBACK}:
        while trainer.pop_callback(default) is not None:
            pass
    eval_dataset = getattr(trainer, "eval_dataset", None)
    eval_sets = tuple(eval_dataset) if isinstance(eval_dataset, dict) else ()
    progress = RichProgress(console=console, tokens_per_step=tokens_per_step, eval_sets=eval_sets)
    trainer.add_callback(progress)
    return progress


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _key_values(logs: dict[str, Any], prefix: str) -> str:
    shown = {key.removeprefix(prefix): value for key, value in logs.items() if key not in _QUIET_KEYS}
    return "  ".join(f"{key} {_number(value)}" for key, value in shown.items())


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}"
