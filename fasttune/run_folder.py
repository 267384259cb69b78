"""A run folder belongs to one run, and one process writes it at a time.

A new run goes into a folder that does not exist yet or is empty; a folder that holds another
run, or files fasttune did not write, is refused with the way out (``--resume`` it, or pick
another folder): fasttune never deletes what it did not write. While a process trains or
exports into a run folder it holds an exclusive lock on ``.fasttune.lock`` there (``flock``: the
kernel releases it when the process ends, however it ends; a clean end also removes the file); a
second process is refused at once with the first one's pid. A lock file left with the pid of a
process that is gone (killed) is taken over with a note. The folder's ``config.yaml`` is the run's
own record of its recipe and machine (:func:`saved_config` reads it back for resume and export).
Torch-free.
"""
from __future__ import annotations

import atexit
import os
import time
from datetime import datetime
from pathlib import Path

import yaml

from fasttune.errors import Problem, UserError

LOCK = ".fasttune.lock"
CONFIG = "config.yaml"
"""The resolved recipe plus what ran it (``machine:``); written once the model has loaded."""
SUMMARY = "summary.json"
"""What a run's report shows, as data; written once its training has finished, before the exports."""


def new_run_dir(recipe_name: str, output_dir: str | None, root: Path = Path("runs")) -> Path:
    """``train.output_dir`` if the recipe sets it, else ``runs/<recipe>-<timestamp>`` (``-2``, ``-3``
    when a run of the same recipe started in the same second)."""
    if output_dir:
        return Path(output_dir)
    stamped = root / f"{recipe_name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    run_dir, number = stamped, 2
    while run_dir.exists():
        run_dir, number = stamped.with_name(f"{stamped.name}-{number}"), number + 1
    return run_dir


def saved_config(run_dir: Path) -> dict:
    """The run's ``config.yaml``; a file that does not read back is refused by name."""
    path = run_dir / CONFIG
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise UserError(Problem("--resume", str(path), f"cannot be read back ({type(err).__name__}: {str(err).splitlines()[0][:120]})",
                                "restore the run's config.yaml (fasttune wrote it when the run started), or start a new run")) from None
    if not isinstance(saved, dict) or not saved.get("name"):
        raise UserError(Problem("--resume", str(path), "is not a fasttune run's config (no recipe name in it)",
                                "restore the run's config.yaml, or start a new run"))
    return saved


def save_dtype(dtype: str) -> str:
    """The dtype a run's trained or merged model is saved in: the run's own 16-bit dtype, bfloat16
    for a float32 (CPU) run."""
    return dtype if dtype in ("bfloat16", "float16") else "bfloat16"


def saved_dtype(run_dir: Path) -> str:
    """:func:`save_dtype` of the run in ``run_dir`` (from its config.yaml)."""
    return save_dtype((saved_config(run_dir).get("machine") or {}).get("dtype"))


def check_new_run_folder(run_dir: Path, key: str = "train.output_dir") -> None:
    """Refuse a new run into ``run_dir`` unless it is absent or empty (and not in use)."""
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise UserError(Problem(key, str(run_dir), "is a file, not a folder", "give a folder for the run (it is created if missing)"))
    refuse_if_in_use(run_dir, key)
    entries = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK)
    if not entries:
        return
    if "config.yaml" in entries:
        raise UserError(Problem(key, str(run_dir), f"already holds a run ({describe_run(run_dir)}); a run folder belongs to one run",
                                f"continue that run with --resume {run_dir}, or give this run another train.output_dir"))
    shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
    raise UserError(Problem(key, str(run_dir), f"is not empty and was not made by fasttune (it holds {shown})",
                            "give a new or empty folder; fasttune never deletes files it did not write"))


def describe_run(run_dir: Path) -> str:
    """``recipe demo, finished`` / ``recipe demo, stopped at step 4``: what a run folder holds, from its files."""
    import yaml

    try:
        name = (yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}).get("name", "?")
    except (OSError, ValueError, UnicodeDecodeError, yaml.YAMLError, AttributeError):
        name = "?"
    if (run_dir / "report.md").is_file():
        return f"recipe {name}, finished"
    if (run_dir / SUMMARY).is_file():
        return f"recipe {name}, trained, its export unfinished"
    steps = [int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("checkpoint-*") if p.name.split("-")[1].isdigit()]
    return f"recipe {name}, stopped at step {max(steps)}" if steps else f"recipe {name}, stopped before its first checkpoint"


def refuse_if_in_use(run_dir: Path, key: str = "train.output_dir") -> None:
    """Refuse at once, with its pid, when a live fasttune process holds ``run_dir`` (takes nothing)."""
    import fcntl

    path = Path(run_dir) / LOCK
    if not path.is_file():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _in_use(run_dir, key, os.read(fd, 200)) from None
    finally:
        os.close(fd)  # closing drops the shared lock, if it was taken


def _in_use(run_dir: Path, key: str, content: bytes) -> UserError:
    holder = content.decode("utf-8", "replace").split()
    pid = holder[0] if holder else "unknown"
    return UserError(Problem(key, str(run_dir), f"is in use by another fasttune process (pid {pid})",
                             f"wait for it to finish or stop it (kill {pid}), or use another folder"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunFolderLock:
    """``with RunFolderLock(run_dir, key) as lock:`` holds the folder for this process; ``lock.note``
    says when a stale lock (a killed run's) was taken over."""

    def __init__(self, run_dir: Path, key: str = "train.output_dir"):
        self.path = Path(run_dir) / LOCK
        self.key = key
        self.note: str | None = None
        self._fd: int | None = None

    def acquire(self) -> RunFolderLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                content = os.read(fd, 200)
                os.close(fd)
                raise _in_use(self.path.parent, self.key, content) from None
            # The holder removes the file when it ends cleanly; a lock taken on a file that was
            # removed meanwhile holds nothing: open the new one.
            if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                break
            os.close(fd)
        previous = os.read(fd, 200).decode("utf-8", "replace").split()
        if previous and previous[0].isdigit() and int(previous[0]) != os.getpid() and not _alive(int(previous[0])):
            self.note = f"took over the lock of a run that is no longer running (pid {previous[0]}, killed or crashed)"
        os.lseek(fd, 0, os.SEEK_SET)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode())
        self._fd = fd
        atexit.register(self.release)  # however this process ends cleanly (a refusal after this point too)
        return self

    def release(self) -> None:
        """Remove the lock file and unlock (a clean end: nothing left, no note for the next process)."""
        if self._fd is None:
            return
        import fcntl

        self.path.unlink(missing_ok=True)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunFolderLock:
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()
