"""Checkpoints that are complete or absent, and a resume that takes the newest complete one.

The Trainer (transformers 5.17) writes ``checkpoint-N`` straight into its final folder: the
model, then the optimizer and scheduler, the RNG state and ``trainer_state.json`` last, and then
deletes the oldest checkpoints beyond ``save_total_limit``. A kill inside that window leaves a
folder that is half there, which a plain resume picks and dies on. :func:`atomic_checkpoints`
has the Trainer write each checkpoint into a hidden staging folder beside the others; the folder
is renamed into place when complete, and only then are old ones rotated out, so the newest
``checkpoint-N`` is always whole and rotation never leaves a run with only broken ones.

For folders written otherwise (an older fasttune, another tool, a disk that lost data),
:func:`checkpoint_problems` reads what a resume would read, and :func:`newest_complete`
moves an incomplete folder aside (``incomplete-checkpoint-N``) instead of deleting it.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
from pathlib import Path

from fasttune.atomic_io import atomic_replace_dir

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
STAGING = ".partial-"
"""Prefix of a checkpoint being written; hidden, and not matched by the Trainer's ``checkpoint-*``."""
INCOMPLETE = "incomplete-"
WEIGHTS = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json", "pytorch_model_fsdp_0")
"""What holds the weights: a LoRA adapter, a whole model (one file or shards), an FSDP shard folder."""
OPTIMIZER = ("optimizer.pt", "optimizer_0")
"""The optimizer state: one file, or an FSDP shard folder."""


def safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a whole safetensors file (its header must cover the file exactly), or None."""
    size = path.stat().st_size
    if size < 8:
        return f"{path.name} is {size} bytes, shorter than a safetensors header"
    with open(path, "rb") as file:
        length = int.from_bytes(file.read(8), "little")
        if 8 + length > size:
            return f"{path.name} is cut off inside its header ({size} bytes, the header alone needs {8 + length})"
        try:
            header = json.loads(file.read(length))
        except ValueError:
            return f"{path.name} has an unreadable header"
    end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    if 8 + length + end != size:
        return f"{path.name} is {size} bytes but its tensors end at byte {8 + length + end} (written only in part)"
    return None


def torch_file_problem(path: Path) -> str | None:
    """Why a ``torch.save`` file (a zip archive) cannot be read back, or None."""
    try:
        with zipfile.ZipFile(path) as archive:
            archive.infolist()
    except (zipfile.BadZipFile, OSError):
        return f"{path.name} is not a whole torch file (cut off while it was written?)"
    return None


def checkpoint_problems(folder: Path) -> list[str]:
    """What a resume from ``folder`` would trip over; empty when it is complete."""
    problems = []
    state = folder / "trainer_state.json"
    if not state.is_file():
        problems.append("trainer_state.json is missing (the Trainer writes it last)")
    else:
        try:
            json.loads(state.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            problems.append("trainer_state.json does not parse")
    if not any((folder / name).exists() for name in WEIGHTS):
        problems.append("no weights (adapter_model.safetensors or model.safetensors)")
    if not any((folder / name).exists() for name in OPTIMIZER):
        problems.append("optimizer.pt is missing")
    if not (folder / "scheduler.pt").is_file():
        problems.append("scheduler.pt is missing")
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        if path.suffix == ".safetensors":
            found = safetensors_problem(path)
        elif path.suffix in (".pt", ".pth", ".bin"):
            found = torch_file_problem(path)
        elif path.name.endswith(".index.json"):
            found = _index_problem(path)
        else:
            continue
        if found:
            problems.append(found)
    return problems


def _index_problem(path: Path) -> str | None:
    try:
        shards = set(json.loads(path.read_text(encoding="utf-8"))["weight_map"].values())
    except (ValueError, KeyError, UnicodeDecodeError):
        return f"{path.name} does not parse"
    missing = sorted(s for s in shards if not (path.parent / s).is_file())
    return f"{path.name} lists shards that are missing: {', '.join(missing)}" if missing else None


def step_of(folder: Path) -> int:
    return int(CHECKPOINT.match(folder.name).group(1))


def newest_complete(checkpoints: Path) -> tuple[Path | None, list[str]]:
    """``(the newest complete checkpoint or None, what was set aside and why)``.

    Staging folders left by a save that was killed, and ``checkpoint-N`` folders that are not
    complete, are renamed ``incomplete-checkpoint-N`` (never deleted: they may be all a user has
    of a run fasttune did not write), so the Trainer neither resumes from them nor rotates them.
    """
    if not checkpoints.is_dir():
        return None, []
    notes = []
    for staging in sorted(checkpoints.glob(f"{STAGING}checkpoint-*")):
        moved = _set_aside(staging, staging.name[len(STAGING):])
        notes.append(f"{staging.name}: a save that never finished (the run was stopped inside it); moved to {moved.name}")
    found = sorted((p for p in checkpoints.iterdir() if p.is_dir() and CHECKPOINT.match(p.name)), key=step_of, reverse=True)
    for folder in found:
        problems = checkpoint_problems(folder)
        if not problems:
            return folder, notes
        moved = _set_aside(folder, folder.name)
        notes.append(f"{folder.name}: {'; '.join(problems)}; moved to {moved.name}")
    return None, notes


def _set_aside(folder: Path, name: str) -> Path:
    target = folder.with_name(INCOMPLETE + name)
    number = 2
    while target.exists():
        target = folder.with_name(f"{INCOMPLETE}{name}.{number}")
        number += 1
    os.replace(folder, target)
    return target


def _fsync_tree(folder: Path) -> None:
    """Flush a finished checkpoint's files to disk before the rename that makes it count."""
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as file:
                os.fsync(file.fileno())


def atomic_checkpoints(trainer) -> None:
    """Make ``trainer``'s checkpoint saves atomic: staged, renamed when whole, then rotated.

    An explicit per-instance override of ``Trainer._save_checkpoint`` (transformers 5.17): the
    Trainer's own save runs unchanged, pointed (through ``_get_output_dir``) at a staging folder
    ``.partial-checkpoint-N`` beside the others; its own rotation then sees only that one. When it
    returns and every process has written its part, rank 0 renames the folder to ``checkpoint-N``
    and rotates the real folder. A save that raises (a full disk) leaves no staging folder behind.
    Undo with ``del trainer._save_checkpoint``.
    """
    from transformers.trainer_utils import rotate_checkpoints

    save = trainer._save_checkpoint

    def save_checkpoint_atomically(model, trial):
        real = Path(trainer._get_output_dir(trial=trial))
        name = f"checkpoint-{trainer.state.global_step}"
        staging = real / f"{STAGING}{name}"
        trainer._get_output_dir = lambda trial=None: str(staging)
        try:
            save(model, trial)
            trainer.accelerator.wait_for_everyone()  # every rank has written its part (RNG state, shards)
        except BaseException:
            if trainer.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            del trainer._get_output_dir
        if trainer.args.should_save:
            _fsync_tree(staging / name)
            atomic_replace_dir(staging / name, real / name)
            staging.rmdir()
            best = trainer.state.best_model_checkpoint
            if best and Path(best).parent == staging:
                trainer.state.best_model_checkpoint = str(real / Path(best).name)
            rotate_checkpoints(output_dir=str(real), save_total_limit=trainer.args.save_total_limit,
                               best_model_checkpoint=trainer.state.best_model_checkpoint, use_mtime=False)
        trainer.accelerator.wait_for_everyone()

    trainer._save_checkpoint = save_checkpoint_atomically
