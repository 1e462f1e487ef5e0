"""Atomic file writes: a file under its final name is always complete."""
from __future__ import annotations

import glob
import hashlib
import os
import shutil
import uuid
from typing import Callable, Optional

__all__ = ["atomic_write", "remove_temporaries", "file_digest", "publish_folder"]


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


def publish_folder(path: str, fill: Callable[[str], object]) -> None:
    """Publish a folder of files as one set: all of the new ones, or all of the old ones.

    ``fill(folder)`` writes every file into a fresh hidden folder ``.<name>-<id>`` beside
    ``path``; then ``path``, a symbolic link, is switched to it by one atomic rename, and
    older versions are removed. A crash or an error (a full disk) at any step leaves ``path``
    pointing at the previous complete set; leftovers are removed by the next call. Callers
    serialise concurrent calls (a lock beside ``path``).
    """
    parent, name = os.path.split(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    stem = f".{name}-"
    _remove_versions(parent, stem, keep=_link_target(path))
    folder = os.path.join(parent, stem + uuid.uuid4().hex[:12])
    link = folder + ".link"
    try:
        os.mkdir(folder)
        fill(folder)
        for root, _dirs, names in os.walk(folder):
            for n in names:
                with open(os.path.join(root, n), "rb") as fh:
                    os.fsync(fh.fileno())
        os.symlink(os.path.basename(folder), link)
        if os.path.isdir(path) and not os.path.islink(path):  # a report from before sets: move it aside
            os.rename(path, os.path.join(parent, stem + "old-" + uuid.uuid4().hex[:8]))
        os.replace(link, path)
    except BaseException:
        for leftover in (link, folder):
            _remove_tree(leftover)
        raise
    _remove_versions(parent, stem, keep=os.path.basename(folder))


def _link_target(path: str) -> Optional[str]:
    return os.readlink(path) if os.path.islink(path) else None


def _remove_versions(parent: str, stem: str, keep: Optional[str]) -> None:
    for entry in glob.glob(os.path.join(glob.escape(parent), glob.escape(stem) + "*")):
        if os.path.basename(entry) != keep:
            _remove_tree(entry)


def _remove_tree(path: str) -> None:
    if os.path.islink(path) or os.path.isfile(path):
        try:
            os.remove(path)
        except OSError:
            pass
    elif os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
