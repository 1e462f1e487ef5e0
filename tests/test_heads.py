"""Heads stage: accuracy, honest selection, exact CV paths, persistence, load_head, out-of-core."""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from sklearn.exceptions import InconsistentVersionWarning
from sklearn.linear_model import LogisticRegression, RidgeClassifier
from sklearn.svm import LinearSVC

from pipeline import cli
from pipeline.heads import stage as heads, cv, stream
from pipeline.features import store
from pipeline.config import HeadsConfig
from pipeline.errors import UserError
from pipeline.records import WeightsRef

ROOT = Path(__file__).resolve().parents[1]
SIDE_KEYS = {"kind", "name", "method", "metrics", "fit_seconds", "predict_us_per_image", "cv", "hyperparameters",
             "trainable_parameters", "features", "classes", "data_root", "model_file", "format", "sha256",
             "size_bytes", "versions", "created", "used_views", "schema", "schema_version"}
FEATURE_KEYS = {"path", "content_key", "settings_key", "weights_id", "weights_sha256", "pretrained", "backbone",
                "precision", "extract_seconds", "extract_device", "n_images", "weights"}


def write_feature_cache(path, *, n_train=30, n_val=20, n_classes=2, dim=512, sep=1.0, noise=1.0, seed=0, views=0,
                        classes=None, weights_sha256="0" * 64, poison_val=False) -> str:
    """A synthetic feature cache in the store's layout: Gaussian classes, rows sorted by class
    (like ImageFolder). ``n_train``/``n_val`` are per class. ``poison_val`` flips the val labels
    and changes nothing else."""
    rng = np.random.default_rng(seed)
    classes = list(classes or [f"class{i}" for i in range(n_classes)])
    means = rng.normal(0.0, sep, (n_classes, dim))
    splits = {}
    for split, n in (("train", n_train), ("val", n_val)):
        labels = np.repeat(np.arange(n_classes), n)
        feats = (means[labels] + rng.normal(0.0, noise, (len(labels), dim))).astype(np.float32)
        view_arr = (feats[:, None, :] + rng.normal(0.0, noise, (len(labels), views, dim)).astype(np.float32)
                    if split == "train" and views else None)
        rows = [store.Row(f"{split}/{classes[y]}/img_{i:05d}.jpg", f"{split}-{i:036d}", 100 + i, 1, feats[i],
                          None if view_arr is None else view_arr[i]) for i, y in enumerate(labels)]
        if split == "val" and poison_val:
            labels = (labels + 1) % n_classes
        splits[split] = store.SplitRows(rows, labels.tolist())
    meta = {"backbone": "resnet18", "weights_id": "random-seed0", "weights_sha256": weights_sha256,
            "pretrained": False, "weights": WeightsRef("random", weights_sha256, seed=0).to_json(), "precision": "fp32", "extract_seconds": 2.5, "extract_device": "cpu",
            "data_root": "/data/synthetic", "transform": {"eval": "synthetic", "draft_jpeg_min_side": 256}}
    # store.library_versions imports torch (seconds); synthetic caches do not need it.
    with mock.patch.object(store, "library_versions", lambda *names: {"numpy": np.__version__}):
        store.write_cache(str(path), {"synthetic": seed, "views": views}, meta, classes, splits)
    return str(path)


def fit(tmp_path, features, name="cache", **kw) -> heads.HeadsResult:
    return heads.run(HeadsConfig(cache=str(tmp_path / name), features=str(features), **kw))


@pytest.fixture
def separable(tmp_path) -> str:
    return write_feature_cache(tmp_path / "sep.h5")


# ----------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("n_classes", [2, 3])
def test_every_head_reaches_095_on_separable_features(tmp_path, n_classes):
    path = write_feature_cache(tmp_path / "f.h5", n_classes=n_classes, n_train=25, n_val=20, seed=n_classes)
    result = fit(tmp_path, path, heads=("all",))
    assert [r.name for r in result.rows] == list(heads.REGISTRY)
    for row in result.rows:
        m = row.doc["metrics"]
        assert m["accuracy"] >= 0.95, (row.name, m["accuracy"])
        assert m["n"] == 20 * n_classes
        low, high = m["accuracy_ci95"]
        assert 0.0 <= low <= m["accuracy"] <= high + 1e-9 and high <= 1.0
    assert "not pretrained" in result.summary()


def test_sgd_heads_stop_early_unless_too_few_rows_to_split(tmp_path):
    """scikit-learn's early_stopping needs a validation split with every class on each side:
    on 8 train images (CV folds of 6) the SGD heads fit without it instead of failing."""
    tiny = fit(tmp_path, write_feature_cache(tmp_path / "tiny.h5", n_train=4, n_val=5), "tiny",
               heads=("sgd_log", "sgd_hinge"))
    assert [r.doc["hyperparameters"]["early_stopping"] for r in tiny.rows] == [False, False]
    row = fit(tmp_path, write_feature_cache(tmp_path / "more.h5", n_train=20, n_val=5), "more",
              heads=("sgd_log",)).rows[0]
    assert row.doc["hyperparameters"]["early_stopping"] is True
    assert row.doc["metrics"]["accuracy"] >= 0.9


def test_registry_names_and_parse():
    assert heads.parse_head_names(["logistic,ridge", "knn", "ridge"]) == ("logistic", "ridge", "knn")
    assert heads.parse_head_names(["all"]) == tuple(heads.REGISTRY)
    with pytest.raises(UserError, match=r"'bogus' is not a known head\. Only logistic, .* are supported"):
        heads.parse_head_names(["logistic,bogus"])


# ----------------------------------------------------------------------------- honest selection


def test_poisoned_val_labels_change_no_choice(tmp_path):
    """Selection never looks at val: flipping every val label changes the val metrics only."""
    kw = dict(n_train=30, n_val=20, sep=0.12, seed=7)  # hard enough that the grids matter
    clean = fit(tmp_path, write_feature_cache(tmp_path / "clean.h5", **kw), "a", heads=("all",))
    poisoned = fit(tmp_path, write_feature_cache(tmp_path / "poisoned.h5", poison_val=True, **kw), "b", heads=("all",))
    for a, b in zip(clean.rows, poisoned.rows):
        ca, cb = dict(a.doc["cv"]), dict(b.doc["cv"])
        ca.pop("seconds"), cb.pop("seconds")
        assert ca == cb, a.name
        assert a.doc["hyperparameters"] == b.doc["hyperparameters"], a.name
        assert a.doc["metrics"]["predictions"]["y_pred"] == b.doc["metrics"]["predictions"]["y_pred"]
        assert a.doc["metrics"]["accuracy"] + b.doc["metrics"]["accuracy"] == pytest.approx(1.0)
    assert any(len(set(r.doc["cv"]["mean"])) > 1 for r in clean.rows)  # the sweep did discriminate


def test_grid_spans_published_range_and_refines(tmp_path, separable):
    cv = fit(tmp_path, separable, heads=("logistic",)).rows[0].doc["cv"]
    assert min(cv["grid"]) == pytest.approx(1e-6) and max(cv["grid"]) == pytest.approx(1e5)
    assert len(cv["grid"]) > 12 and cv["refined"] and cv["val_used"] is False
    assert cv["grid"] == sorted(cv["grid"]) and len(cv["mean"]) == len(cv["grid"])
    assert cv["best_score"] == max(cv["mean"])
    assert cv["best"]["C"] == cv["grid"][cv["mean"].index(max(cv["mean"]))]  # ties: strongest regularisation


def test_views_stay_in_their_images_fold():
    n, k = 20, 3
    y = np.repeat([0, 1], n // 2)
    data = cv.TrainData(np.random.default_rng(0).normal(size=(n * (k + 1), 8)).astype(np.float32),
                              np.concatenate([y, np.repeat(y, k)]),
                              np.concatenate([np.arange(n), np.repeat(np.arange(n), k)]), n, k)
    seen_test = []
    for train_img, test_img in cv.splitter(4, 0).split(np.zeros((n, 1)), y):
        rows = np.isin(data.groups, train_img)
        assert not set(data.groups[rows]) & set(test_img)  # no view of a held-out image in training
        assert rows.sum() == len(train_img) * (k + 1)
        seen_test.extend(test_img)
    folds = cv.make_folds(data, 4, 0)
    assert sorted(seen_test) == list(range(n))
    assert [len(f.y_test) for f in folds] == [5, 5, 5, 5] and all(len(f.y_train) == 60 for f in folds)


def test_use_views_trains_on_views(tmp_path):
    path = write_feature_cache(tmp_path / "v.h5", views=2)
    row = fit(tmp_path, path, heads=("ridge",), use_views=True).rows[0]
    assert row.name == "ridge-views" and row.doc["used_views"] is True
    assert "grouped" in row.doc["cv"]["splitter"] and row.model_path.endswith("ridge-views.joblib")
    with pytest.raises(UserError, match="no augmented views"):
        fit(tmp_path, write_feature_cache(tmp_path / "plain.h5"), heads=("ridge",), use_views=True)


# ----------------------------------------------------------------------------- exact CV paths


def _fold(n_classes, seed=0, n=40, dim=60, m=30, duplicates=0, sep=0.4):
    rng = np.random.default_rng(seed)
    means = rng.normal(0, sep, (n_classes, dim))
    y = np.arange(n) % n_classes
    yt = np.arange(m) % n_classes
    X = means[y] + rng.normal(size=(n, dim))
    X[n - duplicates:] = X[:duplicates]  # the same image twice: a rank-deficient fold
    y[n - duplicates:] = y[:duplicates]
    Xt = means[yt] + rng.normal(size=(m, dim))
    mu, sd = X.mean(0), X.std(0)
    fold = cv.prepare_fold(((X - mu) / sd).astype(np.float32), y, ((Xt - mu) / sd).astype(np.float32), yt)
    if n < dim:
        assert fold.basis == "span" and fold.Z_train.shape == (n, n - 1 - duplicates)
    else:
        assert fold.basis == "feature" and fold.gram.shape == (dim, dim)
    return fold


_VALUES = {"ridge": [1e4, 1e3, 10.0, 0.1, 1e-3], "logistic": [1e-4, 1e-3, 1e-1, 10.0, 1e3],
           "linear_svm": [1e-5, 1e-4, 1e-2, 1.0, 100.0]}
_REFERENCE = {  # scikit-learn at tight tolerances: the exact optimum the fast paths must reach
    "ridge": lambda v: RidgeClassifier(alpha=v),
    "logistic": lambda v: LogisticRegression(C=v, tol=1e-10, max_iter=10000),
    "linear_svm": lambda v: LinearSVC(C=v, tol=1e-10, max_iter=500000),
}


@pytest.mark.parametrize("n_classes, shape", [(2, (40, 60)), (3, (40, 60)), (2, (120, 512)), (10, (120, 512)),
                                              (2, (300, 20)), (10, (300, 20))])
@pytest.mark.parametrize("head", ["ridge", "logistic", "linear_svm"])
def test_fast_paths_match_sklearn_on_original_features(head, n_classes, shape):
    """The exact paths (span basis when n < d, feature basis when n >= d; one-vs-rest for
    multiclass) predict what scikit-learn fitted on all the features predicts."""
    n, dim = shape
    fold = _fold(n_classes, seed=n_classes, n=n, dim=dim, m=60, sep=0.4 if n < dim else 0.15)
    values = _VALUES[head]
    path = heads.REGISTRY[head].cv_path(fold, values)
    if head == "logistic" and n_classes > 2:
        assert path is None  # multinomial: scikit-learn's own lbfgs, warm-started along the grid
        return
    predictions, not_converged = path
    assert not_converged == 0
    for v, pred in zip(values, predictions):
        ref = _REFERENCE[head](v).fit(fold.X_train.astype(np.float64), fold.y_train)
        np.testing.assert_array_equal(pred, ref.predict(fold.X_test.astype(np.float64)), err_msg=f"{head} {v}")


@pytest.mark.parametrize("n, dim, n_classes", [(300, 20, 10), (300, 20, 2), (120, 512, 2)])
def test_fast_cv_chooses_what_sklearn_cv_chooses(n, dim, n_classes):
    """At production settings (the registry's estimators, grids and refinement), CV through the
    fast paths chooses the same value, with the same mean CV accuracy per grid value, as CV
    through scikit-learn's own fits."""
    import dataclasses

    rng = np.random.default_rng(n_classes)
    y = np.arange(n) % n_classes
    X = (rng.normal(0, 0.3, (n_classes, dim))[y] + rng.normal(size=(n, dim))).astype(np.float32)
    folds = cv.make_folds(cv.TrainData(X, y, np.arange(n), n, 0), 5, 0)
    # multiclass logistic regression has no fast path: both would run the same lbfgs fits
    for name in ("ridge", "logistic", "linear_svm") if n_classes == 2 else ("ridge", "linear_svm"):
        spec = heads.REGISTRY[name]
        fast = cv.cross_validate(spec, folds, 0, 1, "test")
        reference = cv.cross_validate(dataclasses.replace(spec, cv_path=None), folds, 0, 1, "test")
        assert fast["grid"] == reference["grid"], name
        assert fast["best"] == reference["best"], name
        np.testing.assert_allclose(fast["mean"], reference["mean"], atol=1.5 / n, err_msg=name)


def test_feature_basis_in_float32_matches_float64(monkeypatch):
    """Large folds stay float32 (as cached); the Newton paths still reach the same answers."""
    fold64 = _fold(2, seed=5, n=400, dim=30, m=80, sep=0.15)
    monkeypatch.setattr(cv, "_FLOAT64_MAX_VALUES", 0)
    fold32 = _fold(2, seed=5, n=400, dim=30, m=80, sep=0.15)
    assert fold32.X_train.dtype == np.float32 and fold64.X_train.dtype == np.float64
    for head in ("logistic", "linear_svm", "ridge"):
        a, b = (heads.REGISTRY[head].cv_path(f, _VALUES[head]) for f in (fold64, fold32))
        assert b[1] == 0
        for pa, pb in zip(a[0], b[0]):
            assert np.mean(pa != pb) <= 1 / 80, head


@pytest.mark.parametrize("duplicates", [0, 4])
def test_logistic_newton_in_margin_and_weight_space(duplicates):
    """Square basis (margins) and rank-deficient fold (weights) both reproduce lbfgs."""
    fold = _fold(2, seed=11, duplicates=duplicates)
    Cs = [1e-4, 1e-2, 1.0, 100.0]
    predictions, not_converged = cv.logistic_path(fold, Cs)
    assert not_converged == 0
    for C, pred in zip(Cs, predictions):
        ref = LogisticRegression(C=C, tol=1e-10, max_iter=10000).fit(fold.X_train.astype(np.float64), fold.y_train)
        np.testing.assert_array_equal(pred, ref.predict(fold.X_test.astype(np.float64)), err_msg=str(C))


def test_parallel_folds_give_the_same_choices(tmp_path):
    path = write_feature_cache(tmp_path / "f.h5", sep=0.12, seed=7)
    one = fit(tmp_path, path, "one", heads=("logistic", "sgd_log"))
    two = fit(tmp_path, path, "two", heads=("logistic", "sgd_log"), jobs=2)
    for a, b in zip(one.rows, two.rows):
        assert a.doc["cv"]["mean"] == b.doc["cv"]["mean"] and a.doc["cv"]["best"] == b.doc["cv"]["best"]


def test_basis_is_chosen_from_rows_and_features():
    def fold(n, d):
        X = np.random.default_rng(0).normal(size=(n, d)).astype(np.float32)
        return cv.prepare_fold(X - X.mean(0), np.arange(n) % 2, X[:5], np.zeros(5))

    span, feature = fold(30, 64), fold(100, 64)
    assert span.basis == "span" and span.data(True)[0].shape == (30, 29)
    assert feature.basis == "feature" and feature.Z_train is None and feature.data(True)[0] is feature.X_train
    assert feature.gram.shape == (64, 64) and feature.V.shape == (64, 64)


# ----------------------------------------------------------------------------- persistence


def test_sidecar_schema_and_files(tmp_path, separable):
    result = fit(tmp_path, separable, heads=("logistic", "linear_svm"))
    for row in result.rows:
        doc = json.loads(Path(row.sidecar_path).read_text())
        assert SIDE_KEYS <= set(doc) and FEATURE_KEYS <= set(doc["features"])
        assert doc["kind"] == "head" and doc["name"] == row.name and doc["format"] == "joblib"
        assert doc["model_file"] == f"{row.name}.joblib" and os.path.exists(row.model_path)
        assert doc["size_bytes"] == os.path.getsize(row.model_path)
        assert doc["sha256"] == hashlib.sha256(open(row.model_path, "rb").read()).hexdigest()
        f = doc["features"]
        assert f["path"] == separable and f["pretrained"] is False and f["n_images"] == 100
        assert f["content_key"] == store.read_meta(separable)["content_key"]
        assert isinstance(doc["fit_seconds"], float) and doc["predict_us_per_image"] > 0
        assert doc["trainable_parameters"] == 513 and doc["used_views"] is False
        assert doc["classes"] == ["class0", "class1"] and doc["data_root"] == "/data/synthetic"
        assert doc["metrics"]["predictions"]["paths"][0].startswith("val/")
        assert {"sklearn", "numpy", "joblib"} <= set(doc["versions"])
    assert not [p for p in os.listdir(tmp_path / "cache" / "heads") if ".tmp" in p]


def test_up_to_date_heads_are_reused_and_rebuild_refits(tmp_path, separable):
    first = fit(tmp_path, separable, heads=("ridge",)).rows[0]
    again = fit(tmp_path, separable, heads=("ridge",)).rows[0]
    assert again.reused and again.doc["sha256"] == first.doc["sha256"]
    assert "(up to date)" in fit(tmp_path, separable, heads=("ridge",)).summary()
    assert not fit(tmp_path, separable, heads=("ridge",), rebuild=True).rows[0].reused
    assert not fit(tmp_path, separable, heads=("ridge",), cv_folds=3).rows[0].reused  # settings changed


def test_concurrent_runs_leave_consistent_pairs(tmp_path, separable):
    """Two `heads` runs writing the same folder at once: every sidecar matches its model."""
    import threading

    errors = []

    def work(fmt):
        try:
            fit(tmp_path, separable, heads=("ridge", "nearest_centroid", "logistic"), rebuild=True, format=fmt)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(fmt,)) for fmt in ("joblib", "joblib", "skops")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for name in ("ridge", "nearest_centroid", "logistic"):
        doc = json.loads((tmp_path / "cache" / "heads" / f"{name}.json").read_text())
        assert heads.load_head(tmp_path / "cache" / "heads" / f"{name}.json").name == name
        assert doc["sha256"] == hashlib.sha256((tmp_path / "cache" / "heads" / doc["model_file"]).read_bytes()).hexdigest()
    assert not [p for p in os.listdir(tmp_path / "cache" / "heads") if ".tmp" in p]


def test_a_model_without_sidecar_is_incomplete(tmp_path, separable):
    row = fit(tmp_path, separable, heads=("ridge",)).rows[0]
    os.remove(row.sidecar_path)
    with pytest.raises(UserError, match="no sidecar"):
        heads.load_head(row.model_path)
    assert not fit(tmp_path, separable, heads=("ridge",)).rows[0].reused


def test_load_head_round_trip_and_evaluate(tmp_path, separable):
    row = fit(tmp_path, separable, heads=("logistic",)).rows[0]
    head = heads.load_head(row.sidecar_path, features=separable)
    assert heads.load_head(row.model_path).name == "logistic"
    X, y, _, _ = store.read_split(separable, "val")
    np.testing.assert_array_equal(head.predict(X), row.doc["metrics"]["predictions"]["y_pred"])
    assert head.predict_proba(X).shape == (len(y), 2)
    assert head.evaluate(separable)["accuracy"] == row.doc["metrics"]["accuracy"]


def test_load_head_rejects_a_tampered_file(tmp_path, separable):
    row = fit(tmp_path, separable, heads=("logistic",)).rows[0]
    data = bytearray(Path(row.model_path).read_bytes())
    data[len(data) // 2] ^= 0xFF
    Path(row.model_path).write_bytes(bytes(data))
    with pytest.raises(UserError, match="modified or corrupted after saving; not loading it"):
        heads.load_head(row.sidecar_path)


@pytest.mark.parametrize("change, message", [
    (dict(weights_sha256="f" * 64), "weights"),
    (dict(classes=["ants", "bees"]), "class list"),
])
def test_load_head_rejects_a_mismatched_cache(tmp_path, separable, change, message):
    row = fit(tmp_path, separable, heads=("ridge",)).rows[0]
    other = write_feature_cache(tmp_path / "other.h5", **change)
    with pytest.raises(UserError, match=message):
        heads.load_head(row.sidecar_path, features=other)
    with pytest.raises(UserError, match=message):
        heads.load_head(row.sidecar_path).check_features(other)


def test_head_saved_under_other_sklearn_warns_naming_both_versions(tmp_path, separable, monkeypatch):
    import sklearn
    import sklearn.base

    with monkeypatch.context() as m:
        m.setattr(sklearn.base, "__version__", "1.0.0")
        m.setattr(sklearn, "__version__", "1.0.0")
        row = fit(tmp_path, separable, heads=("ridge",)).rows[0]
    assert row.doc["versions"]["sklearn"] == "1.0.0"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        heads.load_head(row.sidecar_path)
    version = [w for w in caught if issubclass(w.category, InconsistentVersionWarning)]
    assert len(version) == 1
    assert "1.0.0" in str(version[0].message) and sklearn.__version__ in str(version[0].message)


def test_skops_format_round_trip(tmp_path, separable):
    pytest.importorskip("skops")
    row = fit(tmp_path, separable, heads=("logistic",), format="skops").rows[0]
    assert row.model_path.endswith("logistic.skops") and row.doc["format"] == "skops"
    head = heads.load_head(row.sidecar_path)
    X, _, _, _ = store.read_split(separable, "val")
    np.testing.assert_array_equal(head.predict(X), row.doc["metrics"]["predictions"]["y_pred"])
    # switching back to joblib replaces the skops file instead of leaving two models behind
    fit(tmp_path, separable, heads=("logistic",))
    assert sorted(os.listdir(tmp_path / "cache" / "heads")) == [".lock", "logistic.joblib", "logistic.json"]


# ----------------------------------------------------------------------------- out-of-core


def test_out_of_core_streams_chunks_and_never_loads_train(tmp_path, monkeypatch):
    path = write_feature_cache(tmp_path / "big.h5", n_train=1500, n_val=100, sep=0.3, seed=3)
    real = store.read_split

    def no_train(p, split, views=False):
        assert split != "train", "out-of-core must stream train, not load it"
        return real(p, split, views)

    monkeypatch.setattr(store, "read_split", no_train)
    calls = []
    real_iter = store.iter_split_chunks
    monkeypatch.setattr(store, "iter_split_chunks",
                        lambda p, s, n, order=None: (calls.append(n), real_iter(p, s, n, order))[1])
    with pytest.warns(UserWarning, match="skipping logistic"):
        result = fit(tmp_path, path, heads=("logistic", "sgd_log", "sgd_hinge"), out_of_core=True,
                     chunk_rows=256, epochs=3)
    assert [r.name for r in result.rows] == ["sgd_log-ooc", "sgd_hinge-ooc"]
    for row in result.rows:
        assert row.doc["metrics"]["accuracy"] >= 0.95, row.name
        assert row.doc["cv"]["out_of_core"]["rows"] == 3000
    assert max(calls) <= 256
    # the default suite has no streaming head: --out-of-core then trains every head that can
    default = fit(tmp_path, path, "default", out_of_core=True, chunk_rows=512, epochs=1)
    assert [r.name for r in default.rows] == ["sgd_log-ooc", "sgd_hinge-ooc"]


def test_out_of_core_batches_mix_classes_and_cover_every_row(tmp_path):
    """The cache is stored class by class; each partial_fit batch must still mix classes."""
    path = write_feature_cache(tmp_path / "sorted.h5", n_train=500, n_val=2, dim=8)
    seen, mixed = [], []
    for X, y, rows in stream.stream_train(path, 1000, 128, np.random.default_rng(0)):
        assert len(y) <= 128 + 16 and X.shape == (len(y), 8)
        np.testing.assert_array_equal(y, rows >= 500)  # row index i holds label i >= 500
        seen.extend(rows)
        mixed.append(0.2 < y.mean() < 0.8)
    assert sorted(seen) == list(range(1000))
    assert np.mean(mixed) > 0.8


# ----------------------------------------------------------------------------- CLI and README


def test_cli_heads_table_and_user_errors(tmp_path, separable, capsys):
    cache = str(tmp_path / "c")
    assert cli.main(["heads", "--features", separable, "--cache", cache, "--heads", "ridge,knn"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"ridge\s+1\.000 \[", out) and "knn" in out and "not pretrained" in out
    assert cli.main(["heads", "--features", separable, "--cache", cache, "--heads", "bogus"]) == 2
    assert "not a known head" in capsys.readouterr().err
    assert cli.main(["heads", "--features", str(tmp_path / "missing.h5"), "--cache", cache]) == 2
    assert "does not exist" in capsys.readouterr().err


def _readme_snippet() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("<!-- section:heads -->"):text.index("<!-- section:finetune -->")]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    return next(b for b in blocks if "joblib.load" in b)


def test_readme_plain_sklearn_snippet_runs_as_written(tmp_path):
    """A fresh process with only numpy, h5py, joblib and scikit-learn reproduces val accuracy."""
    work = tmp_path / "project"
    (work / "cache" / "features").mkdir(parents=True)
    os.chdir(work)
    try:
        write_feature_cache("cache/features/hymenoptera_data-synthetic.h5", sep=0.1, seed=5)
        row = heads.run(HeadsConfig(cache="cache", features="cache/features/hymenoptera_data-synthetic.h5",
                                    heads=("logistic",))).rows[0]
    finally:
        os.chdir(ROOT)
    check = "\nimport sys\nassert not {'pipeline', 'torch'} & set(sys.modules), sorted(sys.modules)\n"
    out = subprocess.run([sys.executable, "-c", _readme_snippet() + check], cwd=work, capture_output=True,
                         text=True, timeout=120, env=dict(os.environ, PYTHONPATH=""))
    assert out.returncode == 0, out.stderr
    expected = row.doc["metrics"]["accuracy"]
    assert f"val accuracy {expected:.4f} (sidecar: {expected:.4f})" in out.stdout
    assert 0.5 < expected < 1.0  # a meaningful number, not a trivially perfect one


@pytest.mark.slow
def test_make_heads_on_the_real_data_set(real_data, tmp_path, capsys):
    """`make features` then `make heads` (WEIGHTS=random) on the real data: table, every head saved."""
    from pipeline.features import stage as features
    from pipeline.config import FeaturesConfig

    cache = str(tmp_path / "cache")
    features.run(FeaturesConfig(data=str(real_data), cache=cache, weights="random", device="cpu", progress=False))
    assert cli.main(["heads", "--data", str(real_data), "--cache", cache, "--weights", "random",
                     "--device", "cpu", "--views", "0"]) == 0
    out = capsys.readouterr().out
    assert "not pretrained" in out and f"{len(HeadsConfig().heads)} fitted" in out
    for name in HeadsConfig().heads:
        doc = json.loads((tmp_path / "cache" / "heads" / f"{name}.json").read_text())
        assert SIDE_KEYS <= set(doc) and doc["features"]["n_images"] == 245 + 153
        assert doc["metrics"]["n"] == 153 and doc["features"]["pretrained"] is False


@pytest.mark.parametrize("name", ["sgd_log", "sgd_hinge"])
def test_sgd_cv_scores_the_estimator_the_refit_builds(name):
    # Synthetic 4-class set: each grid value's CV accuracy must be that of a cold fit, which is
    # what the refit on all of train builds (a warm start along alpha scored another estimator).
    from sklearn.datasets import make_classification

    X, y = make_classification(n_samples=240, n_features=20, n_informative=8, n_classes=4, random_state=0)
    spec = heads.REGISTRY[name]
    assert not spec.warm_start
    folds = cv.make_folds(cv.TrainData(X, y, np.arange(len(y)), len(y), 0), 3, 0)
    values = spec.grid[:4]
    result = cv.cross_validate(spec, folds, 0, 1, "test")
    scores = dict(zip(result["grid"], result["mean"]))
    for v in values:
        cold = []
        for fold in folds:
            X_tr, X_te = fold.data(spec.span)
            est = cv.fit_ready(spec.build(v, 0), fold.y_train)
            cold.append(np.mean(est.fit(X_tr, fold.y_train).predict(X_te) == fold.y_test))
        assert scores[v] == pytest.approx(np.mean(cold), abs=1e-12)
