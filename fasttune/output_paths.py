"""Whether a folder or file that fasttune is asked to write can be written, asked before anything is.

An output path given as a file, under a file, or in a folder this process may not write to is
refused where the command is checked (recipe resolution, export, bench, cp, doctor), with the path
and the way out, instead of failing half-way with an OSError. Standard library only.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from fasttune.errors import Problem


def _existing_ancestor(path: Path) -> Path:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def can_create_in(folder: Path) -> bool:
    """Whether a file can be created in ``folder`` (tried, so that read-only mounts and root's
    permission exemptions answer truthfully; the probe file is removed at once)."""
    try:
        handle, name = tempfile.mkstemp(dir=folder, prefix=".fasttune-write-check-")
    except OSError:
        return False
    os.close(handle)
    os.unlink(name)
    return True


def _folder_rule(path: Path) -> str | None:
    """Why ``path`` cannot be (or become) a folder this process writes into; None when it can."""
    if path.exists() and not path.is_dir():
        return "is a file, not a folder"
    ancestor = _existing_ancestor(path)
    if not ancestor.is_dir():
        return f"cannot be created: {ancestor} is a file, not a folder"
    if not can_create_in(ancestor):
        return f"cannot be written: this user may not create files in {ancestor.resolve()}"
    return None


def folder_problem(path: str | os.PathLike[str], where: str, fix: str) -> Problem | None:
    """A Problem when ``path`` cannot be (or become) a folder this process writes into, else None."""
    path = Path(path).expanduser()
    rule = _folder_rule(path)
    return None if rule is None else Problem(where, str(path), rule, fix)


def file_problem(path: str | os.PathLike[str], where: str, fix: str) -> Problem | None:
    """A Problem when ``path`` cannot be written as a file: it is a folder, or its folder cannot be made."""
    path = Path(path).expanduser()
    if path.is_dir():
        return Problem(where, str(path), "is a folder; a file of that name cannot be written", fix)
    rule = _folder_rule(path.parent)
    if rule is None:
        return None
    if rule.startswith("is a file"):
        rule = f"cannot be created: {path.parent} is a file, not a folder"
    return Problem(where, str(path), rule, fix)
