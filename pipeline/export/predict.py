"""Classify new images with a saved head: ``python -m pipeline predict --head NAME IMAGE_OR_DIR…``.

The head's sidecar names the backbone weights its features came from; the same frozen
network (checked by sha256) computes features of the new images in batched forward passes,
with the preprocessing of the cache. Files that cannot be decoded are reported, the rest
are classified.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import numpy as np

from ..config import DEFAULT_BACKBONE, PRECISIONS, PREDICT_FORMATS, PredictConfig
from ..errors import UserError
from ..paths import for_backbone, head_sidecar, heads_dir
from ..records import WeightsRef
from .predictions import PredictResult

__all__ = ["PredictResult", "run", "resolve_head", "FORMATS"]  # PredictResult: from .predictions

FORMATS = PREDICT_FORMATS

log = logging.getLogger(__name__)


def resolve_head(head: str, cache: str, backbone: str = "") -> str:
    """A head name (``logistic``) under ``<cache>/heads/``, or an explicit sidecar/model path.

    With ``backbone`` (other than resnet18) the name is that backbone's head
    (``efficientnet_lite0-logistic``); the full file stem works without it.
    """
    if not head:
        raise UserError(f"--head is required: a head name under {heads_dir(cache)!r} or a path; "
                        f"{_available(cache)}")
    if os.path.exists(head) or os.sep in head or head.endswith((".json", ".joblib", ".skops")):
        return head
    sidecar = head_sidecar(heads_dir(cache), for_backbone(backbone.strip(), head))
    if not os.path.exists(sidecar):
        raise UserError(f"no head {head!r} under {heads_dir(cache)!r}; {_available(cache)}")
    return sidecar


def _available(cache: str) -> str:
    d = heads_dir(cache)
    names = sorted(f[:-5] for f in os.listdir(d) if f.endswith(".json")) if os.path.isdir(d) else []
    return f"available: {', '.join(names)}" if names else "none saved yet: run `make heads` first"


def _weights_spec(cfg: PredictConfig, weights: WeightsRef) -> tuple:
    """(spec, seed) that rebuild the backbone the head's features came from: ``--weights``
    when given, else the head's own weights record."""
    return (cfg.weights or weights.spec), (weights.seed if weights.seed is not None else 0)


def _precision(made: str, device: str, head: str) -> str:
    """The head's feature precision where this device runs it natively, else what ``auto`` picks
    here (a head made in bf16 on an A100 still predicts on a T4 or a CPU without native bf16)."""
    from .. import backbones

    if made not in PRECISIONS:
        return "auto"
    on = backbones.choose_device(device)
    here = backbones.supported_precision(made, on)
    if here != made:
        log.warning("head %r was fitted on %s features, which %s does not compute natively: computing %s "
                    "features instead (they differ slightly; a feature cache made in %s is not reused)",
                    head, made, on, here, made)
    return here


def run(cfg: PredictConfig) -> PredictResult:
    """Classify every image in ``cfg.inputs`` (files or folders, searched recursively) with
    ``cfg.head``, or with the exported ``cfg.model`` (ONNX Runtime, no torch: see export.client)."""
    if not cfg.inputs:
        raise UserError("no input given: name image files or folders to classify")
    if cfg.model:
        from . import client

        return client.run(cfg)
    from .. import data, heads
    from ..heads.sklearn_api import BackboneFeatures

    head = heads.load_head(resolve_head(cfg.head, cfg.cache, cfg.backbone))
    feats = head.record.features
    paths = data.collect_images(cfg.inputs)
    if not paths:
        raise UserError(f"no image files found in {list(cfg.inputs)}; give image files or folders that hold them")
    spec, seed = _weights_spec(cfg, feats.weights)
    # Images already in a matching feature cache under --cache are read from it (checksummed), not recomputed.
    extractor = BackboneFeatures(backbone=feats.backbone or DEFAULT_BACKBONE, weights=spec, seed=seed, device=cfg.device,
                                 precision=_precision(feats.precision or "auto", cfg.device, head.name),
                                 batch_size=cfg.batch_size, draft=feats.draft,
                                 cache=cfg.cache if os.path.isdir(cfg.cache) else None)
    try:
        extractor.fit(paths)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if extractor.weights_sha256_ != feats.weights.sha256:
        raise UserError(f"weights {spec!r} ({extractor.weights_id_}) are not the weights head {head.name!r} was "
                        f"fitted on ({feats.weights.id}); pass --weights with the same weights")
    X, ok, errors = extractor.extract(paths)
    result = PredictResult(head.name, head.classes, feats.weights.pretrained,
                           skipped=[{"path": p, "error": e} for p, e in errors])
    if len(ok):
        pred = head.predict(X)
        proba: Optional[np.ndarray] = head.predict_proba(X) if head.has_proba else None
        for row, i in enumerate(ok):
            p = None if proba is None else float(proba[row, int(pred[row])])
            result.predictions.append({"path": paths[i], "class": head.classes[int(pred[row])], "probability": p})
    return result
