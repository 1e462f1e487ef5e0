"""Stage 2: fit, evaluate and save classical scikit-learn heads on the cached features.

Every head is a ``Pipeline(StandardScaler, estimator)`` fitted on the train split only. Its
hyper-parameter is chosen by stratified k-fold cross-validation on train (grouped by image
when augmented views are used): a coarse log-spaced grid, walked from the strongest to the
weakest regularisation (warm-started along it), then refined around the best point (see
heads.cv). The val split is touched once, after every choice is made, to report metrics.

This module is the registry of heads and the stage's ``run``; the other jobs live beside it:

* :mod:`pipeline.heads.cv` — folds, the exact fast CV paths, the sweep;
* :mod:`pipeline.heads.stream` — the out-of-core trainer (``--out-of-core``);
* :mod:`pipeline.heads.saved` — saving (model file + sidecar) and :func:`load_head`/:class:`Head`,
  re-exported here.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, RidgeClassifier, SGDClassifier
from sklearn.neighbors import KNeighborsClassifier, NearestCentroid
from sklearn.pipeline import Pipeline
from sklearn.svm import LinearSVC
from threadpoolctl import threadpool_limits

from . import saved
from ..features import store
from .. import metrics as metrics_mod
from ..config import HeadsConfig
from ..errors import UserError
from .cv import (Fitted,
    Fold,
    TrainData,
    cross_validate,
    fit_ready,
    l2svm_path,
    logistic_path,
    make_folds,
    n_splits,
    ridge_path)
from .saved import FORMATS, Head, head_pipeline, load_head
from .stream import fit_out_of_core
from ..paths import for_backbone, heads_dir
from ..records import FeaturesRef, HeadRecord, RecordError, WeightsRef
from ..text import format_table

__all__ = ["HeadSpec", "REGISTRY", "HeadRow", "HeadsResult", "HeadsRun", "Head", "run", "load_head",
           "heads_dir", "parse_head_names", "features_path", "FORMATS", "UserError"]

log = logging.getLogger(__name__)

# Bumped when the fitting procedure changes, so saved heads are refitted, not reused.
PROCEDURE_VERSION = 2


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
    # may fit it exactly in that span's SVD basis (see heads.cv).
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
    # SGD's CV fits each alpha cold, as the final head is fitted: a warm start along alpha (with
    # early stopping) scores another estimator than the refit builds (tests/test_heads.py).
    HeadSpec("sgd_log", "SGD, log-loss", _sgd("log_loss"), "alpha", _decades(-6, 1, reverse=True), True, False,
             out_of_core=True, span=True),
    HeadSpec("sgd_hinge", "SGD, hinge loss", _sgd("hinge"), "alpha", _decades(-6, 1, reverse=True), True, False,
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

    @classmethod
    def of(cls, saved: saved.Saved, reused: bool = False) -> "HeadRow":
        return cls(saved.record.name, saved.model_path, saved.sidecar_path, saved.record, reused)

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


def _fit_in_memory(spec: HeadSpec, data: TrainData, folds: List[Fold], ctx: "HeadsRun") -> Fitted:
    start = time.perf_counter()
    cv = cross_validate(spec, folds, ctx.cfg.seed, ctx.cfg.jobs, ctx.split_text)
    value = cv["best"].get(spec.param) if spec.param else None
    model = head_pipeline(fit_ready(spec.build(value, ctx.cfg.seed), data.y))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(data.X, data.y)
    notes = [str(w.message).splitlines()[0] for w in caught if issubclass(w.category, ConvergenceWarning)]
    return Fitted(model, cv, time.perf_counter() - start, notes)


# --------------------------------------------------------------------------- the stage


def features_path(cfg: HeadsConfig) -> str:
    """The feature cache the heads stage reads: ``--features`` or the one `features` names."""
    if cfg.features:
        return cfg.features
    from ..features import uptodate
    from ..config import FeaturesConfig

    request = FeaturesConfig(data=cfg.data, cache=cfg.cache, backbone=cfg.backbone, weights=cfg.weights,
                             device=cfg.device, precision=cfg.precision, views=cfg.views, seed=cfg.seed)
    path = uptodate.cache_path(request)  # straight after `features`: its stamp, without importing torch
    if path is not None:
        return path
    from .. import features

    # From the features stage's index: no weights loaded, no image folder listed.
    return features.find_cache(request)


def _chosen_heads(cfg: HeadsConfig) -> Tuple[str, ...]:
    """The registry names ``cfg.heads`` selects; under ``out_of_core``, those that can stream
    (the default suite, which has none, means every head that can)."""
    names = parse_head_names(cfg.heads)
    if cfg.out_of_core:
        ooc = [s.name for s in REGISTRY.values() if s.out_of_core]
        if tuple(cfg.heads) == HeadsConfig.heads:
            return tuple(ooc)
        skipped = [n for n in names if not REGISTRY[n].out_of_core]
        names = tuple(n for n in names if REGISTRY[n].out_of_core)
        if not names:
            raise UserError(f"--out-of-core trains only {', '.join(ooc)}; pass --heads {','.join(ooc)}")
        if skipped:
            warnings.warn(f"--out-of-core: skipping {', '.join(skipped)} (in-memory heads only); pass "
                          f"--heads {','.join(names)} to choose the out-of-core heads explicitly")
    return names


def _file_name(name: str, cfg: HeadsConfig, meta: dict) -> str:
    """``[<backbone>-]<head>[-views][-ooc]``: heads of several backbones live side by side in one
    folder; the default backbone's keep their plain names."""
    return for_backbone(meta.get("backbone", ""), name + ("-views" if cfg.use_views else "")
                        + ("-ooc" if cfg.out_of_core else ""))


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


@dataclass
class HeadsRun:
    """What every head of one ``heads`` run shares: the settings, the feature cache (path and
    metadata), where heads are saved, and the val split (read once, scored after every choice)."""

    cfg: HeadsConfig
    path: str
    meta: dict
    directory: str
    X_val: Optional[np.ndarray] = None
    y_val: Optional[np.ndarray] = None
    val_paths: List[str] = field(default_factory=list)
    split_text: str = ""  # how CV split train, for the sidecar

    @property
    def classes(self) -> List[str]:
        return list(self.meta["classes"])


def run(cfg: HeadsConfig) -> HeadsResult:
    """Fit (or reuse, when up to date) every head in ``cfg.heads`` and save it with its sidecar."""
    started = time.perf_counter()
    names = _chosen_heads(cfg)
    path = features_path(cfg)
    meta = store.read_meta(path)
    _features_ref(path, meta)  # an old cache is refused before any fitting
    if cfg.use_views and not meta["splits"].get("train", {}).get("views"):
        raise UserError(f"feature cache {path!r} has no augmented views; extract them with "
                        "`python -m pipeline features --views K` and pass the same --views K here")
    ctx = HeadsRun(cfg, path, meta, heads_dir(cfg.cache))
    result = HeadsResult(path, bool(meta.get("pretrained", True)), str(meta.get("weights_id", "")))
    todo = []
    for name in names:
        spec = REGISTRY[name]
        found = None if cfg.rebuild else saved.find_saved(ctx.directory, _file_name(name, cfg, ctx.meta),
                                                             _settings(spec, cfg, meta))
        result.rows.append(None if found is None else HeadRow.of(found, reused=True))
        if found is None:
            todo.append(spec)
    if todo:
        fitted = iter(_fit_all(ctx, todo))
        result.rows = [row if row is not None else next(fitted) for row in result.rows]
    result.seconds = time.perf_counter() - started
    return result


def _fit_all(ctx: HeadsRun, specs: List[HeadSpec]) -> List[HeadRow]:
    """Fit, score on val and save each head of ``specs``, in order."""
    cfg = ctx.cfg
    ctx.X_val, ctx.y_val, ctx.val_paths, _ = store.read_split(ctx.path, "val")
    if len(ctx.y_val) == 0:
        raise UserError(f"feature cache {ctx.path!r} has no usable val images; add images under val/<class>/")
    rows = []
    # Small problems: BLAS threads cost more than they give (and the machine may be shared).
    with threadpool_limits(limits=1 if cfg.out_of_core or ctx.meta["splits"]["train"]["n"] < 20000 else None):
        if not cfg.out_of_core:
            data = _load_train(ctx.path, cfg.use_views)
            k = n_splits(data.y[:data.n_images], ctx.classes, cfg.cv_folds)
            folds = make_folds(data, k, cfg.seed)
            ctx.split_text = (f"StratifiedKFold(n_splits={k}, shuffle=True, random_state={cfg.seed}) over images"
                              + (f"; grouped: the {data.views} views of an image stay in its fold, held-out "
                                 "folds scored on plain features" if cfg.use_views else ""))
        for spec in specs:
            if cfg.out_of_core:
                fitted = fit_out_of_core(spec, ctx.path, cfg, ctx.classes, int(ctx.meta["splits"]["train"]["n"]))
            else:
                fitted = _fit_in_memory(spec, data, folds, ctx)
            rows.append(_finish(ctx, spec, fitted))
    return rows


def _finish(ctx: HeadsRun, spec: HeadSpec, fitted: Fitted) -> HeadRow:
    """Evaluate on val (once, after every choice), then save the model and its sidecar."""
    cfg, model = ctx.cfg, fitted.model
    est = model[-1]
    y_pred = model.predict(ctx.X_val)
    proba = model.predict_proba(ctx.X_val) if hasattr(model, "predict_proba") else None
    name = _file_name(spec.name, cfg, ctx.meta)
    data = saved.serialize(model, cfg.format)
    record = HeadRecord(
        name=name,
        method=f"frozen {ctx.meta.get('backbone', 'resnet18')} features + {spec.label}"
               + (" (augmented views)" if cfg.use_views else "") + (" (out-of-core)" if cfg.out_of_core else ""),
        metrics=metrics_mod.evaluate(ctx.y_val, y_pred, ctx.classes, ctx.val_paths, proba),
        fit_seconds=float(fitted.seconds),
        predict_us_per_image=_predict_us(model, ctx.X_val),
        cv=fitted.cv,
        hyperparameters=_jsonable_params(est),
        trainable_parameters=_trainable_parameters(est),
        features=_features_ref(ctx.path, ctx.meta),
        classes=ctx.classes,
        data_root=ctx.meta.get("data_root", ""),
        versions=saved.versions(cfg.format),
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        used_views=bool(cfg.use_views),
        has_proba=proba is not None,
        warnings=fitted.notes,
        settings=_settings(spec, cfg, ctx.meta),
        model_file=f"{name}.{cfg.format}",
        format=cfg.format,
        sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
    )
    return HeadRow.of(saved.save(ctx.directory, record, data))
