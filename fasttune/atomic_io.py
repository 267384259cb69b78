"""Write files and directories so that a reader never sees them half-written.

Every helper writes beside the destination first and then renames: a rename within one
filesystem is atomic on POSIX and on Windows (``os.replace``), so a crash or a kill leaves
either the old content or the new, plus at worst a hidden temporary that the next write ignores.
Standard library only: any layer may use it.
"""
from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _sibling(path: Path, tag: str) -> Path:
    # Hidden, and unique per process and call, so two writers of the same file never share a
    # temporary. The name is chosen rather than created (unlike tempfile.mkstemp, which makes
    # the file mode 0600) so the final file gets the user's usual permissions.
    return path.with_name(f".{path.name}.{tag}.{os.getpid()}.{secrets.token_hex(4)}")


@contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds, move it onto ``path``.

    For writers that want a file name rather than text (``Figure.savefig``, safetensors,
    GGUF). If the block raises, or writes nothing, ``path`` is left as it was and the temporary
    is removed.
    """
    final = Path(path)
    tmp = _sibling(final, "tmp")
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written to {tmp} for {final}")
        # Flush the data to disk before the rename: otherwise a power loss after the rename can
        # leave the new name pointing at an empty file on some filesystems (ext4 delalloc).
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically and return the path."""
    final = Path(path)
    with atomic_file(final) as tmp:
        tmp.write_text(text, encoding=encoding)
    return final


def temp_dir_beside(final_dir: str | os.PathLike[str]) -> Path:
    """A new, empty, hidden directory beside ``final_dir``, for :func:`atomic_replace_dir`.

    Created with ``mkdir`` (the user's umask applies), unlike ``tempfile.mkdtemp``, whose 0700
    mode would make a finished adapter or model folder unreadable to anyone else.
    """
    final = Path(final_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(final, "tmp")
    tmp.mkdir()
    return tmp


def atomic_replace_dir(tmp_dir: str | os.PathLike[str], final_dir: str | os.PathLike[str]) -> Path:
    """Move the finished directory ``tmp_dir`` to ``final_dir``, replacing any old one.

    ``tmp_dir`` must be on the same filesystem as ``final_dir`` (make it beside it, for example
    ``tempfile.mkdtemp(dir=final_dir.parent)``). POSIX cannot rename over a non-empty directory,
    so an old ``final_dir`` is first renamed aside, then deleted once the new one is in place;
    ``final_dir`` is never half-written, and if the second rename fails the old one is put back.
    """
    src, final = Path(tmp_dir), Path(final_dir)
    if not src.is_dir():
        raise NotADirectoryError(f"atomic_replace_dir: {src} is not a directory")
    if not final.exists():
        os.replace(src, final)
        return final
    old = _sibling(final, "old")
    os.replace(final, old)
    try:
        os.replace(src, final)
    except BaseException:
        os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return final


@contextmanager
def atomic_dir(final_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a new hidden directory beside ``final_dir``; when the block succeeds it replaces
    ``final_dir`` (:func:`atomic_replace_dir`). If the block raises (a full disk, Ctrl-C), the
    temporary is removed and ``final_dir`` is left as it was: never a folder that is half there."""
    tmp = temp_dir_beside(final_dir)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_replace_dir(tmp, final_dir)
