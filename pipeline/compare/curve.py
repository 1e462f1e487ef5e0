"""The data-size curve: val accuracy of every head against the labelled images per class.

For each ``k`` in 1, 2, 4, 8, ... (and finally every train image), each head is fitted on
``n_subsets`` seeded, stratified subsets of *train* holding ``k`` images per class
(:func:`pipeline.data.splits.per_class_subset`; the subsets of one number are nested as ``k``
grows). Inside a subset the head's hyper-parameter is chosen exactly as the heads stage
chooses it, by stratified k-fold CV on that subset alone (``min(cv_folds, k)`` folds).

The SGD heads stop early on a 10% validation split of their training rows (scikit-learn's
``early_stopping``), which needs at least 10 images per class in every fit: below that (the
small ``k``) they run their fixed 50 epochs instead, in CV and in the final fit alike.

Fallback at ``k = 1``: one image per class leaves nothing to cross-validate, so each head uses
its estimator's scikit-learn default for the hyper-parameter (``C=1``, ``alpha=1e-4`` for
SGD, ``alpha=1`` for ridge), and kNN uses ``n_neighbors=1``: a choice fixed before seeing any data, never
val. The val split is read by the caller and passed in only to score the fitted heads; no
choice here depends on it (tests/test_curve.py permutes the val labels to check).

Functions take arrays only; the compare stage reads the feature cache and writes the figure
and the numbers.
"""
from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
from scipy.linalg import LinAlgWarning
from sklearn.exceptions import ConvergenceWarning
from threadpoolctl import threadpool_limits

from ..heads.stage import REGISTRY
from ..heads.cv import TrainData, cross_validate, make_folds
from ..heads.saved import head_pipeline
from ..data.splits import per_class_subset

__all__ = ["FALLBACK", "CurveResult", "sizes", "heads_curve"]

FALLBACK = ("k=1: no CV possible (one image per class); each head uses its estimator's scikit-learn default "
            "(kNN: 1 neighbour)")


def sizes(labels: np.ndarray) -> List[int]:
    """1, 2, 4, ... below the smallest class's count, then that count (every image of it)."""
    smallest = int(np.bincount(labels).min()) if len(labels) else 0
    out, k = [], 1
    while k < smallest:
        out.append(k)
        k *= 2
    return out + ([smallest] if smallest else [])


@dataclass
class CurveResult:
    """The curve; arrays are indexed ``[head, k, subset]``.

    Attributes
    ----------
    heads : list of str
    ks : list of int
        Labelled train images per class at each point; the last one is the smallest class's
        whole count (``all``: every train image of that class, and up to it of the others).
    n_subsets : int
        Subsets per ``k``; where ``k`` reaches every image of every class only subset 0 exists.
    accuracy : ndarray of shape (n_heads, n_ks, n_subsets)
        Val accuracy; NaN where a subset does not exist.
    correct : ndarray of bool, shape (n_heads, n_ks, n_subsets, n_val)
        Per val image, right or wrong, for every subset (False where a subset does not exist:
        see ``accuracy``); the paired tests at each ``k`` use every subset, as seeds.
    fit_seconds : ndarray of shape (n_heads, n_ks)
        Mean process time of choosing and fitting one head on one subset.
    chosen : list of list of list
        The hyper-parameter chosen for each ``[head][k][subset]`` (None: the head has none).
    rule : list of str
        How each ``k``'s hyper-parameters were chosen (``cv: ...`` or the fallback).
    seed : int
    seconds : float
        Process time of the whole curve.
    """

    heads: List[str]
    ks: List[int]
    n_subsets: int
    accuracy: np.ndarray
    correct: np.ndarray
    fit_seconds: np.ndarray
    chosen: List[List[List[object]]]
    rule: List[str]
    seed: int
    train_counts: List[int] = field(default_factory=list)
    seconds: float = 0.0
    n_images: Optional[np.ndarray] = None  # (n_ks,) train images in a subset of each k

    def subsets(self, i: int, j: int) -> np.ndarray:
        """``(n_existing_subsets, n_val)`` bool: head ``i`` at ``k`` index ``j``, every subset."""
        return self.correct[i, j][~np.isnan(self.accuracy[i, j])]

    def mean_std(self) -> tuple:
        """``(mean, std)`` of shape (n_heads, n_ks); std is the sample std over subsets (0 for one)."""
        mean = np.nanmean(self.accuracy, axis=2)
        n = np.sum(~np.isnan(self.accuracy), axis=2)
        centred = np.where(np.isnan(self.accuracy), 0.0, self.accuracy - mean[..., None])
        std = np.sqrt(np.sum(centred ** 2, axis=2) / np.maximum(n - 1, 1))
        return mean, np.where(n > 1, std, 0.0)


def _default_value(name: str, n_train: int):
    spec = REGISTRY[name]
    if spec.param is None:
        return None
    if spec.param == "n_neighbors":
        return 1  # the default 5 would exceed the training images of a 2-class k=1 subset
    return type(spec.build(spec.grid[0], 0))().get_params()[spec.param]


# scikit-learn's early stopping holds out 10% of a fit's rows stratified: every class needs a row there.
_EARLY_STOPPING_MIN_PER_CLASS = 10


def _spec(name: str, per_class: int):
    """The head's spec; SGD heads without early stopping when a fit has too few images per class."""
    spec = REGISTRY[name]
    if per_class >= _EARLY_STOPPING_MIN_PER_CLASS or not spec.out_of_core:  # out_of_core: the SGD heads
        return spec
    build = spec.build
    return dataclasses.replace(spec, build=lambda v, s, warm_start=False, streamed=False:
                               build(v, s, warm_start=warm_start, streamed=True))


def _fit_predict(spec, X: np.ndarray, y: np.ndarray, folds, X_val: np.ndarray, seed: int):
    if folds is not None:
        value = cross_validate(spec, folds, seed, 1, "curve").get("best", {}).get(spec.param)
    else:
        value = _default_value(spec.name, len(y))
    model = head_pipeline(spec.build(value, seed))
    model.fit(X, y)
    return model.predict(X_val), value


def heads_curve(X_train: np.ndarray, y_train: np.ndarray, X_val: np.ndarray, y_val: np.ndarray,
                heads: Sequence[str], *, n_subsets: int = 5, seed: int = 0, cv_folds: int = 5,
                ks: Optional[Sequence[int]] = None, keys: Optional[Sequence[str]] = None) -> CurveResult:
    """Fit every head on seeded stratified subsets of train with ``k`` images per class.

    Parameters
    ----------
    X_train : ndarray of shape (n_train, n_features)
    y_train : ndarray of shape (n_train,)
    X_val, y_val : the val split; used only to score heads already fitted.
    heads : names in :data:`pipeline.heads.stage.REGISTRY`
    n_subsets : int, at least 5 for the report
    seed : int
        Subset ``s`` of size ``k`` is ``per_class_subset(y_train, k, (seed, s), keys)``; with the
        default seed (:data:`pipeline.data.splits.CURVE_SEED`) it is
        :func:`pipeline.data.splits.train_subset` draw ``s``, the images an end-to-end run
        ``--train-per-class k --seed s`` trains on.
    ks : sizes to use (default :func:`sizes`); any k from 1 to the largest class
    keys : sequence of str of shape (n_train,), optional
        The train images' relative paths (the subsets then do not depend on their order).
    """
    started = time.process_time()
    y_train, y_val = np.asarray(y_train), np.asarray(y_val)
    ks = list(ks) if ks is not None else sizes(y_train)
    counts = np.bincount(y_train)
    shape = (len(heads), len(ks))
    accuracy = np.full(shape + (n_subsets,), np.nan)
    correct = np.zeros(shape + (n_subsets, len(y_val)), dtype=bool)
    n_images = np.zeros(len(ks), dtype=int)
    fit_seconds = np.zeros(shape)
    chosen: List[List[List[object]]] = [[[] for _ in ks] for _ in heads]
    rule = []
    with threadpool_limits(limits=1), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # tiny subsets: counted by the heads stage, not here
        warnings.simplefilter("ignore", LinAlgWarning)
        for j, k in enumerate(ks):
            every = k >= counts.max()  # every subset is the whole train split: one is enough
            n_folds = min(cv_folds, k)
            rule.append(FALLBACK if n_folds < 2 else
                        f"cv: StratifiedKFold(n_splits={n_folds}) inside each subset")
            for s in range(1 if every else n_subsets):
                idx = per_class_subset(y_train, k, (seed, s), keys=keys)
                n_images[j] = len(idx)
                X, y = X_train[idx], y_train[idx]
                folds = (make_folds(TrainData(X, y, np.arange(len(y)), len(y), 0), n_folds, seed)
                         if n_folds >= 2 else None)
                smallest = int(np.bincount(y).min())
                per_class = smallest * (n_folds - 1) // n_folds if n_folds >= 2 else smallest  # in a CV fit
                for i, name in enumerate(heads):
                    t = time.process_time()
                    pred, value = _fit_predict(_spec(name, per_class), X, y, folds, X_val, seed)
                    fit_seconds[i, j] += time.process_time() - t
                    accuracy[i, j, s] = float(np.mean(pred == y_val))
                    chosen[i][j].append(value)
                    correct[i, j, s] = pred == y_val
            fit_seconds[:, j] /= 1 if every else n_subsets
    return CurveResult(list(heads), ks, n_subsets, accuracy, correct, fit_seconds, chosen, rule, seed,
                       [int(c) for c in counts], time.process_time() - started, n_images)


def to_json(curve: CurveResult) -> Dict[str, object]:
    """JSON-able numbers of the curve (what compare.json stores)."""
    mean, std = curve.mean_std()
    return {
        "x": "labelled train images per class", "y": "val accuracy", "ks": curve.ks, "n_subsets": curve.n_subsets,
        "seed": curve.seed, "subset_rule": "per_class_subset(train labels, k, (seed, s)): k seeded images per class",
        "choice_rule": curve.rule, "train_counts": curve.train_counts, "tests_use_subsets": "every subset",
        "seconds_process_time": curve.seconds,
        "heads": {name: [{"k": k, "mean": float(mean[i, j]), "std": float(std[i, j]),
                          "n_subsets": int(np.sum(~np.isnan(curve.accuracy[i, j]))),
                          "accuracies": [float(a) for a in curve.accuracy[i, j] if not np.isnan(a)],
                          "chosen": curve.chosen[i][j], "fit_seconds": float(curve.fit_seconds[i, j])}
                         for j, k in enumerate(curve.ks)]
                  for i, name in enumerate(curve.heads)},
    }
