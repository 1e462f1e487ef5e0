"""Saved heads: the model file + sidecar pair, written atomically, and loaded back safely.

A head is saved as ``<cache>/heads/<name>.joblib`` (or ``.skops``) plus its sidecar
``<name>.json`` (a :class:`pipeline.records.HeadRecord`), written last, so a head without a
sidecar is never read as complete. :func:`load_head` checks the model file's sha256 against
the sidecar *before* unpickling it, refuses features from another backbone, weights or class
list, and warns when the head was saved under other library versions.
"""
from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Union

import joblib
import numpy as np
import sklearn
from filelock import FileLock
from sklearn.base import BaseEstimator
from sklearn.exceptions import InconsistentVersionWarning
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from .. import files
from ..features import store
from .. import metrics as metrics_mod
from ..config import HEAD_FORMATS
from ..errors import UserError
from ..records import HeadRecord, SchemaError, read_json
from ..paths import head_sidecar
from ..versions import library_versions

__all__ = ["Head", "load_head", "head_pipeline", "serialize", "save", "find_saved", "Saved", "versions", "FORMATS"]

FORMATS = HEAD_FORMATS
_SKOPS_TRUSTED_ROOTS = ("sklearn", "numpy", "scipy")


def head_pipeline(estimator: BaseEstimator, scaler: Optional[StandardScaler] = None) -> Pipeline:
    """The saved form of every head: ``Pipeline(StandardScaler, estimator)``."""
    return Pipeline([("standardscaler", scaler if scaler is not None else StandardScaler()),
                     (type(estimator).__name__.lower(), estimator)])


# --------------------------------------------------------------------------- saving


@dataclass(frozen=True)
class Saved:
    """A head on disk: its model file, its sidecar and the record the sidecar holds."""

    model_path: str
    sidecar_path: str
    record: HeadRecord


def versions(fmt: str) -> Dict[str, str]:
    names = ("python", "sklearn", "numpy", "scipy", "joblib", "h5py", "pipeline")
    return library_versions(*names, *(("skops",) if fmt == "skops" else ()))


def serialize(model: Pipeline, fmt: str) -> bytes:
    if fmt == "skops":
        try:
            import skops.io as sio
        except ImportError:
            raise UserError("--format skops needs the optional skops package: pip install 'pipeline[skops]' "
                            "(or pip install skops), or use --format joblib") from None
        return sio.dumps(model)
    buf = io.BytesIO()
    joblib.dump(model, buf)
    return buf.getvalue()


def save(directory: str, record: HeadRecord, data: bytes) -> Saved:
    """Model file, then sidecar, each atomically, under a lock on the heads folder.

    The old sidecar goes first: between the two renames a reader sees a model without a
    sidecar (incomplete, ignored), never a sidecar describing a different model.
    """
    text = record.dumps().encode("utf-8")
    os.makedirs(directory, exist_ok=True)
    model_path = os.path.join(directory, record.model_file)
    sidecar = head_sidecar(directory, record.name)
    with FileLock(os.path.join(directory, ".lock")):
        files.remove_temporaries(directory)
        if os.path.exists(sidecar):
            os.remove(sidecar)
        for other in FORMATS:
            stale = os.path.join(directory, f"{record.name}.{other}")
            if other != record.format and os.path.exists(stale):
                os.remove(stale)
        files.atomic_write(model_path, lambda fh: fh.write(data))
        files.atomic_write(sidecar, lambda fh: fh.write(text))
    return Saved(model_path, sidecar, record)


def find_saved(directory: str, name: str, settings: dict) -> Optional[Saved]:
    """The head ``name`` saved under ``directory`` when it is complete, intact and was fitted
    with exactly ``settings``; None otherwise (missing, damaged, another schema: refit it)."""
    sidecar = head_sidecar(directory, name)
    try:
        record = HeadRecord.from_json(read_json(sidecar))
        model_path = os.path.join(directory, record.model_file)
        if record.settings != settings or files.file_digest(model_path, "sha256") != record.sha256:
            return None
    except (OSError, ValueError):  # missing, damaged or another schema: refit
        return None
    return Saved(model_path, sidecar, record)


# --------------------------------------------------------------------------- loading


class Head:
    """A fitted head loaded by :func:`load_head`: the scikit-learn ``Pipeline`` plus its sidecar.

    ``model`` is a plain ``Pipeline`` (``StandardScaler`` + estimator) that expects
    ``X : ndarray of shape (n_samples, 512)`` features from the same backbone and weights.
    """

    def __init__(self, model: Pipeline, record: HeadRecord, path: str):
        self.model = model
        self.record = record
        self.path = path

    @property
    def meta(self) -> dict:
        """The sidecar as JSON (``record.to_json()``)."""
        return self.record.to_json()

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def classes(self) -> List[str]:
        return list(self.record.classes)

    @property
    def has_proba(self) -> bool:
        return hasattr(self.model, "predict_proba")

    def check_features(self, features: Union[str, dict]) -> None:
        """Refuse features from a different backbone, weights or class list.

        ``features``: a feature-cache path or its :func:`pipeline.features.store.read_meta` dict.
        """
        meta = store.read_meta(features) if isinstance(features, str) else features
        _check_compatible(self.record, meta, self.path)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Class indices into ``classes`` for ``X`` of shape (n_samples, 512)."""
        return self.model.predict(X)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Probabilities of shape (n_samples, n_classes); heads without them raise AttributeError."""
        return self.model.predict_proba(X)

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        return self.model.decision_function(X)

    def evaluate(self, features: str, split: str = "val") -> dict:
        """Metrics of this head on one split of a (compatible) feature cache."""
        self.check_features(features)
        X, y, paths, _ = store.read_split(features, split)
        proba = self.predict_proba(X) if self.has_proba else None
        return metrics_mod.evaluate(y, self.predict(X), self.classes, paths, proba)

    def __repr__(self) -> str:
        return f"Head({self.name!r}, {self.path!r})"


def _check_compatible(head: HeadRecord, cache_meta: dict, where: str) -> None:
    feats = head.features
    cache_path = cache_meta.get("path", "the given features")
    checks = (("backbone", feats.backbone, cache_meta.get("backbone")),
              ("weights", feats.weights.sha256, cache_meta.get("weights_sha256")),
              ("class list", list(head.classes), list(cache_meta.get("classes", []))))
    for what, mine, theirs in checks:
        if mine != theirs:
            if what == "weights":  # name them by id and hash: two files can share an id
                mine = f"{feats.weights.id} (sha256 {str(mine)[:12]}…)"
                theirs = f"{cache_meta.get('weights_id')} (sha256 {str(theirs)[:12]}…)"
            raise UserError(
                f"head {where!r} was fitted on features with {what} {mine!r}, but {cache_path!r} has "
                f"{theirs!r}; use a head fitted on this cache (make heads) or features made with the head's "
                f"{what}")
    if feats.precision and cache_meta.get("precision") and feats.precision != cache_meta["precision"]:
        warnings.warn(f"head {where!r} was fitted on {feats.precision} features, {cache_path!r} holds "
                      f"{cache_meta['precision']} features; predictions may differ slightly")


def _sidecar_for(path: str) -> str:
    root, ext = os.path.splitext(path)
    return path if ext == ".json" else root + ".json"


def _read_sidecar(sidecar: str, path: str) -> HeadRecord:
    if not os.path.isfile(sidecar):
        if os.path.isfile(path):
            raise UserError(f"head {path!r} has no sidecar {sidecar!r}: it is incomplete or was not saved by "
                            "this project; refit it with `make heads` (python -m pipeline heads --rebuild)")
        raise UserError(f"no head at {path!r}; run `make heads` (python -m pipeline heads) or check the path")
    try:
        return HeadRecord.from_json(read_json(sidecar))
    except SchemaError as exc:
        raise UserError(f"head sidecar {sidecar!r} was {exc}") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"head sidecar {sidecar!r} is unreadable ({exc}); refit with "
                        "`python -m pipeline heads --rebuild`") from None


def _unpickle(data: bytes, fmt: str, where: str):
    if fmt == "skops":
        try:
            import skops.io as sio
        except ImportError:
            raise UserError(f"{where!r} is in skops format; install the optional skops package "
                            "(pip install skops)") from None
        untrusted = sio.get_untrusted_types(data=data)
        foreign = [t for t in untrusted if t.split(".")[0] not in _SKOPS_TRUSTED_ROOTS]
        if foreign:
            raise UserError(f"{where!r} holds types outside scikit-learn/numpy/scipy ({foreign[:5]}); refusing "
                            "to load it. Inspect it with skops.io.get_untrusted_types and load it yourself "
                            "only if you trust it")
        return sio.loads(data, trusted=untrusted)
    return joblib.load(io.BytesIO(data))


def _warn_versions(recorded: dict, name: str, caught: List[warnings.WarningMessage]) -> None:
    """One clear warning naming both versions when the head was saved under other libraries."""
    version_warnings = [w for w in caught if issubclass(w.category, InconsistentVersionWarning)]
    for w in caught:
        if w not in version_warnings:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    original = recorded.get("sklearn")
    if version_warnings and not original:
        original = version_warnings[0].message.original_sklearn_version
    if (original and original != sklearn.__version__) or version_warnings:
        if version_warnings and original == sklearn.__version__:
            original = version_warnings[0].message.original_sklearn_version
        warnings.warn(InconsistentVersionWarning(estimator_name=f"head {name!r}",
                                                 current_sklearn_version=sklearn.__version__,
                                                 original_sklearn_version=original))
    for lib, current in library_versions("numpy", "scipy").items():
        if recorded.get(lib) and recorded[lib].split(".")[0] != current.split(".")[0]:
            warnings.warn(f"head {name!r} was saved with {lib} {recorded[lib]}, this is {lib} {current}; "
                          "refit it with `python -m pipeline heads --rebuild` if predictions look wrong")


def load_head(path: str, features: Union[str, dict, None] = None) -> Head:
    """Load a saved head, checking the sha256 of its model file *before* unpickling it.

    Parameters
    ----------
    path : str
        ``<cache>/heads/<name>.json`` (the sidecar) or the model file beside it.
    features : str or dict, optional
        A feature cache (path or its metadata); the head is refused unless it was fitted on
        features from the same backbone, weights and class list.

    Returns
    -------
    Head
        ``head.model`` is the fitted scikit-learn ``Pipeline``.

    Raises
    ------
    UserError
        Missing or incomplete head, a model file whose sha256 differs from the sidecar
        (modified or corrupt), or incompatible features.

    Notes
    -----
    A joblib file runs code when it is loaded: load only files you trust. The sha256 check
    catches corruption and a swapped model file, not an attacker who rewrites both files; the
    ``skops`` format loads without running arbitrary code.
    """
    path = os.fspath(path)
    sidecar = _sidecar_for(path)
    for attempt in range(3):
        doc = _read_sidecar(sidecar, path)
        model_path = os.path.join(os.path.dirname(sidecar), doc.model_file)
        try:
            with open(model_path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            data = None
        digest = hashlib.sha256(data).hexdigest() if data is not None else ""
        if digest == doc.sha256:
            break
        if _read_sidecar(sidecar, path) != doc and attempt < 2:
            continue  # a `heads` run replaced this head while we read it: read the new one
        if data is None:
            raise UserError(f"head sidecar {sidecar!r} names model file {model_path!r}, which is missing; "
                            "refit with `python -m pipeline heads --rebuild`")
        raise UserError(f"head {model_path!r} does not match its sidecar (sha256 {digest[:12]}…, expected "
                        f"{doc.sha256[:12]}…): it was modified or corrupted after saving; not loading it. "
                        "Refit with `python -m pipeline heads --rebuild`")
    if features is not None:
        meta = store.read_meta(features) if isinstance(features, str) else features
        _check_compatible(doc, meta, model_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = _unpickle(data, doc.format, model_path)
    _warn_versions(doc.versions, doc.name, caught)
    return Head(model, doc, model_path)
