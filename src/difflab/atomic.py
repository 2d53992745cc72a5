"""Atomic writes: a file (or a folder) is written under a temporary name beside its target, flushed to disk, and
renamed into place in one step, and the folder holding it is flushed too, so a reader (or a kill) never sees half
of it: the target is the previous one or the new one. Files and folders get the modes a plain ``open`` or
``mkdir`` would give them.

Temporary names: ``.NAME.XXXXXXXX.tmp`` for a file, ``.tmp-NAME-XXXXXXXX`` for a folder (what a killed process
leaves; the trainer sweeps both out of a run folder)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def default_mode(folder: bool = False) -> int:
    """The mode ``open`` (0o666) or ``mkdir`` (0o777, ``folder``) gives a new file under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if folder else 0o666) & ~umask


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (a rename into it) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - file systems that refuse to fsync a folder
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """``with atomic_file(path) as f: f.write(...)``: a binary file that replaces ``path`` only when the block ends
    without an error (flushed, fsynced, ``os.replace``-d, its folder fsynced); on any error the temporary file is
    removed, ``path`` is left as it was and the error propagates."""
    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), default_mode())  # mkstemp makes 0600 files
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(p.parent)


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_file`); returns the path."""
    with atomic_file(path) as fh:
        fh.write(data)
    return Path(path)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            f = Path(dirpath, name)
            if f.is_file() and not f.is_symlink():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        fsync_dir(dirpath)


@contextmanager
def atomic_dir(path: str | Path, replace: bool = True) -> Iterator[Path]:
    """``with atomic_dir(out) as tmp: <write files into tmp>``: a new folder beside ``out`` that takes its place
    only when the block ends without an error (every file fsynced, renamed, the parent fsynced).

    ``replace`` (default True): an existing ``out`` is removed first; False: the rename fails with an OSError if
    ``out`` exists and is not empty (e.g. another process got there first). On any error the temporary folder is
    removed and ``out`` is left as it was (unless ``replace`` removed it just before the rename).
    """
    p = Path(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{p.name}-", dir=p.parent))
    try:
        os.chmod(tmp, default_mode(folder=True))  # mkdtemp makes 0700 folders
        yield tmp
        _fsync_tree(tmp)
        if replace and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        os.replace(tmp, p)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    fsync_dir(p.parent)


__all__ = ["atomic_dir", "atomic_file", "default_mode", "fsync_dir", "write_bytes_atomic"]
