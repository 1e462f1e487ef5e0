"""Classification metrics shared by every stage, so heads, runs and compare agree on them.

``evaluate`` returns a JSON-able dict; its keys are the schema that ``compare`` reads from
head sidecars (``cache/heads/*.json``) and run files (``cache/runs/*/metrics.json``).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import numpy as np
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, precision_recall_fscore_support

__all__ = ["wilson_interval", "evaluate"]

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
