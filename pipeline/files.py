"""Atomic file writes: a file under its final name is always complete."""
from __future__ import annotations

import glob
import hashlib
import os
import uuid
from typing import BinaryIO, Callable

__all__ = ["atomic_write", "remove_temporaries", "file_digest"]


def atomic_write(path: str, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write(fh)`` on a temporary file beside ``path``, fsync it, then rename it to ``path``.

    A crash at any point leaves either the old file or the new one, plus at most a
    ``*.tmp-*`` file that :func:`remove_temporaries` clears.
    """
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_temporaries(directory: str) -> None:
    """Temporary files of writers killed mid-save; call it under the folder's lock (no live writer)."""
    for name in glob.glob(os.path.join(glob.escape(directory), "*.tmp-*")):
        try:
            os.remove(name)
        except OSError:
            pass


def file_digest(path: str, algorithm: str = "sha1") -> str:
    """Hex digest of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
