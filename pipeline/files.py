"""Atomic file writes: a file under its final name is always complete."""
from __future__ import annotations

import glob
import hashlib
import os
import uuid
from typing import Callable, Optional

__all__ = ["atomic_write", "remove_temporaries", "file_digest"]


def atomic_write(path: str, write: Callable, *, by_name: bool = False) -> None:
    """Write ``path`` under a temporary name beside it, fsync, then rename it to ``path``.

    ``write(fh)`` fills an open binary file; with ``by_name``, ``write(temporary_path)``
    creates the file itself (h5py, which writes through its own driver). A crash at any
    point leaves either the old file or the new one, plus at most a ``*.tmp-*`` file that
    :func:`remove_temporaries` clears.
    """
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        if by_name:
            write(tmp)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        else:
            with open(tmp, "wb") as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_temporaries(directory: str, name: Optional[str] = None) -> None:
    """Delete the temporary files that writers killed mid-save left in ``directory``:
    those of the file ``name`` only, or of every file there when ``name`` is None.

    Call it holding the lock that guards those files, so that no live writer has one there.
    """
    stem = "*" if name is None else glob.escape(name)
    for found in glob.glob(os.path.join(glob.escape(directory), stem + ".tmp-*")):
        try:
            os.remove(found)
        except OSError:
            pass


def file_digest(path: str, algorithm: str = "sha1") -> str:
    """Hex digest of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
