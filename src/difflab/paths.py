"""Output destinations checked before any work: a file or folder difflab will write must be creatable.

:func:`check_writable` finds the nearest existing folder on the way to the destination, checks that it is a
folder (not a file) and that a file can be created in it (``os.access`` alone is not enough: root passes it
everywhere, yet cannot write under ``/proc`` or on a read-only mount), and raises a one-line
:class:`~difflab.errors.DifflabError` naming the destination and the fix.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from difflab.errors import DifflabError

PROBE_PREFIX = ".difflab-write-check-"  # the probe file's name (another process may see it for a moment)


def _exists(p: Path) -> bool:
    try:
        os.stat(p)
        return True
    except OSError:  # missing, or a component on the way is a file (ENOTDIR)
        return False


def _probe(folder: Path) -> str | None:
    """Why no file can be created in ``folder``, or None if one can (a temporary file is made and removed)."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return "permission denied"
    try:
        fd, tmp = tempfile.mkstemp(prefix=PROBE_PREFIX, suffix=".probe", dir=folder)
    except OSError as e:
        return (e.strerror or str(e)).lower()
    os.close(fd)
    try:
        os.unlink(tmp)
    except OSError:  # pragma: no cover - created but not removable: still writable
        pass
    return None


def check_writable(path, what: str, folder: bool = False) -> Path:
    """Refuse a destination that cannot be written, before any work. Returns ``path`` as a Path.

    ``path``: a file difflab will write (its missing parent folders will be created), or with ``folder=True`` a
    folder it will create or write into. ``what`` names the destination in the message, e.g. ``"--out"``.
    """
    p = Path(path)
    if _exists(p):
        if folder:
            if not p.is_dir():
                raise DifflabError(f"cannot write {what} {p}: it is a file, not a folder (choose another {what})")
        else:
            if p.is_dir():
                raise DifflabError(f"cannot write {what} {p}: it is a folder; give a file name inside it or "
                                   f"choose another {what}")
            if not os.access(p, os.W_OK):
                raise DifflabError(f"cannot write {what} {p}: the file is read-only (remove it, make it writable, "
                                   f"or choose another {what})")
    start = p if folder else p.parent
    anc = start.absolute()
    while not _exists(anc) and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise DifflabError(f"cannot write {what} {p}: {anc} is a file, not a folder (choose another {what})")
    why = _probe(anc)
    if why is not None:
        where = "the folder" if anc == start.absolute() else "the nearest existing folder"
        raise DifflabError(f"cannot write {what} {p}: {where} {anc} is not writable ({why}); choose a writable "
                           f"location for {what} or fix the folder's permissions")
    return p
