"""Stage 2: fit, evaluate and save classical scikit-learn heads on the cached features.

Every head is a ``Pipeline(StandardScaler, estimator)`` fitted on the train split only. Its
hyper-parameter is chosen by stratified k-fold cross-validation on train (grouped by image
when augmented views are used): a coarse log-spaced grid, walked from the strongest to the
weakest regularisation (warm-started where that cannot change the result), then refined
around the best point (see heads_cv). The val split is touched once, after every choice is
made, to report metrics.

Each head is saved as ``<cache>/heads/<name>.joblib`` (or ``.skops``) plus a JSON sidecar
``<name>.json`` written last, so a head without a sidecar is never read as complete.
"""
from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.exceptions import ConvergenceWarning, InconsistentVersionWarning
from sklearn.linear_model import LogisticRegression, RidgeClassifier, SGDClassifier
from sklearn.neighbors import KNeighborsClassifier, NearestCentroid
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from . import metrics as metrics_mod
from . import files, store
from .config import HEAD_FORMATS, HeadsConfig
from .errors import UserError
from .records import FeaturesRef, HeadRecord, RecordError, SchemaError, WeightsRef, read_json
from .heads_cv import TrainData, cross_validate, l2svm_path, logistic_path, make_folds, ridge_path, splitter
from .paths import heads_dir
from .text import format_table
from .versions import library_versions

__all__ = ["HeadSpec", "REGISTRY", "HeadRow", "HeadsResult", "Head", "run", "load_head",
           "heads_dir", "parse_head_names", "features_path"]

log = logging.getLogger(__name__)

# Bumped when the fitting procedure changes, so saved heads are refitted, not reused.
PROCEDURE_VERSION = 2
FORMATS = HEAD_FORMATS
_SKOPS_TRUSTED_ROOTS = ("sklearn", "numpy", "scipy")


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class HeadSpec:
    """One kind of head: how to build its estimator and which hyper-parameter CV chooses.

    ``grid`` is ordered from the strongest to the weakest regularisation; that is the order of
    the warm-started path, and ties in CV accuracy go to the earlier (more regularised) value.
    """

    name: str
    label: str
    build: Callable[..., BaseEstimator]  # build(value, seed, warm_start) -> estimator
    param: Optional[str] = None
    grid: Tuple[float, ...] = ()
    refine: bool = False  # log-spaced refinement around the best coarse value
    warm_start: bool = False
    out_of_core: bool = False
    # An L2-penalised linear model: its weights lie in the span of the training rows, so CV
    # may fit it exactly in that span's SVD basis (see heads_cv).
    span: bool = False
    # An exact, faster CV path: cv_path(fold, values) -> (test predictions per value, not
    # converged) or None when it does not apply (then the estimator itself runs).
    cv_path: Optional[Callable] = None


def _decades(lo: int, hi: int, reverse: bool = False) -> Tuple[float, ...]:
    values = tuple(float(10.0 ** e) for e in range(lo, hi + 1))
    return values[::-1] if reverse else values


def _logistic(C, seed, warm_start=False, streamed=False):
    return LogisticRegression(C=C, max_iter=1000, warm_start=warm_start, random_state=seed)


def _sgd(loss):
    # scikit-learn's own stopping rule: 10% of the training rows (never val) are held out and
    # training stops once their accuracy has not improved by tol for n_iter_no_change epochs
    # (50 at most). partial_fit (out-of-core) has no epochs to stop: there the rule is off.
    def build(alpha, seed, warm_start=False, streamed=False):
        return SGDClassifier(loss=loss, alpha=alpha, max_iter=50, tol=1e-3, early_stopping=not streamed,
                             validation_fraction=0.1, n_iter_no_change=5, warm_start=warm_start,
                             random_state=seed)
    return build


def _linear_svm(C, seed, warm_start=False, streamed=False):
    return LinearSVC(C=C, max_iter=2000, random_state=seed)


def _ridge(alpha, seed, warm_start=False, streamed=False):
    return RidgeClassifier(alpha=alpha)


def _knn(k, seed, warm_start=False, streamed=False):
    return KNeighborsClassifier(n_neighbors=int(k))


def _centroid(_value, seed, warm_start=False, streamed=False):
    return NearestCentroid()


# The registry names every choice; an unknown name is an error listing these keys. The C grid
# of logistic regression spans 1e-6..1e5 like published linear-probe protocols.
REGISTRY: Dict[str, HeadSpec] = {spec.name: spec for spec in (
    HeadSpec("logistic", "logistic regression (lbfgs)", _logistic, "C", _decades(-6, 5), True, True,
             span=True, cv_path=logistic_path),
    # SGD is warm-started along alpha in CV (a few epochs per grid value instead of up to 50)
    # and stops by scikit-learn's early_stopping; the final head is one plain fit.
    HeadSpec("sgd_log", "SGD, log-loss", _sgd("log_loss"), "alpha", _decades(-6, 1, reverse=True), True, True,
             out_of_core=True, span=True),
    HeadSpec("sgd_hinge", "SGD, hinge loss", _sgd("hinge"), "alpha", _decades(-6, 1, reverse=True), True, True,
             out_of_core=True, span=True),
    HeadSpec("linear_svm", "linear SVM (liblinear, squared hinge)", _linear_svm, "C", _decades(-6, 2), True,
             span=True, cv_path=l2svm_path),
    HeadSpec("ridge", "ridge classifier", _ridge, "alpha", _decades(-3, 7, reverse=True), True, span=True,
             cv_path=ridge_path),
    HeadSpec("knn", "k-nearest neighbours", _knn, "n_neighbors", (31.0, 21.0, 15.0, 11.0, 7.0, 5.0, 3.0, 1.0)),
    HeadSpec("nearest_centroid", "nearest centroid", _centroid),
)}


def parse_head_names(values: Sequence[str]) -> Tuple[str, ...]:
    """``["logistic,ridge", "knn"]`` -> ``("logistic", "ridge", "knn")``; ``all`` = every head."""
    names: List[str] = []
    for value in values:
        for name in str(value).replace(",", " ").split():
            if name == "all":
                names.extend(REGISTRY)
            elif name not in REGISTRY:
                raise UserError(f"--heads {name!r} is not a known head. Only {', '.join(REGISTRY)} "
                                "(or all) are supported.")
            else:
                names.append(name)
    if not names:
        raise UserError(f"--heads is empty; choose from {', '.join(REGISTRY)} (or all)")
    return tuple(dict.fromkeys(names))


# --------------------------------------------------------------------------- results


@dataclass
class HeadRow:
    """One head of a run: where it is saved and its sidecar record (metrics, CV, timings)."""

    name: str
    model_path: str
    sidecar_path: str
    record: HeadRecord
    reused: bool = False

    @property
    def doc(self) -> dict:
        """The sidecar as JSON (``record.to_json()``)."""
        return self.record.to_json()


@dataclass
class HeadsResult:
    features: str
    pretrained: bool
    weights_id: str
    rows: List[HeadRow] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [f"heads on {self.features}"]
        if not self.pretrained:
            lines.append(f"  weights {self.weights_id}: not pretrained (random init), not a transfer-learning result")
        header = ("head", "val acc [95% CI]", "bal acc", "chosen", "cv acc", "fit s", "µs/img")
        table = []
        for row in self.rows:
            d = row.doc
            m = d["metrics"]
            lo, hi = m["accuracy_ci95"]
            best = d["cv"].get("best") or {}
            chosen = ", ".join(f"{k}={_fmt_value(v)}" for k, v in best.items()) or "-"
            cv_acc = d["cv"].get("best_score")
            table.append((
                row.name + (" (up to date)" if row.reused else ""),
                f"{m['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]", f"{m['balanced_accuracy']:.3f}", chosen,
                "-" if cv_acc is None else f"{cv_acc:.3f}", f"{d['fit_seconds']:.2f}",
                f"{d['predict_us_per_image']:.2f}",
            ))
        lines.append(format_table(header, table, rule=True))
        fitted = [r for r in self.rows if not r.reused]
        fit_s = sum(r.doc["fit_seconds"] for r in fitted)
        lines.append(f"  {len(fitted)} fitted (CV + refit {fit_s:.2f} s), {len(self.rows) - len(fitted)} up to date; "
                     f"{self.seconds:.2f} s in all; saved under {os.path.dirname(self.rows[0].model_path)}"
                     if self.rows else "  no heads")
        return "\n".join(lines)


def _fmt_value(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


# --------------------------------------------------------------------------- fitting


def _load_train(path: str, use_views: bool) -> TrainData:
    X, y, _paths, V = store.read_split(path, "train", views=use_views)
    n = len(y)
    if use_views:
        k = V.shape[1]
        X = np.concatenate([X, V.reshape(n * k, -1)])
        groups = np.concatenate([np.arange(n), np.repeat(np.arange(n), k)])
        y = np.concatenate([y, np.repeat(y, k)])
    else:
        k = 0
        groups = np.arange(n)
    return TrainData(X, y, groups, n, k)


def _n_splits(labels: np.ndarray, n_classes: int, wanted: int, classes: List[str]) -> int:
    counts = np.bincount(labels, minlength=n_classes)
    if counts.min() < 2:
        missing = [classes[i] for i in np.flatnonzero(counts < 2)]
        raise UserError(f"class(es) {missing} have fewer than 2 usable train images in the feature cache; "
                        "cross-validation needs at least 2 per class: add images to those class folders")
    return int(min(wanted, counts.min()))


def _head_pipeline(estimator: BaseEstimator, scaler: Optional[StandardScaler] = None) -> Pipeline:
    return Pipeline([("standardscaler", scaler if scaler is not None else StandardScaler()),
                     (type(estimator).__name__.lower(), estimator)])


def _fit_in_memory(spec: HeadSpec, data: TrainData, folds: list, cfg: HeadsConfig,
                   split_text: str) -> Tuple[Pipeline, dict, float, List[str]]:
    start = time.perf_counter()
    cv = cross_validate(spec, folds, cfg.seed, cfg.jobs, split_text)
    value = cv["best"].get(spec.param) if spec.param else None
    model = _head_pipeline(spec.build(value, cfg.seed))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(data.X, data.y)
    notes = [str(w.message).splitlines()[0] for w in caught if issubclass(w.category, ConvergenceWarning)]
    return model, cv, time.perf_counter() - start, notes


# --------------------------------------------------------------------------- out-of-core


def _stream_train(path: str, n: int, chunk_rows: int, rng: np.random.Generator
                  ) -> Iterator[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Shuffled ``(X, y, row_index)`` batches of about ``chunk_rows`` rows, read as random
    blocks: a cache is stored class by class, so sequential chunks would each hold one class."""
    block = max(1, chunk_rows // 8)
    n_blocks = -(-n // block)
    order = rng.permutation(n_blocks)
    buf_x, buf_y, buf_i = [], [], []
    for b, (X, y) in zip(order, store.iter_split_chunks(path, "train", block, order=order)):
        buf_x.append(X)
        buf_y.append(y)
        buf_i.append(np.arange(b * block, b * block + len(y)))
        if sum(len(v) for v in buf_y) >= chunk_rows:
            yield _shuffled(buf_x, buf_y, buf_i, rng)
            buf_x, buf_y, buf_i = [], [], []
    if buf_y:
        yield _shuffled(buf_x, buf_y, buf_i, rng)


def _shuffled(xs, ys, idx, rng):
    X, y, i = np.concatenate(xs), np.concatenate(ys), np.concatenate(idx)
    p = rng.permutation(len(y))
    return X[p], y[p], i[p]


def _fit_out_of_core(spec: HeadSpec, path: str, meta: dict, cfg: HeadsConfig, n_classes: int,
                     classes: List[str]) -> Tuple[Pipeline, dict, float, List[str]]:
    """SGD with ``partial_fit`` over HDF5 chunks; memory is O(chunk_rows) plus 9 bytes per row.

    A first pass fits the final scaler and reads the labels, which fix a stratified hold-out
    fold (1/k of train); a second pass fits the CV scaler on the other rows. The alpha grid
    is trained in the same passes on those rows and scored on the hold-out fold; the chosen
    alpha is then refitted on every train row.
    """
    start = time.perf_counter()
    n, step = int(meta["splits"]["train"]["n"]), cfg.chunk_rows
    scaler, cv_scaler, labels = StandardScaler(), StandardScaler(), np.empty(n, np.int64)
    for i, (X, y) in enumerate(store.iter_split_chunks(path, "train", step)):
        scaler.partial_fit(X)
        labels[i * step: i * step + len(y)] = y
    n_splits = _n_splits(labels, n_classes, cfg.cv_folds, classes)
    holdout = np.zeros(n, bool)
    _, test = next(splitter(n_splits, cfg.seed).split(np.zeros((n, 1), np.int8), labels))
    holdout[test] = True
    for i, (X, _y) in enumerate(store.iter_split_chunks(path, "train", step)):
        cv_scaler.partial_fit(X[~holdout[i * step: i * step + len(X)]])
    all_classes = np.arange(n_classes)
    rng = np.random.default_rng(cfg.seed)
    models = [spec.build(a, cfg.seed, streamed=True) for a in spec.grid]
    for _ in range(cfg.epochs):
        for X, y, rows in _stream_train(path, n, step, rng):
            keep = ~holdout[rows]
            if keep.any():
                Xs = cv_scaler.transform(X[keep])
                for m in models:
                    m.partial_fit(Xs, y[keep], classes=all_classes)
    correct = np.zeros(len(models))
    for i, (X, y) in enumerate(store.iter_split_chunks(path, "train", step)):
        mask = holdout[i * step: i * step + len(y)]
        if mask.any():
            Xs = cv_scaler.transform(X[mask])
            correct += [np.sum(m.predict(Xs) == y[mask]) for m in models]
    acc = correct / max(1, holdout.sum())
    best_i = int(np.argmax(acc))
    best = spec.grid[best_i]
    cv = {"metric": "accuracy", "splitter": f"stratified hold-out fold (1/{n_splits} of train rows), streamed",
          "folds": 1, "param": spec.param, "val_used": False, "grid": list(spec.grid),
          "mean": [float(a) for a in acc], "std": [0.0] * len(acc), "best": {spec.param: best},
          "best_score": float(acc[best_i]), "best_std": 0.0, "refined": False, "not_converged": 0,
          "out_of_core": {"chunk_rows": cfg.chunk_rows, "epochs": cfg.epochs, "rows": n}}
    cv["seconds"] = time.perf_counter() - start
    final = spec.build(best, cfg.seed, streamed=True)
    for _ in range(cfg.epochs):
        for X, y, _rows in _stream_train(path, n, cfg.chunk_rows, rng):
            final.partial_fit(scaler.transform(X), y, classes=all_classes)
    return _head_pipeline(final, scaler), cv, time.perf_counter() - start, []


# --------------------------------------------------------------------------- persistence


def _versions(fmt: str) -> Dict[str, str]:
    names = ("python", "sklearn", "numpy", "scipy", "joblib", "h5py", "pipeline")
    return library_versions(*names, *(("skops",) if fmt == "skops" else ()))


def _serialize(model: Pipeline, fmt: str) -> bytes:
    if fmt == "skops":
        try:
            import skops.io as sio
        except ImportError:
            raise UserError("--format skops needs the optional skops package: pip install 'pipeline[skops]' "
                            "(or pip install skops), or use --format joblib") from None
        return sio.dumps(model)
    import joblib

    buf = io.BytesIO()
    joblib.dump(model, buf)
    return buf.getvalue()


def _save(directory: str, record: HeadRecord, data: bytes) -> Tuple[str, str]:
    """Model file, then sidecar, each atomically, under a lock on the heads folder.

    The old sidecar goes first: between the two renames a reader sees a model without a
    sidecar (incomplete, ignored), never a sidecar describing a different model.
    """
    from filelock import FileLock

    text = record.dumps().encode("utf-8")
    os.makedirs(directory, exist_ok=True)
    model_path = os.path.join(directory, record.model_file)
    sidecar = os.path.join(directory, f"{record.name}.json")
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
    return model_path, sidecar


def _up_to_date(directory: str, name: str, settings: dict) -> Optional[HeadRow]:
    sidecar = os.path.join(directory, f"{name}.json")
    try:
        record = HeadRecord.from_json(read_json(sidecar))
        model_path = os.path.join(directory, record.model_file)
        if record.settings != settings or files.file_digest(model_path, "sha256") != record.sha256:
            return None
    except (OSError, ValueError):  # missing, damaged or another schema: refit
        return None
    return HeadRow(name, model_path, sidecar, record, reused=True)


# --------------------------------------------------------------------------- the stage


def features_path(cfg: HeadsConfig) -> str:
    """The feature cache the heads stage reads: ``--features`` or the one `features` names."""
    if cfg.features:
        return cfg.features
    from . import features
    from .config import FeaturesConfig

    path = features.resolve(FeaturesConfig(
        data=cfg.data, cache=cfg.cache, weights=cfg.weights, device=cfg.device, precision=cfg.precision,
        views=cfg.views, seed=cfg.seed)).path
    if not os.path.isfile(path):
        raise UserError(
            f"no feature cache for these settings ({path!r} does not exist); run `python -m pipeline features` "
            "with the same --data, --cache, --weights, --views and --precision first (make heads does), "
            "or pass --features FILE")
    return path


def _chosen_heads(cfg: HeadsConfig) -> Tuple[str, ...]:
    """The registry names ``cfg.heads`` selects; under ``out_of_core``, those that can stream."""
    names = parse_head_names(cfg.heads)
    if cfg.out_of_core:
        skipped = [n for n in names if not REGISTRY[n].out_of_core]
        names = tuple(n for n in names if REGISTRY[n].out_of_core)
        if not names:
            ooc = [s.name for s in REGISTRY.values() if s.out_of_core]
            raise UserError(f"--out-of-core trains only {', '.join(ooc)}; pass --heads {','.join(ooc)}")
        if skipped:
            warnings.warn(f"--out-of-core: skipping {', '.join(skipped)} (in-memory heads only); pass "
                          f"--heads {','.join(names)} to choose the out-of-core heads explicitly")
    return names


def _file_name(name: str, cfg: HeadsConfig) -> str:
    return name + ("-views" if cfg.use_views else "") + ("-ooc" if cfg.out_of_core else "")


def _settings(spec: HeadSpec, cfg: HeadsConfig, meta: dict) -> dict:
    """Everything that determines a fitted head; an equal saved sidecar means "up to date"."""
    estimator = _jsonable_params(spec.build(spec.grid[0] if spec.grid else None, cfg.seed,
                                            streamed=cfg.out_of_core))
    estimator.pop(spec.param, None)
    s = {"head": spec.name, "procedure_version": PROCEDURE_VERSION, "features_content_key": meta["content_key"],
         "features_settings_key": meta["settings_key"], "cv_folds": cfg.cv_folds, "seed": cfg.seed,
         "use_views": cfg.use_views, "out_of_core": cfg.out_of_core, "format": cfg.format,
         "param": spec.param, "grid": list(spec.grid), "refine": spec.refine, "estimator": estimator}
    if cfg.out_of_core:
        s.update(chunk_rows=cfg.chunk_rows, epochs=cfg.epochs)
    return s


def _jsonable_params(est: BaseEstimator) -> dict:
    return {k: v for k, v in est.get_params(deep=False).items()
            if isinstance(v, (str, int, float, bool, type(None))) and not (isinstance(v, float) and not math.isfinite(v))}


def _trainable_parameters(est: BaseEstimator) -> int:
    total = 0
    for attr in ("coef_", "intercept_", "centroids_"):
        value = getattr(est, attr, None)
        if value is not None:
            total += int(np.size(value))
    return total


def _predict_us(model: Pipeline, X: np.ndarray) -> float:
    """Best of three timings of a batched predict, in microseconds per image."""
    if len(X) == 0:
        return 0.0
    best = math.inf
    for _ in range(3):
        t = time.perf_counter()
        model.predict(X)
        best = min(best, time.perf_counter() - t)
    return 1e6 * best / len(X)


def _features_ref(path: str, meta: dict) -> FeaturesRef:
    if not isinstance(meta.get("weights"), dict):
        raise UserError(f"feature cache {path!r} was written by an older version of pipeline (no structured "
                        "weights record); rerun `python -m pipeline features --rebuild`")
    try:
        weights = WeightsRef.from_json(meta["weights"], where="weights")
    except RecordError as exc:
        raise UserError(f"feature cache {path!r} has a damaged weights record ({exc}); rerun "
                        "`python -m pipeline features --rebuild`") from None
    return FeaturesRef(
        path=path, content_key=meta["content_key"], settings_key=meta["settings_key"], weights=weights,
        backbone=meta.get("backbone", ""), precision=meta.get("precision", ""),
        extract_seconds=float(meta.get("extract_seconds", 0.0)), extract_device=meta.get("extract_device", ""),
        n_images=int(sum(meta["splits"][s]["n"] for s in ("train", "val") if s in meta["splits"])),
        draft=(meta.get("transform") or {}).get("draft_jpeg_min_side") is not None,
    )


def run(cfg: HeadsConfig) -> HeadsResult:
    """Fit (or reuse, when up to date) every head in ``cfg.heads`` and save it with its sidecar."""
    started = time.perf_counter()
    names = _chosen_heads(cfg)
    path = features_path(cfg)
    meta = store.read_meta(path)
    _features_ref(path, meta)  # an old cache is refused before any fitting
    classes = list(meta["classes"])
    if cfg.use_views and not meta["splits"].get("train", {}).get("views"):
        raise UserError(f"feature cache {path!r} has no augmented views; extract them with "
                        "`python -m pipeline features --views K` and pass the same --views K here")
    result = HeadsResult(path, bool(meta.get("pretrained", True)), str(meta.get("weights_id", "")))
    directory = heads_dir(cfg.cache)
    todo = []
    for name in names:
        spec = REGISTRY[name]
        row = None if cfg.rebuild else _up_to_date(directory, _file_name(name, cfg), _settings(spec, cfg, meta))
        result.rows.append(row)
        if row is None:
            todo.append(len(result.rows) - 1)
    if todo:
        _fit_all(cfg, path, meta, classes, names, todo, result, directory)
    result.seconds = time.perf_counter() - started
    return result


def _fit_all(cfg, path, meta, classes, names, todo, result, directory) -> None:
    from threadpoolctl import threadpool_limits

    X_val, y_val, val_paths, _ = store.read_split(path, "val")
    if len(y_val) == 0:
        raise UserError(f"feature cache {path!r} has no usable val images; add images under val/<class>/")
    data = folds = None
    split_text = ""
    # Small problems: BLAS threads cost more than they give (and the machine may be shared).
    with threadpool_limits(limits=1 if cfg.out_of_core or meta["splits"]["train"]["n"] < 20000 else None):
        if not cfg.out_of_core:
            data = _load_train(path, cfg.use_views)
            n_splits = _n_splits(data.y[:data.n_images], len(classes), cfg.cv_folds, classes)
            folds = make_folds(data, n_splits, cfg.seed)
            split_text = (f"StratifiedKFold(n_splits={n_splits}, shuffle=True, random_state={cfg.seed}) over images"
                        + (f"; grouped: the {data.views} views of an image stay in its fold, held-out folds "
                           "scored on plain features" if cfg.use_views else ""))
        for i in todo:
            spec = REGISTRY[names[i]]
            if cfg.out_of_core:
                model, cv, fit_s, notes = _fit_out_of_core(spec, path, meta, cfg, len(classes), classes)
            else:
                model, cv, fit_s, notes = _fit_in_memory(spec, data, folds, cfg, split_text)
            result.rows[i] = _finish(spec, cfg, path, meta, classes, model, cv, fit_s, notes,
                                     X_val, y_val, val_paths, directory)


def _finish(spec, cfg, path, meta, classes, model, cv, fit_s, notes, X_val, y_val, val_paths,
            directory) -> HeadRow:
    """Evaluate on val (once, after every choice), then save the model and its sidecar."""
    est = model[-1]
    y_pred = model.predict(X_val)
    proba = model.predict_proba(X_val) if hasattr(model, "predict_proba") else None
    name = _file_name(spec.name, cfg)
    data = _serialize(model, cfg.format)
    record = HeadRecord(
        name=name,
        method=f"frozen {meta.get('backbone', 'resnet18')} features + {spec.label}"
               + (" (augmented views)" if cfg.use_views else "") + (" (out-of-core)" if cfg.out_of_core else ""),
        metrics=metrics_mod.evaluate(y_val, y_pred, classes, val_paths, proba),
        fit_seconds=float(fit_s),
        predict_us_per_image=_predict_us(model, X_val),
        cv=cv,
        hyperparameters=_jsonable_params(est),
        trainable_parameters=_trainable_parameters(est),
        features=_features_ref(path, meta),
        classes=classes,
        data_root=meta.get("data_root", ""),
        versions=_versions(cfg.format),
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        used_views=bool(cfg.use_views),
        has_proba=proba is not None,
        warnings=notes,
        settings=_settings(spec, cfg, meta),
        model_file=f"{name}.{cfg.format}",
        format=cfg.format,
        sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
    )
    model_path, sidecar = _save(directory, record, data)
    return HeadRow(name, model_path, sidecar, record)


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

        ``features``: a feature-cache path or its :func:`pipeline.store.read_meta` dict.
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
    import joblib

    return joblib.load(io.BytesIO(data))


def _warn_versions(saved: dict, name: str, caught: List[warnings.WarningMessage]) -> None:
    """One clear warning naming both versions when the head was saved under other libraries."""
    import sklearn

    version_warnings = [w for w in caught if issubclass(w.category, InconsistentVersionWarning)]
    for w in caught:
        if w not in version_warnings:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    original = saved.get("sklearn")
    if version_warnings and not original:
        original = version_warnings[0].message.original_sklearn_version
    if (original and original != sklearn.__version__) or version_warnings:
        if version_warnings and original == sklearn.__version__:
            original = version_warnings[0].message.original_sklearn_version
        warnings.warn(InconsistentVersionWarning(estimator_name=f"head {name!r}",
                                                 current_sklearn_version=sklearn.__version__,
                                                 original_sklearn_version=original))
    for lib in ("numpy", "scipy"):
        import importlib

        current = importlib.import_module(lib).__version__
        if saved.get(lib) and saved[lib].split(".")[0] != current.split(".")[0]:
            warnings.warn(f"head {name!r} was saved with {lib} {saved[lib]}, this is {lib} {current}; "
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
