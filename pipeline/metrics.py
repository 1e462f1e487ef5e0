"""Classification metrics and the statistics of "which wins", shared by every stage.

``evaluate`` returns a JSON-able dict; its keys are the schema that ``compare`` reads from
head sidecars (``cache/heads/*.json``) and run files (``cache/runs/*/metrics.json``).

Statistics (all on the same val images, paired by image):

- :func:`wilson_interval`: the 95% interval of one method's accuracy.
- :func:`mcnemar_exact`: exact two-sided McNemar test of two methods.
- :func:`holm`: Holm–Bonferroni adjustment over a family of p-values.
- :func:`pairwise_mcnemar`: every pair of methods, Holm-adjusted, with the winner of each
  significant pair and the *top group*: every method that no other method beats
  significantly. Nothing here picks a "best" first and then tests it (that test is biased
  toward the method picked); every pair is tested, and the family is corrected.
- :func:`cheapest`: the recommendation, the top-group member with the least compute time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import List, Optional, Sequence, Tuple

import numpy as np
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, precision_recall_fscore_support

__all__ = ["wilson_interval", "evaluate", "mcnemar_exact", "holm", "PairTest", "Pairwise",
           "pairwise_mcnemar", "cheapest"]

# Two-sided 95% normal quantile.
_Z95 = 1.959963984540054


def wilson_interval(successes: int, n: int, z: float = _Z95) -> Tuple[float, float]:
    """Wilson score interval for a binomial proportion (better than the normal one near 0 or 1).

    Returns ``(low, high)``; ``(0.0, 1.0)`` when ``n == 0``.
    """
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def evaluate(y_true: Sequence[int], y_pred: Sequence[int], classes: List[str],
             paths: Optional[Sequence[str]] = None, proba: Optional[np.ndarray] = None) -> dict:
    """Accuracy with a 95% Wilson interval, balanced accuracy, per-class precision/recall,
    confusion matrix and per-image predictions (for paired tests such as McNemar).

    Parameters
    ----------
    y_true, y_pred : array-like of shape (n_samples,)
        Class indices into ``classes``.
    classes : list of str
    paths : sequence of str, optional
        Image path of each sample (relative to the data root), stored with the predictions.
    proba : ndarray of shape (n_samples, n_classes), optional
        Predicted probabilities; the probability of the predicted class is stored.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    labels = list(range(len(classes)))
    correct = int((y_true == y_pred).sum())
    n = int(y_true.size)
    low, high = wilson_interval(correct, n)
    precision, recall, _, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0)
    predictions = {"y_true": y_true.tolist(), "y_pred": y_pred.tolist()}
    if paths is not None:
        predictions["paths"] = list(paths)
    if proba is not None:
        predictions["confidence"] = np.round(np.asarray(proba)[np.arange(n), y_pred], 6).tolist()
    return {
        "n": n,
        "correct": correct,
        "accuracy": correct / n if n else 0.0,
        "accuracy_ci95": [low, high],
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)) if n else 0.0,
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "support": int(support[i])}
            for i, name in enumerate(classes)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "predictions": predictions,
    }


# --------------------------------------------------------------------------- which wins


def mcnemar_exact(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value from the discordant-pair counts.

    Under the null hypothesis each of the ``n = b + c`` discordant images is equally likely
    to favour either method, so ``b ~ Binomial(n, 1/2)`` and
    ``p = min(1, 2 * sum_{k <= min(b, c)} C(n, k) / 2**n)`` (computed exactly).

    Parameters
    ----------
    b : int
        Images the first method gets right and the second gets wrong.
    c : int
        Images the first method gets wrong and the second gets right.
    """
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b!r}, c={c!r}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
    return float(min(Fraction(1), Fraction(2 * tail, 2 ** n)))


def holm(pvalues: Sequence[float]) -> List[float]:
    """Holm–Bonferroni adjusted p-values, in the input order.

    With the ``m`` p-values sorted ascending, ``p_adj(i) = max_{j <= i} min(1, (m - j + 1) p(j))``
    (1-based ranks). A hypothesis is rejected at level ``alpha`` when ``p_adj <= alpha``; this
    controls the family-wise error rate at ``alpha`` under any dependence between the tests.
    """
    p = np.asarray(pvalues, dtype=float)
    m = p.size
    if m == 0:
        return []
    if np.any(~np.isfinite(p)) or np.any((p < 0) | (p > 1)):
        raise ValueError(f"p-values must lie in [0, 1], got {p.tolist()!r}")
    order = np.argsort(p, kind="stable")
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adjusted
    return out.tolist()


@dataclass
class PairTest:
    """One pair of methods ``(i, j)``, ``i < j``, tested on the same images.

    ``b``: images only ``i`` gets right; ``c``: images only ``j`` gets right. ``winner`` is
    the index of the method that is significantly better after the Holm adjustment, or
    ``None`` when the data cannot tell them apart.
    """

    i: int
    j: int
    b: int
    c: int
    p: float
    p_adjusted: float
    winner: Optional[int] = None


@dataclass
class Pairwise:
    """All-pairs exact McNemar tests with the Holm correction over the pairs.

    Attributes
    ----------
    names : list of str
        The methods, in the order of the rows of the correctness matrix.
    alpha : float
        Family-wise significance level.
    tests : list of PairTest
        Every pair ``i < j``, in row-major order.
    top_group : list of int
        Every method that no other method beats significantly, in input order.
    beaten_by : list of list of int
        For each method, the methods that beat it significantly.
    """

    names: List[str]
    alpha: float
    tests: List[PairTest] = field(default_factory=list)
    top_group: List[int] = field(default_factory=list)
    beaten_by: List[List[int]] = field(default_factory=list)

    def test(self, i: int, j: int) -> PairTest:
        """The test of methods ``i`` and ``j`` (either order; b and c as stored, for ``min(i, j)``)."""
        a, z = min(i, j), max(i, j)
        return next(t for t in self.tests if t.i == a and t.j == z)

    def adjusted_matrix(self) -> np.ndarray:
        """``(n, n)`` Holm-adjusted p-values; the diagonal is NaN."""
        n = len(self.names)
        out = np.full((n, n), np.nan)
        for t in self.tests:
            out[t.i, t.j] = out[t.j, t.i] = t.p_adjusted
        return out

    def advantage_matrix(self) -> np.ndarray:
        """``(n, n)`` signed discordance: ``[i, j]`` = images only ``i`` gets right minus images
        only ``j`` gets right (positive: row ``i`` is ahead); the diagonal is 0."""
        n = len(self.names)
        out = np.zeros((n, n), dtype=int)
        for t in self.tests:
            out[t.i, t.j], out[t.j, t.i] = t.b - t.c, t.c - t.b
        return out


def pairwise_mcnemar(correct: np.ndarray, names: Sequence[str], alpha: float = 0.05) -> Pairwise:
    """Test every pair of methods on the same images and find the top group.

    Parameters
    ----------
    correct : array-like of bool, shape (n_methods, n_images)
        ``correct[m, k]``: method ``m`` classifies image ``k`` correctly. The images are the
        same, in the same order, for every method.
    names : sequence of str of length n_methods
    alpha : float
        Family-wise level of the Holm–Bonferroni procedure over the ``n (n - 1) / 2`` pairs.

    Returns
    -------
    Pairwise
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha {alpha!r} must lie strictly between 0 and 1")
    correct = np.asarray(correct, dtype=bool)
    if correct.ndim != 2 or correct.shape[0] != len(names):
        raise ValueError(f"correct has shape {correct.shape}; expected ({len(names)}, n_images)")
    n = correct.shape[0]
    tests = []
    for i in range(n):
        for j in range(i + 1, n):
            b = int(np.sum(correct[i] & ~correct[j]))
            c = int(np.sum(~correct[i] & correct[j]))
            tests.append(PairTest(i, j, b, c, mcnemar_exact(b, c), 1.0))
    for t, adj in zip(tests, holm([t.p for t in tests])):
        t.p_adjusted = adj
        if adj <= alpha and t.b != t.c:
            t.winner = t.i if t.b > t.c else t.j
    beaten_by: List[List[int]] = [[] for _ in range(n)]
    for t in tests:
        if t.winner is not None:
            beaten_by[t.j if t.winner == t.i else t.i].append(t.winner)
    top = [m for m in range(n) if not beaten_by[m]]
    return Pairwise(list(names), alpha, tests, top, [sorted(b) for b in beaten_by])


def cheapest(members: Sequence[int], costs: Sequence[float], names: Sequence[str] = ()) -> Optional[int]:
    """The member with the least cost (ties: the first by name, then by index); None if empty."""
    if not members:
        return None
    return min(members, key=lambda m: (costs[m], names[m] if names else "", m))
