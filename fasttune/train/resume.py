"""Interruption and resume.

Ctrl-C (or SIGTERM) during training finishes the current step, writes a checkpoint and stops; a
second Ctrl-C stops at once. ``recipe NAME --resume [RUN_DIR]`` continues the latest (or the given)
run from its last checkpoint, and refuses a recipe that changed since the run started unless
``--force`` (the differences are listed).
"""
from __future__ import annotations

import signal
from pathlib import Path

import yaml
from transformers import TrainerCallback

from fasttune.config import Recipe
from fasttune.errors import Problem, UserError


class TrainingInterrupted(Exception):
    """Training stopped on the user's request, after saving a checkpoint."""

    def __init__(self, run_dir: Path, step: int):
        self.run_dir, self.step = run_dir, step
        super().__init__(f"interrupted at step {step}; a checkpoint is in {run_dir / 'checkpoints'}")


def find_run_dir(recipe: Recipe, given: str | None, root: Path = Path("runs")) -> Path:
    """The run to resume: ``given``, else the newest ``runs/<recipe>-*`` (or ``train.output_dir``)."""
    if given:
        candidates = [Path(given)]
    elif recipe.train.get("output_dir"):
        candidates = [Path(recipe.train["output_dir"])]
    else:
        candidates = sorted(root.glob(f"{recipe.name}-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    for run_dir in candidates:
        if (run_dir / "config.yaml").is_file():
            return run_dir
    where = given or recipe.train.get("output_dir") or f"{root}/{recipe.name}-*"
    raise UserError(Problem("--resume", where, "holds no earlier run of this recipe (no config.yaml)",
                            f"start a run first: python -m fasttune recipe {recipe.name}"))


def last_checkpoint(run_dir: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    checkpoints = run_dir / "checkpoints"
    return get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None


def _flatten(value: object, prefix: str = "") -> dict[str, object]:
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value}


def recipe_differences(saved: dict, current: dict) -> list[str]:
    """``key: old -> new`` for every setting that differs (the machine section aside)."""
    before = _flatten({k: v for k, v in saved.items() if k != "machine"})
    after = _flatten({k: v for k, v in current.items() if k != "machine"})
    return [f"{key}: {before.get(key)!r} -> {after.get(key)!r}" for key in sorted(before.keys() | after.keys())
            if before.get(key) != after.get(key)]


def check_unchanged(run_dir: Path, recipe: Recipe, force: bool) -> list[str]:
    saved = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    differences = recipe_differences(saved, recipe.to_dict())
    if differences and not force:
        raise UserError(Problem("--resume", str(run_dir), "the recipe changed since this run started: " + "; ".join(differences),
                                "resume with the original settings, start a new run, or add --force to resume anyway"))
    return differences


class GracefulInterrupt(TrainerCallback):
    """A context manager and callback: the first SIGINT/SIGTERM asks for checkpoint-and-stop."""

    def __init__(self, console):
        self.console = console
        self.requested = False
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.console.print("[yellow]interrupt[/] finishing this step, saving a checkpoint, then stopping "
                           "(press Ctrl-C again to stop at once, without a checkpoint)")

    def __enter__(self) -> GracefulInterrupt:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested:
            control.should_save = True
            control.should_training_stop = True
        return control
