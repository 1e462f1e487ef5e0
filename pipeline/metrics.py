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
- :func:`sign_flip_exact`: the exact paired sign-flip (permutation) test of a mean per-image
  difference; for one seed against one seed it *is* the exact McNemar test, and it takes rows
  of several seeds through their per-image mean correctness (every seed counts).
- :func:`paired_difference_ci`: Newcombe's hybrid score interval for a difference of paired
  proportions ("method 10", Newcombe 1998, Statistics in Medicine 17:873-890).
- :func:`difference`: one row minus another, per image over every seed of each, with that interval.
- :func:`noninferior_sample_size`: the val images a paired non-inferiority margin would need.
- :func:`cheapest`: the member of a set with the least compute time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import List, Optional, Sequence, Tuple

import numpy as np
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, precision_recall_fscore_support

__all__ = ["wilson_interval", "evaluate", "mcnemar_exact", "holm", "PairTest", "Pairwise",
           "pairwise_mcnemar", "pairwise_seeds", "sign_flip_exact", "paired_difference_ci", "Difference",
           "difference", "noninferior_sample_size", "cheapest"]

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
    sign: int = 0  # sign of the summed per-image difference (i minus j)


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
    return _holm_pairwise(names, tests, alpha, lambda t: t.b - t.c)



# --------------------------------------------------------------------------- every seed counts


def sign_flip_exact(d: Sequence[int]) -> float:
    """Exact two-sided paired sign-flip (permutation) test that the per-image differences ``d``
    are symmetric about 0.

    Under the null hypothesis the two methods are exchangeable on every image, so each
    difference is equally likely to carry either sign: ``p = P(|sum_i e_i |d_i|| >= |sum_i d_i|)``
    over the ``2**n`` sign vectors ``e``, enumerated exactly through the distribution of the sum
    (integer differences, so ties are exact). With ``d`` in {-1, 0, 1} (one seed against one
    seed) this is the exact McNemar test, and :func:`mcnemar_exact` computes it.

    Parameters
    ----------
    d : sequence of int of shape (n_images,)
        Per-image differences on an integer scale (e.g. ``S1 * S2`` times the difference of
        the mean correctness over ``S1`` and ``S2`` seeds).
    """
    d = np.asarray(d, dtype=np.int64)
    mags = np.abs(d[d != 0])
    if mags.size == 0:
        return 1.0
    if mags.max() == 1:
        return mcnemar_exact(int(np.sum(d > 0)), int(np.sum(d < 0)))
    total = int(mags.sum())
    # dist[s + total] = P(sum of e_i |d_i| = s), built one image at a time.
    dist = np.zeros(2 * total + 1)
    dist[total] = 1.0
    for m in mags:
        dist = 0.5 * (np.roll(dist, int(m)) + np.roll(dist, -int(m)))  # no wrap: |sum| <= total
    observed = abs(int(d.sum()))
    sums = np.arange(-total, total + 1)
    return float(min(1.0, dist[np.abs(sums) >= observed].sum()))


def _seed_scores(correct: np.ndarray) -> np.ndarray:
    """``(n_seeds, n_images)`` bool (a 1-D array is one seed)."""
    correct = np.asarray(correct, dtype=bool)
    return correct[None] if correct.ndim == 1 else correct


def _integer_difference(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """``S1 * S2 * (mean_s first - mean_t second)`` per image, as integers."""
    a, z = _seed_scores(first), _seed_scores(second)
    return z.shape[0] * a.sum(axis=0).astype(np.int64) - a.shape[0] * z.sum(axis=0).astype(np.int64)


def pairwise_seeds(correct: Sequence[np.ndarray], names: Sequence[str], alpha: float = 0.05) -> Pairwise:
    """:func:`pairwise_mcnemar` for rows of one or several seeds: every seed counts.

    Each row's per-image score is its mean correctness over its seeds; each pair is tested
    with :func:`sign_flip_exact` on the per-image difference of the scores (exact McNemar when
    both rows have one seed), Holm-corrected over the pairs. ``b``/``c`` are the seed-averaged
    discordant counts (images only ``i`` gets right, only ``j``), rounded for display.

    Parameters
    ----------
    correct : sequence of length n_rows of bool arrays, shape (n_seeds, n_images) or (n_images,)
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha {alpha!r} must lie strictly between 0 and 1")
    if len(correct) != len(names):
        raise ValueError(f"{len(correct)} correctness arrays for {len(names)} names")
    scores = [_seed_scores(c) for c in correct]
    n = len(scores)
    tests = []
    for i in range(n):
        for j in range(i + 1, n):
            d = _integer_difference(scores[i], scores[j])
            scale = scores[i].shape[0] * scores[j].shape[0]
            b, c = int(round(d[d > 0].sum() / scale)), int(round(-d[d < 0].sum() / scale))
            tests.append(PairTest(i, j, b, c, sign_flip_exact(d), 1.0, sign=int(np.sign(d.sum()))))
    return _holm_pairwise(names, tests, alpha, lambda t: t.sign)


# --------------------------------------------------------------------------- effect sizes


def paired_difference_ci(a: float, b: float, c: float, d: float, z: float = _Z95) -> Tuple[float, float]:
    """Newcombe's hybrid score interval for ``p1 - p2`` of paired proportions (method 10).

    The 2x2 table of ``n = a + b + c + d`` images: ``a`` both right, ``b`` only the first,
    ``c`` only the second, ``d`` neither; ``p1 = (a + b) / n``, ``p2 = (a + c) / n``,
    ``theta = (b - c) / n``. With ``(l_i, u_i)`` the Wilson intervals of ``p_i``::

        L = theta - sqrt((p1 - l1)**2 - 2 phi (p1 - l1)(u2 - p2) + (u2 - p2)**2)
        U = theta + sqrt((p2 - l2)**2 - 2 phi (p2 - l2)(u1 - p1) + (u1 - p1)**2)

    where ``phi`` is the correlation of the two, ``(ad - bc) / sqrt((a+b)(c+d)(a+c)(b+d))``
    with Newcombe's adjustment (``ad - bc - n/2`` when ``ad - bc > n/2``, 0 when
    ``0 <= ad - bc <= n/2``; 0 when a margin is empty). Newcombe (1998), Statistics in Medicine
    17:873-890; Fagerland, Lydersen & Laake (2017), *Statistical Analysis of Contingency
    Tables*, section 8.5. It stays inside [-1, 1] and holds its level at small counts, where
    the Wald interval does not. The counts may be seed averages (non-integer).
    """
    n = a + b + c + d
    if min(a, b, c, d) < 0 or n <= 0:
        raise ValueError(f"a 2x2 table needs counts >= 0 and n > 0, got {(a, b, c, d)!r}")
    p1, p2 = (a + b) / n, (a + c) / n
    theta = p1 - p2
    l1, u1 = _wilson_real(a + b, n, z)
    l2, u2 = _wilson_real(a + c, n, z)
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    phi = 0.0
    if margins > 0:
        cross = a * d - b * c
        cross = cross - n / 2 if cross > n / 2 else (0.0 if cross >= 0 else cross)
        phi = cross / math.sqrt(margins)
    low = theta - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    high = theta + math.sqrt(max(0.0, (p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2))
    return max(-1.0, low), min(1.0, high)


def _wilson_real(successes: float, n: float, z: float) -> Tuple[float, float]:
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(max(0.0, p * (1 - p) / n + z * z / (4 * n * n))) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class Difference:
    """One row minus another on the same images, every seed of each counted.

    Attributes
    ----------
    diff : float
        Mean accuracy over the first row's seeds minus that of the second's (= the mean over
        images of the per-image difference of mean correctness).
    low, high : float
        Newcombe's hybrid score 95% interval (:func:`paired_difference_ci`) on the
        seed-averaged 2x2 table (each cell: the mean over every pair of seeds).
    table : tuple of float
        That table ``(a, b, c, d)``: both right, only the first, only the second, neither.
    discordance : float
        ``(b + c) / n``: the share of images on which the two disagree.
    p : float
        :func:`sign_flip_exact` on the per-image differences (exact McNemar for one seed each).
    """

    diff: float
    low: float
    high: float
    table: Tuple[float, float, float, float]
    discordance: float
    p: float


def difference(first: np.ndarray, second: np.ndarray) -> Difference:
    """``first`` minus ``second``: bool arrays ``(n_seeds, n_images)`` (or ``(n_images,)``)."""
    x, y = _seed_scores(first).astype(float), _seed_scores(second).astype(float)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"the two rows cover {x.shape[1]} and {y.shape[1]} images; pair them on the same images")
    mx, my = x.mean(axis=0), y.mean(axis=0)  # per image, mean over seeds
    # E over independent seed pairs of the 2x2 cells, per image, then summed.
    a, b = float(np.sum(mx * my)), float(np.sum(mx * (1 - my)))
    c, d = float(np.sum((1 - mx) * my)), float(np.sum((1 - mx) * (1 - my)))
    low, high = paired_difference_ci(a, b, c, d)
    n = x.shape[1]
    return Difference(float(mx.mean() - my.mean()), low, high, (a, b, c, d), (b + c) / n,
                      sign_flip_exact(_integer_difference(first, second)))


def noninferior_sample_size(discordance: float, margin: float, gap: float = 0.0, alpha: float = 0.025,
                            power: float = 0.8) -> Optional[int]:
    """Images a paired non-inferiority comparison needs (normal approximation).

    ``n = (z_{1-alpha} + z_{power})**2 * (psi - gap**2) / (gap + margin)**2`` with ``psi`` the
    discordance (the share of images the two methods disagree on) and ``gap`` the true
    accuracy difference (candidate minus reference): the variance of a per-image difference in
    {-1, 0, 1} is ``psi - gap**2`` (Connor 1987, Biometrics 43:207-211; the Wald form of Nam
    1997, Biometrics 53:1422-1430). ``alpha`` is one-sided (0.025: the lower end of a two-sided
    95% interval). Returns None when ``gap <= -margin`` (no size certifies it).
    """
    if not 0 < margin < 1:
        raise ValueError(f"margin {margin!r} must lie strictly between 0 and 1")
    if gap + margin <= 0:
        return None
    from scipy.stats import norm

    z = norm.ppf(1 - alpha) + norm.ppf(power)
    variance = max(discordance - gap * gap, 1e-12)
    return int(math.ceil(z * z * variance / (gap + margin) ** 2))


def cheapest(members: Sequence[int], costs: Sequence[float], names: Sequence[str] = ()) -> Optional[int]:
    """The member with the least cost (ties: the first by name, then by index); None if empty."""
    if not members:
        return None
    return min(members, key=lambda m: (costs[m], names[m] if names else "", m))


def _holm_pairwise(names: Sequence[str], tests: list, alpha: float, favours) -> "Pairwise":
    """Holm over every pair's p-value; where significant, the pair's winner is the side ``favours(t)``
    points to (> 0: ``i``, < 0: ``j``). The top group: every method no other beats."""
    n = len(names)
    for t, adj in zip(tests, holm([t.p for t in tests])):
        t.p_adjusted = adj
        if adj <= alpha and favours(t) != 0:
            t.winner = t.i if favours(t) > 0 else t.j
    beaten_by: List[List[int]] = [[] for _ in range(n)]
    for t in tests:
        if t.winner is not None:
            beaten_by[t.j if t.winner == t.i else t.i].append(t.winner)
    top = [m for m in range(n) if not beaten_by[m]]
    return Pairwise(list(names), alpha, tests, top, [sorted(b) for b in beaten_by])
