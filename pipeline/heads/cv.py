"""Cross-validation of the heads on the train split: folds, exact fast paths, the sweep.

Why fast paths: scikit-learn fits one estimator per fold and grid value, and on cached
features its per-``fit`` overhead (small ``n``) or its many passes over the data (large ``n``)
dominate a sweep of dozens of fits. Each fold is therefore decomposed **once**, and that
decomposition serves every class (one-vs-rest), every grid value and every head:

* **Span basis** (fewer training rows than features, ``n < d``). After the fold's scaler,
  ``X_train = U S V^T`` (thin SVD, rank r <= n - 1). An L2-penalised linear model's weights
  lie in the span of the training rows (representer theorem), so ``w = V b`` and fitting on
  ``Z = X V`` (``r`` columns) is the same problem: same objective values, gradient norms,
  dual problem and test-fold decisions.
* **Feature basis** (``n >= d``). The ``d x d`` Gram matrix ``X^T X`` of the scaled rows and
  its eigen-decomposition ``V diag(s^2) V^T``. Ridge's whole alpha path is closed form in it;
  it is the exact Newton matrix of logistic regression and the L2-SVM at ``w = 0`` (the start
  of every path), and later Newton matrices are formed only when the lagged one stops being
  a good preconditioner (Newton with preconditioned conjugate gradients, in ``d + 1``
  dimensions; ``X`` is never copied).

The basis is chosen from ``n`` and ``d`` (:func:`prepare_fold`). In it:

* **ridge**: ``RidgeClassifier`` for every alpha from one product ``B = Z^T (Y - mean Y)``,
  with ``Y`` the +-1 label matrix of every class (one-vs-rest, argmax; binary: one column).
* **logistic** (binary; lbfgs's objective: unpenalised intercept) and the **L2-loss linear
  SVM** (liblinear's objective: squared hinge, intercept penalised as a feature of value 1;
  one-vs-rest for multiclass): a damped Newton method, warm-started along the C grid, reaches
  each grid value's optimum in a few steps.

Multiclass logistic regression (multinomial, as scikit-learn's lbfgs fits it), SGD and kNN
run scikit-learn's own estimator over the grid (warm-started along it where the head's spec
says so: only where a warm start reaches the estimator the refit builds, a convex optimum;
SGD with early stopping does not, so its grid values are fitted cold, in the span basis when the head's ``span`` flag allows). tests/test_heads.py checks
the fast paths against scikit-learn fits on the original features, binary and multiclass,
``n < d`` and ``n > d``.
"""
from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import sklearn
from scipy.linalg import cho_factor, cho_solve
from scipy.special import expit
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.parallel import Parallel, delayed

from ..errors import UserError

__all__ = ["TrainData", "Fold", "Fitted", "make_folds", "prepare_fold", "splitter", "n_splits", "fit_ready",
           "cross_validate",
           "refine_values", "ridge_path", "logistic_path", "l2svm_path"]

log = logging.getLogger(__name__)

_NEWTON_MAX_ITER = 100
# Folds up to this many values (n x d) are kept in float64; larger ones stay float32, as
# the cache stores them: half the memory and memory traffic of the products with X.
_FLOAT64_MAX_VALUES = 1 << 20
# A Newton matrix costs about as much as 45 products with X (n d^2 flops at BLAS-3 speed vs
# 2 n d at memory speed): form a fresh one only when CG needed more steps than that saves.
_REFRESH_AFTER_CG = 12


@dataclass
class TrainData:
    """Train rows (plain features, then the views when used) and the image index of each."""

    X: np.ndarray
    y: np.ndarray
    groups: np.ndarray
    n_images: int
    views: int


@dataclass
class Fitted:
    """A head after CV and refit: the fitted ``Pipeline``, the CV record (see
    :func:`cross_validate`), CV + refit seconds, and the refit's convergence warnings."""

    model: Pipeline
    cv: dict
    seconds: float
    notes: List[str]


@dataclass
class Fold:
    """One CV fold, scaled by a scaler fitted on its own training rows only.

    ``basis`` is ``"span"`` (``n < d``: ``Z_train = U * s`` and ``Z_test = X_test V`` are the
    rows in the span basis, float64) or ``"feature"`` (``n >= d``: ``gram = X_train^T X_train``
    and its eigen-decomposition ``V diag(s2) V^T``, float64); ``None`` for an empty fold.
    """

    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    basis: Optional[str] = None
    U: Optional[np.ndarray] = None
    s: Optional[np.ndarray] = None
    Z_train: Optional[np.ndarray] = None
    Z_test: Optional[np.ndarray] = None
    gram: Optional[np.ndarray] = None
    V: Optional[np.ndarray] = None
    s2: Optional[np.ndarray] = None

    def data(self, span: bool) -> Tuple[np.ndarray, np.ndarray]:
        if span and self.Z_train is not None:
            return self.Z_train, self.Z_test
        return self.X_train, self.X_test


def prepare_fold(X_train: np.ndarray, y_train: np.ndarray, X_test: np.ndarray, y_test: np.ndarray) -> Fold:
    """A :class:`Fold` of already scaled rows, with its basis chosen from ``n`` and ``d``.

    ``X_train : ndarray of shape (n, d)`` (centred, as the fold's scaler leaves it),
    ``X_test : ndarray of shape (m, d)``.
    """
    dtype = np.float64 if X_train.size <= _FLOAT64_MAX_VALUES else np.float32
    fold = Fold(np.ascontiguousarray(X_train, dtype), np.asarray(y_train),
                np.ascontiguousarray(X_test, dtype), np.asarray(y_test))
    n, p = fold.X_train.shape
    if n == 0 or p == 0:
        return fold
    if n < p:
        _span_basis(fold)
    else:
        _feature_basis(fold)
    return fold


def _span_basis(fold: Fold) -> None:
    n, p = fold.X_train.shape
    U, s, Vt = np.linalg.svd(fold.X_train.astype(np.float64), full_matrices=False)
    if not s.size or s[0] <= 0:
        return
    r = int(np.sum(s > s[0] * max(n, p) * np.finfo(np.float32).eps))
    fold.basis, fold.U, fold.s = "span", U[:, :r], s[:r]
    fold.Z_train = fold.U * fold.s
    fold.Z_test = fold.X_test.astype(np.float64) @ Vt[:r].T


def _feature_basis(fold: Fold) -> None:
    X = fold.X_train
    fold.gram = np.asarray(X.T @ X, np.float64)
    s2, fold.V = np.linalg.eigh(fold.gram)
    fold.s2 = np.clip(s2, 0.0, None)
    fold.basis = "feature"


def splitter(n_splits: int, seed: int) -> StratifiedKFold:
    return StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)


def n_splits(labels: np.ndarray, classes: Sequence[str], wanted: int) -> int:
    """``wanted`` folds, or fewer when a class has fewer train images; a class with fewer than
    2 is a user error naming it."""
    counts = np.bincount(labels, minlength=len(classes))
    if counts.min() < 2:
        missing = [classes[i] for i in np.flatnonzero(counts < 2)]
        raise UserError(f"class(es) {missing} have fewer than 2 usable train images in the feature cache; "
                        "cross-validation needs at least 2 per class: add images to those class folders")
    return int(min(wanted, counts.min()))


def make_folds(data: TrainData, n_splits: int, seed: int) -> List[Fold]:
    """Stratified folds over *images*: an image and all its views fall in the same fold, and
    a held-out fold is scored on plain features only, like val."""
    plain_y = data.y[:data.n_images]
    folds = []
    for train_img, test_img in splitter(n_splits, seed).split(np.zeros((data.n_images, 1)), plain_y):
        in_train = np.zeros(data.n_images, bool)
        in_train[train_img] = True
        rows = in_train[data.groups]
        scaler = StandardScaler().fit(data.X[rows])
        folds.append(prepare_fold(scaler.transform(data.X[rows]), data.y[rows], scaler.transform(data.X[test_img]),
                                  plain_y[test_img]))
    return folds


# --------------------------------------------------------------------------- exact path solvers


def _with_bias(Z: np.ndarray) -> np.ndarray:
    return np.hstack([Z, np.ones((Z.shape[0], 1))])


def _labels(fold: Fold) -> Tuple[np.ndarray, np.ndarray]:
    """The classes and the +-1 one-vs-rest label matrix (one column when binary)."""
    classes = np.unique(fold.y_train)
    Y = np.where(fold.y_train[:, None] == classes[None, :], 1.0, -1.0)
    return classes, (Y[:, 1:] if len(classes) == 2 else Y)


def _decide(classes: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """Predicted classes from decisions ``(m, 1)`` (binary) or ``(m, n_classes)``."""
    return classes[(dec[:, 0] > 0).astype(int)] if dec.shape[1] == 1 else classes[dec.argmax(1)]


def ridge_path(fold: Fold, alphas: Sequence[float]) -> Optional[Tuple[List[np.ndarray], int]]:
    """Test-fold predictions of ``RidgeClassifier(alpha)`` for every alpha, closed form.

    With ``Z`` the training rows in the fold's basis (orthogonal columns, squared norms
    ``s2``), ``w = diag(1 / (s2 + alpha)) Z^T (Y - mean(Y))`` and the intercept is ``mean(Y)``
    (training rows are centred by the fold's scaler). ``Y`` holds every class's +-1 column.
    """
    if fold.basis is None:
        return None
    classes, Y = _labels(fold)
    mean = Y.mean(0)
    if fold.basis == "span":
        B, s2, T = fold.Z_train.T @ (Y - mean), fold.s ** 2, fold.Z_test
    else:
        XtY = fold.X_train.T @ (Y - mean).astype(fold.X_train.dtype)
        B, s2, T = fold.V.T @ XtY, fold.s2, fold.X_test @ fold.V.astype(fold.X_test.dtype)
    return [_decide(classes, T @ (B / (s2 + a)[:, None]) + mean) for a in alphas], 0


def _newton(objective: Callable, w: np.ndarray, tol: float) -> Tuple[np.ndarray, bool]:
    """Damped Newton: ``objective(w) -> (f, g, solve)`` with ``solve(v) = H^-1 v``."""
    f, g, solve = objective(w)
    for _ in range(_NEWTON_MAX_ITER):
        d = solve(g)
        decrement = float(g @ d)
        if decrement <= tol * (1.0 + abs(f)):
            return w, True
        t = 1.0
        while True:  # Armijo backtracking; a full step is taken near the optimum
            f_new, g_new, solve_new = objective(w - t * d)
            if f_new <= f - 1e-4 * t * decrement or t < 1e-10:
                break
            t *= 0.5
        w, f, g, solve = w - t * d, f_new, g_new, solve_new
    return w, False


# ----------------------------------------------------------------- feature basis: n >= d


class _Design:
    """Products with ``A = [X, 1]`` (intercept last) without copying ``X`` (float32 or 64)."""

    def __init__(self, X: np.ndarray):
        self.X = X

    def mv(self, v: np.ndarray) -> np.ndarray:
        return np.asarray(self.X @ v[:-1].astype(self.X.dtype), np.float64) + v[-1]

    def rmv(self, r: np.ndarray) -> np.ndarray:
        return np.r_[np.asarray(self.X.T @ r.astype(self.X.dtype), np.float64), r.sum()]

    def curvature(self, h: np.ndarray) -> np.ndarray:
        """``A^T diag(h) A`` over the rows where ``h > 0``."""
        rows = np.flatnonzero(h > 0)
        X = self.X if len(rows) == len(h) else self.X[rows]
        hr = h[rows]
        Xh = X * hr[:, None].astype(X.dtype)
        d = X.shape[1]
        out = np.empty((d + 1, d + 1))
        out[:d, :d] = Xh.T @ X
        out[:d, d] = out[d, :d] = Xh.sum(0)
        out[d, d] = hr.sum()
        return out


def _gram_curvature(fold: Fold) -> np.ndarray:
    """``[X, 1]^T [X, 1]`` from the fold's Gram matrix (the scaled rows are centred)."""
    d = fold.gram.shape[0]
    out = np.zeros((d + 1, d + 1))
    out[:d, :d] = fold.gram
    out[:d, d] = out[d, :d] = fold.X_train.sum(0, dtype=np.float64)
    out[d, d] = len(fold.X_train)
    return out


def _pcg(hvp: Callable, b: np.ndarray, precond: Callable, rtol: float, maxiter: int) -> Tuple[np.ndarray, int]:
    """Preconditioned conjugate gradients for ``H x = b``; returns x and the iterations."""
    x = np.zeros_like(b)
    if not np.any(b):
        return x, 0
    r = b.copy()
    z = precond(r)
    p, rz = z.copy(), float(r @ z)
    target = rtol * float(np.linalg.norm(b))
    for i in range(1, maxiter + 1):
        Hp = hvp(p)
        alpha = rz / float(p @ Hp)
        x += alpha * p
        r -= alpha * Hp
        if np.linalg.norm(r) <= target:
            return x, i
        z = precond(r)
        rz_new = float(r @ z)
        p = z + (rz_new / rz) * p
        rz = rz_new
    return x, maxiter


def _feature_newton_path(fold: Fold, y: np.ndarray, Cs: Sequence[float], loss: str,
                         shared: Optional[dict] = None) -> Tuple[List[np.ndarray], int]:
    """Weights ``[w, b]`` for each C of the binary logistic (``loss="log"``, unpenalised
    intercept) or squared-hinge (``loss="sqhinge"``, penalised intercept) problem on the
    fold's scaled rows, by Newton steps warm-started along ``Cs``.

    Each Newton system ``H d = g`` is solved by conjugate gradients preconditioned with
    ``C L + R``, ``L`` the loss curvature ``A^T diag(h) A / C`` at some earlier iterate:
    exact at ``w = 0`` from the fold's Gram matrix, and formed anew (``n d^2``) only when the
    lagged one needed more than a few CG steps — so far fewer than one per Newton step. The
    Gram-based factors do not depend on the labels: ``shared`` (a dict) keeps them for the
    other one-vs-rest problems of the fold.
    """
    A = _Design(fold.X_train)
    shared = {} if shared is None else shared
    n, d = fold.X_train.shape
    reg = np.r_[np.ones(d), 0.0 if loss == "log" else 1.0]
    state = {"L": _gram_curvature(fold) * (0.25 if loss == "log" else 2.0), "C": None, "chol": None, "g0": None,
             "initial": True}
    tol = 1e-10 if fold.X_train.dtype == np.float64 else 1e-8
    w = np.zeros(d + 1)
    weights, not_converged = [], 0
    for C in Cs:
        def objective(v, C=C):
            z = A.mv(v)
            if loss == "log":
                m = y * z
                q = expit(-m)
                f = C * float(np.logaddexp(0.0, -m).sum())
                dz, h = -C * y * q, C * q * (1.0 - q)
            else:
                xi = 1.0 - y * z
                act = xi > 0
                f = C * float(xi[act] @ xi[act])
                dz, h = np.where(act, -2.0 * C * y * xi, 0.0), 2.0 * C * act
            f += 0.5 * float(reg @ (v * v))
            g = A.rmv(dz) + reg * v

            def solve(rhs):
                if state["L"] is None:
                    state["L"], state["C"], state["initial"] = A.curvature(h / C), None, False
                if state["C"] != C:
                    if state["initial"] and C in shared:
                        state["chol"] = shared[C]
                    else:
                        P = C * state["L"]
                        P[np.diag_indices_from(P)] += reg + 1e-10
                        state["chol"] = cho_factor(P, check_finite=False)
                        if state["initial"]:
                            shared[C] = state["chol"]
                    state["C"] = C
                rows = np.flatnonzero(h)  # the squared hinge: only rows inside the margin count
                Ah, hh = (A, h) if len(rows) > 0.7 * len(h) else (_Design(A.X[rows]), h[rows])
                hvp = lambda u: Ah.rmv(hh * Ah.mv(u)) + reg * u  # noqa: E731
                # Inexact Newton: loose solves far from the optimum, tight ones near it (the
                # forcing term sqrt(|g| / |g at this C's start|), Eisenstat & Walker).
                size = float(np.linalg.norm(rhs))
                state["g0"] = state["g0"] or size
                rtol = min(0.1, max(1e-10, (size / state["g0"]) ** 0.5)) if state["g0"] else 1e-10
                x, its = _pcg(hvp, rhs, lambda r: cho_solve(state["chol"], r, check_finite=False), rtol, 200)
                if its > _REFRESH_AFTER_CG:
                    state["L"] = None  # stale: form it at the next Newton step
                return x
            return f, g, solve

        state["g0"] = None
        w, ok = _newton(objective, w, tol)
        not_converged += not ok
        weights.append(w.copy())
    return weights, not_converged


def _feature_decisions(fold: Fold, weights: List[np.ndarray]) -> np.ndarray:
    """``(m, n_C)`` test-fold decisions of the weights ``[w, b]``."""
    W = np.stack(weights, 1)
    return np.asarray(fold.X_test @ W[:-1].astype(fold.X_test.dtype), np.float64) + W[-1]


# ----------------------------------------------------------------- the paths


def logistic_path(fold: Fold, Cs: Sequence[float]) -> Optional[Tuple[List[np.ndarray], int]]:
    """Test-fold predictions of binary ``LogisticRegression(C)`` (unpenalised intercept),
    warm-started Newton along ``Cs``. Multiclass returns None: scikit-learn's lbfgs fits the
    multinomial model, warm-started along the grid.

    Span basis: in the usual small-sample case the basis has ``r = n - 1`` columns, so
    ``A = [Z, 1]`` is square and invertible (``Z``'s columns are orthogonal to 1 after
    centring) and Newton runs on the training margins ``f = A w``: the penalty becomes
    ``f^T G f / 2`` with ``G = U diag(1/s^2) U^T``, and the Hessian ``C diag(h) + G`` needs
    no matrix product. Feature basis: see :func:`_feature_newton_path`.
    """
    classes = np.unique(fold.y_train)
    if fold.basis is None or len(classes) != 2:
        return None
    y = np.where(fold.y_train == classes[1], 1.0, -1.0)
    if fold.basis == "feature":
        weights, bad = _feature_newton_path(fold, y, Cs, "log")
        dec = _feature_decisions(fold, weights)
        return [classes[(dec[:, i] > 0).astype(int)] for i in range(len(Cs))], bad
    n, r = fold.Z_train.shape
    square = r == n - 1
    if square:
        G = (fold.U / fold.s ** 2) @ fold.U.T
        Ut_test = fold.Z_test / fold.s  # test decisions: Z_test diag(1/s) U^T f + mean(f)
    else:
        A, reg = _with_bias(fold.Z_train), np.r_[np.ones(r), 0.0]
    T = _with_bias(fold.Z_test)
    w = np.zeros(n if square else r + 1)
    out, not_converged = [], 0
    for C in Cs:
        def objective(v, C=C):
            m = y * (v if square else A @ v)
            p = expit(-m)  # sigma(-margin): the loss gradient's weight
            if square:
                Gv = G @ v
                f = C * np.logaddexp(0.0, -m).sum() + 0.5 * float(v @ Gv)
                g = Gv - C * y * p
            else:
                f = C * np.logaddexp(0.0, -m).sum() + 0.5 * float(reg @ (v * v))
                g = reg * v - C * (A.T @ (y * p))

            def solve(rhs):  # the Hessian only for accepted iterates, not line-search trials
                if square:
                    H = G.copy()
                    H[np.diag_indices_from(H)] += C * p * (1.0 - p) + 1e-10
                else:
                    H = (A.T * (C * p * (1.0 - p))) @ A
                    H[np.diag_indices_from(H)] += reg + 1e-10
                return np.linalg.solve(H, rhs)
            return f, g, solve

        w, ok = _newton(objective, w, 1e-10)
        not_converged += not ok
        dec = Ut_test @ (fold.U.T @ w) + w.mean() if square else T @ w
        out.append(classes[(dec > 0).astype(int)])
    return out, not_converged


def _l2svm_solve(A: np.ndarray, y: np.ndarray, Cs: Sequence[float]) -> Tuple[List[np.ndarray], int]:
    """Weights of ``0.5 |w|^2 + C sum max(0, 1 - y a.w)^2`` for each C (finite Newton method,
    Keerthi & DeCoste 2005), warm-started; Woodbury when few rows are inside the margin."""
    w = np.zeros(A.shape[1])
    weights, not_converged = [], 0
    for C in Cs:
        def objective(v, C=C):
            margin = 1.0 - y * (A @ v)
            act = margin > 0
            f = 0.5 * float(v @ v) + C * float(margin[act] @ margin[act])
            B = A[act]
            g = v - 2.0 * C * (B.T @ (y[act] * margin[act]))

            def solve(rhs):
                if B.shape[0] < B.shape[1]:  # (I + 2C B^T B)^-1 = I - B^T (I / 2C + B B^T)^-1 B
                    K = B @ B.T
                    K[np.diag_indices_from(K)] += 1.0 / (2.0 * C)
                    return rhs - B.T @ np.linalg.solve(K, B @ rhs)
                H = 2.0 * C * (B.T @ B)
                H[np.diag_indices_from(H)] += 1.0
                return np.linalg.solve(H, rhs)
            return f, g, solve

        w, ok = _newton(objective, w, 1e-10)
        not_converged += not ok
        weights.append(w.copy())
    return weights, not_converged


def l2svm_path(fold: Fold, Cs: Sequence[float]) -> Optional[Tuple[List[np.ndarray], int]]:
    """Test-fold predictions of ``LinearSVC(C)`` (squared hinge, one-vs-rest, intercept
    penalised as liblinear does with ``intercept_scaling=1``) for every C. Every class's
    problem shares the fold's basis (span) or Gram matrix (feature)."""
    if fold.basis is None:
        return None
    classes, Y = _labels(fold)
    decisions, not_converged = [], 0
    if fold.basis == "span":
        A, T = _with_bias(fold.Z_train), _with_bias(fold.Z_test)
    shared: dict = {}
    for k in range(Y.shape[1]):
        if fold.basis == "span":
            weights, bad = _l2svm_solve(A, Y[:, k], Cs)
            decisions.append(np.stack([T @ w for w in weights], 1))  # (n_test, n_C)
        else:
            weights, bad = _feature_newton_path(fold, Y[:, k], Cs, "sqhinge", shared)
            decisions.append(_feature_decisions(fold, weights))
        not_converged += bad
    dec = np.stack(decisions, 2)  # (n_test, n_C, n_problems)
    return [_decide(classes, dec[:, i]) for i in range(len(Cs))], not_converged


# --------------------------------------------------------------------------- the sweep


def refine_values(grid: Sequence[float], best: float) -> List[float]:
    """Two points half a decade either side of ``best``, inside the grid's range, in grid order."""
    lo, hi = min(grid), max(grid)
    out = [v for v in (float(f"{best * 10 ** -0.5:.4g}"), float(f"{best * 10 ** 0.5:.4g}")) if lo <= v <= hi]
    return sorted(out, reverse=grid[0] > grid[-1])


def fit_ready(estimator, y: np.ndarray):
    """``estimator`` with scikit-learn's ``early_stopping`` turned off when ``y`` is too small
    for its stratified validation split (10% of the rows, at least one of each class on each
    side, two of each class in all), which would otherwise raise; returns the estimator."""
    params = estimator.get_params()
    if params.get("early_stopping"):
        counts = np.unique(y, return_counts=True)[1]
        n_val = int(np.ceil(params["validation_fraction"] * len(y)))
        if counts.min() < 2 or n_val < len(counts) or len(y) - n_val < len(counts):
            estimator.set_params(early_stopping=False)
    return estimator


def _sklearn_path(spec, fold: Fold, values: Sequence[float], seed: int) -> Tuple[List[np.ndarray], int]:
    """The head's own estimator over the grid (warm-started when the spec allows)."""
    est = fit_ready(spec.build(values[0], seed, warm_start=spec.warm_start), fold.y_train)
    X_train, X_test = fold.data(spec.span)
    out = []
    for v in values:  # ConvergenceWarnings are counted by _sweep
        est.set_params(**{spec.param: int(v) if spec.param == "n_neighbors" else v})
        out.append(est.fit(X_train, fold.y_train).predict(X_test))
    return out, 0


def _fold_scores(spec, fold: Fold, values: Sequence[float], seed: int) -> Tuple[List[float], int]:
    result = spec.cv_path(fold, values) if spec.cv_path is not None else None
    if result is None:
        result = _sklearn_path(spec, fold, values, seed)
    predictions, not_converged = result
    return [float(np.mean(p == fold.y_test)) for p in predictions], not_converged


def _sweep(spec, folds: List[Fold], values: Sequence[float], seed: int, jobs: int) -> Tuple[np.ndarray, int]:
    """Scores ``(n_values, n_folds)`` and the number of fits that did not converge.

    Warnings are caught once here, not per fit: ``catch_warnings`` is process-global and
    unsafe in the worker threads of ``jobs > 1``.
    """
    # Inputs are finite float arrays made here: skip scikit-learn's per-fit re-validation
    # (scikit-learn's Parallel carries this configuration into its threads).
    with warnings.catch_warnings(record=True) as caught, \
            sklearn.config_context(assume_finite=True, skip_parameter_validation=True):
        warnings.simplefilter("always", ConvergenceWarning)
        if jobs > 1:
            out = Parallel(n_jobs=jobs, prefer="threads")(
                delayed(_fold_scores)(spec, f, values, seed) for f in folds)
        else:
            out = [_fold_scores(spec, f, values, seed) for f in folds]
    for w in caught:
        if not issubclass(w.category, ConvergenceWarning):
            log.debug("during CV of %s: %s", spec.name, w.message)
    not_converged = sum(n for _, n in out) + sum(issubclass(w.category, ConvergenceWarning) for w in caught)
    return np.array([s for s, _ in out]).T, not_converged


def cross_validate(spec, folds: List[Fold], seed: int, jobs: int, splitter_text: str) -> dict:
    """Choose ``spec.param`` by mean CV accuracy on the train folds (val is never seen).

    The coarse grid is walked from the strongest to the weakest regularisation, then two
    points half a decade either side of the best are added (``spec.refine``). Ties go to the
    stronger regularisation (the first maximum in grid order), as in ``GridSearchCV``.
    """
    start = time.perf_counter()
    cv = {"metric": "accuracy", "splitter": splitter_text, "folds": len(folds), "param": spec.param,
          "val_used": False}
    if spec.param is None:  # nothing to choose; the CV accuracy is still reported
        scores, bad = _fixed_scores(spec, folds, seed)
        cv.update(grid=[], mean=[], std=[], best={}, best_score=float(scores.mean()),
                  best_std=float(scores.std()), refined=False, not_converged=int(bad))
        cv["seconds"] = time.perf_counter() - start
        return cv
    smallest = min(len(f.y_train) for f in folds)
    grid = [v for v in spec.grid if spec.param != "n_neighbors" or v <= smallest]
    table, bad = _sweep(spec, folds, grid, seed, jobs)
    values = list(grid)
    if spec.refine:
        extra = [v for v in refine_values(grid, grid[int(np.argmax(table.mean(1)))]) if v not in values]
        if extra:
            more, bad_more = _sweep(spec, folds, extra, seed, jobs)
            values, table, bad = values + extra, np.vstack([table, more]), bad + bad_more
    order = sorted(range(len(values)), key=lambda i: values[i], reverse=grid[0] > grid[-1])
    values, table = [values[i] for i in order], table[order]
    mean, std = table.mean(1), table.std(1)
    best = int(np.argmax(mean))
    value = int(values[best]) if spec.param == "n_neighbors" else values[best]
    cv.update(grid=values, mean=[float(x) for x in mean], std=[float(x) for x in std], best={spec.param: value},
              best_score=float(mean[best]), best_std=float(std[best]), refined=spec.refine,
              not_converged=int(bad))
    cv["seconds"] = time.perf_counter() - start
    return cv


def _fixed_scores(spec, folds: List[Fold], seed: int) -> Tuple[np.ndarray, int]:
    scores = [float(np.mean(spec.build(None, seed).fit(f.X_train, f.y_train).predict(f.X_test) == f.y_test))
              for f in folds]
    return np.array(scores), 0
