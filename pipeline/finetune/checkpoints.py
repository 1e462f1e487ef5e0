"""A run folder's files (names in paths.py): the checkpoints ``model.pt`` and ``last.pt``, each
recorded with its sha256 and checked before use, ``history.json``, and what a previous run left
there to reuse (complete) or resume from (unfinished).

``last.pt`` is the state after the last finished epoch: weights, optimiser, schedule, history,
selection and every generator (:func:`rng_state`), so a resumed run continues bit-identically.
``model.pt`` is the reported model. Both are written atomically; ``metrics.json`` (the run's
``RunRecord``) is written last, so a run without it is unfinished.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from torch import nn

from .. import files, paths
from ..errors import UserError
from ..records import RunRecord, read_json

__all__ = [
    "RUN_FORMAT",
    "RUN_FORMAT_VERSION",
    "save",
    "load",
    "verify_checkpoint",
    "save_json",
    "cpu_state",
    "rng_state",
    "restore_rng",
    "clear",
    "previous",
]

log = logging.getLogger(__name__)

RUN_FORMAT = "pipeline.run"
RUN_FORMAT_VERSION = 2  # 2: model.pt (the reported model) replaces best.pt (chosen on val)
# Every file a run writes, metrics.json first (cleared first: from then on the run is visibly unfinished).
_FILES = (paths.RUN_METRICS, paths.RUN_LAST, paths.RUN_MODEL, "best.pt", paths.RUN_HISTORY)  # best.pt: format 1


def save(obj: dict, path: str) -> str:
    """Save a checkpoint atomically; returns the sha256 of the bytes written."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getbuffer()
    files.atomic_write(path, lambda fh: fh.write(data))
    return hashlib.sha256(data).hexdigest()


def verify_checkpoint(path: str, sha256: str) -> None:
    """Refuse a checkpoint whose bytes are not the ones its run recorded (``torch.load`` loads
    most damage silently: a flipped bit in a weight is still a valid file).

    Raises
    ------
    UserError
        The file is missing or its sha256 differs; the message names it and ``--rebuild``.
    """
    try:
        got = files.file_digest(path, "sha256")
    except FileNotFoundError:
        raise UserError(f"checkpoint {path!r} is missing; restore it, or rerun with --rebuild to train this "
                        "run again from the start") from None
    if got != sha256:
        raise UserError(f"checkpoint {path!r} does not match the sha256 its run recorded ({got[:12]}…, expected "
                        f"{sha256[:12]}…): it was modified or damaged after saving; restore it, or rerun with "
                        "--rebuild to train this run again from the start")


def save_json(obj: dict, path: str) -> None:
    files.atomic_write(path, lambda fh: fh.write(json.dumps(obj, indent=1).encode("utf-8")))


def load(path: str) -> Optional[dict]:
    """A checkpoint of this project, on CPU whatever device saved it; None when missing or of
    another format version (start over).

    Raises
    ------
    UserError
        The file is damaged. Checkpoints are written atomically, so this is damage from
        outside (a disk, a copy): say so rather than silently train again over the results.
    """
    if not os.path.isfile(path):
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"checkpoint {path!r} is damaged ({type(exc).__name__}); restore it, or rerun with "
                        "--rebuild to train this run again from the start") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != RUN_FORMAT \
            or ckpt.get("format_version") != RUN_FORMAT_VERSION:
        return None
    return ckpt


def cpu_state(module: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def rng_state(generator: torch.Generator, sampler) -> dict:
    """Every generator a resumed run must continue from (``sampler``: its ``seed`` and ``epoch``, recorded)."""
    keys, pos, has_gauss, cached = np.random.get_state()[1:]
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
        "loader_generator": generator.get_state(),
        "sampler": {"seed": sampler.seed, "epoch": sampler.epoch},
    }
    # No CUDA generator state: nothing here draws from it (augmentation, shuffling and init
    # are CPU generators), and torch.cuda.set_rng_state_all would fail on a resume that sees
    # fewer GPUs than the run that saved it.
    return state


def restore_rng(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    np.random.set_state(("MT19937", npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["cached_gaussian"]))
    random.setstate(state["python"])
    generator.set_state(state["loader_generator"])
    # A "cuda" entry (checkpoints of earlier versions) is ignored: see rng_state.


def clear(directory: str) -> None:
    # metrics.json goes first: from then on the run is visibly unfinished.
    for name in _FILES:
        path = os.path.join(directory, name)
        if os.path.exists(path):
            os.remove(path)


def previous(directory: str, key: str, epochs: int) -> Tuple[Optional[RunRecord], Optional[dict]]:
    """(complete record, resumable checkpoint) of a previous run with the same settings.

    A complete run's checkpoints are checked against the sha256 its record holds before they
    are used; an unfinished run's ``model.pt`` (holdout selection) against the one ``last.pt`` holds.
    """
    last, model = os.path.join(directory, paths.RUN_LAST), os.path.join(directory, paths.RUN_MODEL)
    try:
        done = RunRecord.from_json(read_json(os.path.join(directory, paths.RUN_METRICS)))
    except (OSError, ValueError):  # missing, damaged or another schema: evaluated and written again
        done = None
    recorded = done.checkpoints if done is not None and done.key == key else {}
    if recorded.get(paths.RUN_LAST) and os.path.isfile(last):
        verify_checkpoint(last, recorded[paths.RUN_LAST])
    ckpt = load(last)
    if ckpt is None:
        clear(directory)
        return None, None
    if ckpt.get("key") != key:
        log.info("settings changed since %s was saved: starting over", directory)
        clear(directory)
        return None, None
    if ckpt["epoch"] > epochs:
        log.info("%s already has %d epochs, more than the %d asked: starting over", directory,
                 ckpt["epoch"], epochs)
        clear(directory)
        return None, None
    complete = bool(done and done.complete and done.key == key and done.epochs == epochs and ckpt["epoch"] == epochs)
    if complete and recorded.get(paths.RUN_MODEL):
        verify_checkpoint(model, recorded[paths.RUN_MODEL])
    elif ckpt["selected_epoch"] and ckpt.get("model_sha256"):
        _check_selected(model, ckpt)
    if (ckpt["selected_epoch"] or complete) and load(model) is None:
        raise UserError(f"checkpoint {model!r} is missing or not this "
                        "project's; restore it, or rerun with --rebuild to train this run again from the start")
    if complete:
        _repair_history(directory, ckpt)
        return done, ckpt
    path = os.path.join(directory, paths.RUN_METRICS)
    if os.path.exists(path):
        os.remove(path)  # about to train further: the old result is no longer the run's
    return None, ckpt


def _check_selected(path: str, ckpt: dict) -> None:
    """An unfinished run's ``model.pt`` is the one ``last.pt`` recorded.

    ``model.pt`` is saved before ``last.pt`` in an epoch, so a run killed between the two has
    a ``model.pt`` of the epoch it redoes, newer than ``last.pt`` knows: that one is accepted
    (and its sha256 taken), since redoing the epoch writes it again.
    """
    try:
        verify_checkpoint(path, ckpt["model_sha256"])
    except UserError:
        newer = load(path) if os.path.isfile(path) else None
        if newer is None or newer.get("epoch", 0) <= ckpt["epoch"]:
            raise
        ckpt["model_sha256"] = files.file_digest(path, "sha256")


def _repair_history(directory: str, ckpt: dict) -> None:
    """Rewrite a damaged history.json of a complete run from last.pt, which holds the same list."""
    path = os.path.join(directory, paths.RUN_HISTORY)
    try:
        with open(path, encoding="utf-8") as fh:
            if isinstance(json.load(fh).get("epochs"), list):
                return
    except (OSError, ValueError, AttributeError):
        pass
    log.warning("rewriting the damaged or missing %s from last.pt", path)
    save_json({"epochs": ckpt["history"]}, path)
