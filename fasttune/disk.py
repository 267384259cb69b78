"""Free disk: checked before writing, and a disk that fills anyway said in the user's words.

Standard library only. ``free_bytes`` answers for a folder that may not exist yet (the nearest
existing parent's filesystem); ``require_free`` refuses, naming what needs the space, how much is
free and what to do; ``disk_full`` turns an ``ENOSPC`` raised while writing into the same kind of
message (exit 2), naming what was being written.
"""
from __future__ import annotations

import errno
import shutil
from pathlib import Path

from fasttune.errors import Problem, UserError

FULL = (errno.ENOSPC, errno.EDQUOT)


def existing_parent(folder: Path) -> Path:
    folder = Path(folder).absolute()
    while not folder.exists():
        folder = folder.parent
    return folder


def free_bytes(folder: Path) -> int:
    return shutil.disk_usage(existing_parent(folder)).free


def gib(n_bytes: float) -> str:
    """``12.3 GiB``; below a tenth of a GiB ``45.6 MiB``, below a tenth of a MiB ``12.0 KiB`` (never ``0.0 GiB``)."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if n_bytes >= size / 10:
            return f"{n_bytes / size:.1f} {unit}"
    return f"{n_bytes / 2**10:.1f} KiB"


def require_free(folder: Path, needed: float, what: str, key: str, fix: str, title: str = "not enough disk space") -> None:
    """Refuse when ``folder``'s disk has less than ``needed`` bytes free. (Whether it can be written
    at all is asked where the path is checked: fasttune.output_paths.)"""
    free = free_bytes(folder)
    if needed > free:
        raise UserError(Problem(key, str(folder), f"needs about {gib(needed)} free for {what}; {gib(free)} are free "
                                f"({gib(needed - free)} short)", fix), title)


def disk_full(err: BaseException, writing: str, folder: Path, fix: str) -> UserError | None:
    """The message for ``err`` when it is a full disk (or quota), else None."""
    if not isinstance(err, OSError) or err.errno not in FULL:
        return None
    return UserError(Problem("disk", str(folder), f"filled up while writing {writing}: {gib(free_bytes(folder))} left", fix),
                     "the disk is full")
