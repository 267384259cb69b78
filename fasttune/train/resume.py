"""Interruption and resume.

Ctrl-C (or SIGTERM) during training finishes the current step, writes a checkpoint and stops; a
second Ctrl-C stops at once. During the final saves and the export, SIGTERM stops like Ctrl-C:
the writers remove their temporaries, so nothing half-written is left. ``recipe NAME --resume
[RUN_DIR]`` continues the latest (or the given) run: from its newest complete checkpoint while it
was training (incomplete ones are set aside, see train/checkpoints.py), or, once its training
finished, by redoing only the exports that are missing. A recipe that changed since the run
started is refused unless ``--force`` (the differences are listed); another recipe's run is
refused by name.
"""
from __future__ import annotations

import signal
from contextlib import contextmanager
from pathlib import Path

from transformers import TrainerCallback

from fasttune.config import Recipe
from fasttune.errors import Problem, UserError
from fasttune.run_folder import CONFIG, SUMMARY, saved_config
from fasttune.train.checkpoints import newest_complete


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
        if (run_dir / CONFIG).is_file():
            return run_dir
    where = given or recipe.train.get("output_dir") or f"{root}/{recipe.name}-*"
    raise UserError(Problem("--resume", where, "holds no earlier run of this recipe (no config.yaml)",
                            f"start a run first: python -m fasttune recipe {recipe.name}"))


def last_checkpoint(run_dir: Path) -> tuple[str | None, list[str]]:
    """``(the newest complete checkpoint or None, what was set aside and why)``."""
    folder, notes = newest_complete(run_dir / "checkpoints")
    return (str(folder) if folder else None), notes


def trained_weights(run_dir: Path) -> Path | None:
    """The final weights of a run whose training finished (its summary.json is written), else None."""
    for name, marker in (("adapter", "adapter_config.json"), ("model", "config.json")):
        if (run_dir / name / marker).is_file() and (run_dir / SUMMARY).is_file():
            return run_dir / name
    return None


def missing_exports(run_dir: Path, recipe: Recipe) -> tuple[bool, list[str]]:
    """``(merged/ missing, GGUF types missing)`` of what the recipe's ``export:`` asks for."""
    types = list(recipe.export.gguf)
    gguf = [t for index, t in enumerate(types)
            if not (run_dir / "gguf" / f"{recipe.name}-{t}.gguf").is_file()
            or not (run_dir / "gguf" / ("Modelfile" if index == 0 else f"Modelfile.{t}")).is_file()]
    merged = bool(recipe.export.merged) and recipe.method != "full" and not (run_dir / "merged" / "config.json").is_file()
    return merged, gguf


@contextmanager
def terminate_raises_interrupt():
    """SIGTERM raises KeyboardInterrupt inside the block (as Ctrl-C does), so writers clean up."""
    def handle(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
    saved = saved_config(run_dir)
    if saved["name"] != recipe.name:
        raise UserError(Problem("--resume", str(run_dir), f"is a run of recipe {saved['name']!r}, not {recipe.name!r}",
                                f"resume it with its own recipe: python -m fasttune recipe {run_dir / 'config.yaml'} --resume {run_dir}"))
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
