"""Seeded, stratified subsets of the train split (never of val).

Two users: end-to-end runs (``finetune --train-per-class K`` and ``--select holdout:F``) and
the data-size curve (``pipeline.compare.curve``). Both take class labels only, so nothing here can
look at val, and the same (labels, k or fraction, seed) always gives the same indices.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import numpy as np
from sklearn.model_selection import train_test_split

__all__ = ["CURVE_SEED", "per_class_subset", "train_subset", "holdout_split"]

#: The seed of the data-size curve's subsets: draw ``s`` is ``per_class_subset(labels, k, (CURVE_SEED, s))``.
CURVE_SEED = 0


def per_class_subset(labels: Sequence[int], k: int, seed: Union[int, Sequence[int]],
                     keys: Optional[Sequence[str]] = None) -> np.ndarray:
    """Sorted indices of ``k`` images drawn at random (without replacement) from each class.

    A class with fewer than ``k`` images contributes all of them. The draw for class ``c``
    depends only on ``(seed, c)`` and that class's positions, so subsets of one seed are
    nested as ``k`` grows (k=2 contains k=1), which keeps a curve's points comparable.
    ``seed`` is an int or a tuple of ints (e.g. ``(run seed, subset number)``). With ``keys``
    (e.g. the images' relative paths) a class's positions are those of its sorted keys, so the
    same images are drawn whatever order the caller lists them in (a feature cache and an
    image folder agree).
    """
    key = [int(s) for s in (seed if isinstance(seed, (tuple, list)) else (seed,))]
    labels = np.asarray(labels)
    if k < 1:
        raise ValueError(f"k {k!r} must be >= 1 images per class")
    if keys is not None and len(keys) != len(labels):
        raise ValueError(f"{len(keys)} keys for {len(labels)} labels")
    chosen = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if keys is not None:
            members = members[np.argsort([keys[i] for i in members], kind="stable")]
        order = np.random.default_rng([*key, int(c)]).permutation(len(members))
        chosen.append(members[order[:k]])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def train_subset(labels: Sequence[int], k: int, draw: int, keys: Optional[Sequence[str]] = None) -> np.ndarray:
    """Draw ``draw`` of the data-size curve's ``k``-per-class subsets of train.

    The one function both users share: the curve's heads are fitted on draws 0, 1, ...,
    ``n_subsets - 1``, and an end-to-end run ``finetune --train-per-class K --seed S`` trains on
    draw ``S``, so at each ``k`` a run and the heads' subset of the same number see exactly the same
    images (pass the images' relative paths as ``keys``).
    """
    return per_class_subset(labels, k, (CURVE_SEED, int(draw)), keys=keys)


def holdout_split(labels: Sequence[int], fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """``(fit, holdout)`` sorted indices: a stratified, seeded ``fraction`` of the images held out.

    Raises
    ------
    ValueError
        When some class could not be represented on both sides (too few images).
    """
    labels = np.asarray(labels)
    if not 0 < fraction < 1:
        raise ValueError(f"holdout fraction {fraction!r} must lie strictly between 0 and 1")
    counts = np.bincount(labels) if labels.size else np.zeros(0, int)
    n_classes = int(np.count_nonzero(counts))
    smallest = int(counts[counts > 0].min()) if n_classes else 0
    n_hold = int(np.ceil(fraction * labels.size))
    if smallest < 2 or n_hold < n_classes or labels.size - n_hold < n_classes:
        raise ValueError(f"holdout fraction {fraction:g} of {labels.size} train images cannot keep every one "
                         f"of {n_classes} classes on both sides (smallest class: {smallest} images)")
    fit, hold = train_test_split(np.arange(labels.size), test_size=n_hold, stratify=labels, random_state=seed)
    present = np.flatnonzero(counts)
    for side, idx in (("holdout", hold), ("fit", fit)):
        missing = np.setdiff1d(present, labels[idx])
        if missing.size:  # stratified rounding can still leave a class out of one side
            raise ValueError(f"holdout fraction {fraction:g} of {labels.size} train images leaves class(es) "
                             f"{missing.tolist()} out of the {side} part")
    return np.sort(fit), np.sort(hold)
