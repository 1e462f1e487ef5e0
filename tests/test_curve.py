"""The data-size curve: stratified, seeded, reproducible subsets of train; val only scores."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.compare import curve
from pipeline.data import splits

HEADS = ("logistic", "ridge", "linear_svm", "knn")  # the SGD heads fit the same way, slower


def _data(n_per_class=10, n_val=15, dim=32, seed=0):
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 0.6, (2, dim))
    y_tr, y_va = np.repeat([0, 1], n_per_class), np.repeat([0, 1], n_val)
    X_tr = means[y_tr] + rng.normal(0, 1, (len(y_tr), dim))
    X_va = means[y_va] + rng.normal(0, 1, (len(y_va), dim))
    return X_tr.astype(np.float32), y_tr, X_va.astype(np.float32), y_va


def test_subsets_are_stratified_seeded_nested_and_reproducible():
    labels = np.array([0] * 7 + [1] * 12 + [2] * 5)
    for k in (1, 2, 4):
        idx = splits.per_class_subset(labels, k, (0, 3))
        assert np.bincount(labels[idx]).tolist() == [k, k, k]  # stratified: k of every class
        assert idx.tolist() == splits.per_class_subset(labels, k, (0, 3)).tolist()  # reproducible
    assert set(splits.per_class_subset(labels, 2, (0, 3))) <= set(splits.per_class_subset(labels, 4, (0, 3)))
    draws = {tuple(splits.per_class_subset(labels, 2, (0, s))) for s in range(5)}
    assert len(draws) == 5  # other seeds, other subsets
    assert np.bincount(labels[splits.per_class_subset(labels, 6, 1)]).tolist() == [6, 6, 5]  # small class: all


def test_sizes_double_up_to_the_smallest_class():
    assert curve.sizes(np.array([0] * 121 + [1] * 124)) == [1, 2, 4, 8, 16, 32, 64, 121]
    assert curve.sizes(np.array([0] * 4 + [1] * 9)) == [1, 2, 4]


def test_curve_never_reads_val_before_scoring():
    """Permuting the val labels, or replacing the val features, changes the scores only:
    every subset and every chosen hyper-parameter stays the same."""
    X_tr, y_tr, X_va, y_va = _data()
    base = curve.heads_curve(X_tr, y_tr, X_va, y_va, HEADS, n_subsets=5, seed=3)
    rng = np.random.default_rng(1)
    other = curve.heads_curve(X_tr, y_tr, rng.normal(size=X_va.shape).astype(np.float32), rng.permutation(y_va),
                              HEADS, n_subsets=5, seed=3)
    assert base.chosen == other.chosen
    assert not np.array_equal(base.accuracy, other.accuracy, equal_nan=True)
    assert base.ks == [1, 2, 4, 8, 10]
    assert base.rule[0] == curve.FALLBACK and base.rule[1].startswith("cv: StratifiedKFold(n_splits=2)")
    # Shape: 5 subsets per k below "every image", a single one at k = all.
    n = np.sum(~np.isnan(base.accuracy), axis=2)
    assert (n[:, :-1] == 5).all() and (n[:, -1] == 1).all()
    mean, std = base.mean_std()
    i = HEADS.index("logistic")
    assert mean[i, 2] == pytest.approx(np.mean(base.accuracy[i, 2])) and std[i, -1] == 0.0
    assert std[i, 2] == pytest.approx(np.std(base.accuracy[i, 2], ddof=1))
    # The paired per-image record is subset 0's.
    assert base.correct[i, 3, 0].mean() == pytest.approx(base.accuracy[i, 3, 0])
    # The k=1 fallback is each estimator's default, not a CV (or val) choice.
    assert {c for c in base.chosen[i][0]} == {1.0}
    assert {c for c in base.chosen[HEADS.index("knn")][0]} == {1}


def test_curve_is_reproducible_and_seed_dependent():
    X_tr, y_tr, X_va, y_va = _data(n_per_class=8, n_val=6)
    a = curve.heads_curve(X_tr, y_tr, X_va, y_va, ("ridge",), n_subsets=5, seed=0)
    b = curve.heads_curve(X_tr, y_tr, X_va, y_va, ("ridge",), n_subsets=5, seed=0)
    c = curve.heads_curve(X_tr, y_tr, X_va, y_va, ("ridge",), n_subsets=5, seed=1)
    assert np.array_equal(a.accuracy, b.accuracy, equal_nan=True) and a.chosen == b.chosen
    assert not np.array_equal(a.accuracy[:, :-1], c.accuracy[:, :-1])
    doc = curve.to_json(a)
    assert doc["ks"] == [1, 2, 4, 8] and doc["heads"]["ridge"][0]["n_subsets"] == 5
    assert doc["tests_use_subsets"] == "every subset"


def test_sgd_heads_fit_the_smallest_subsets():
    """Early stopping needs 10 images per class in a fit; below that the SGD heads run without it."""
    X_tr, y_tr, X_va, y_va = _data(n_per_class=4, n_val=5)
    res = curve.heads_curve(X_tr, y_tr, X_va, y_va, ("sgd_log", "sgd_hinge"), n_subsets=5, seed=0)
    assert res.ks == [1, 2, 4] and not np.isnan(res.accuracy[:, :2]).any()


@pytest.mark.parametrize("seed", [0, 3])
def test_subsets_keyed_by_path_do_not_depend_on_the_order_of_the_images(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, 60)
    keys = [f"train/c{y}/img_{i:03d}.jpg" for i, y in enumerate(labels)]
    order = rng.permutation(60)
    first = {keys[i] for i in splits.train_subset(labels, 4, seed, keys=keys)}
    shuffled = {keys[order[i]] for i in splits.train_subset(labels[order], 4, seed, keys=[keys[i] for i in order])}
    assert first == shuffled
    assert splits.train_subset(labels, 4, seed, keys=keys).tolist() == splits.per_class_subset(
        labels, 4, (splits.CURVE_SEED, seed), keys=keys).tolist()


def test_a_holdout_that_would_leave_a_class_out_raises():
    labels = np.array([0] * 2 + [1] * 6 + [2] * 2)  # 3 held out, stratified rounding drops class 2
    with pytest.raises(ValueError, match=r"leaves class\(es\) \[2\] out of the holdout part"):
        splits.holdout_split(labels, 0.3, 0)
    fit, hold = splits.holdout_split(labels, 0.5, 0)
    assert set(labels[hold]) == set(labels[fit]) == {0, 1, 2}
