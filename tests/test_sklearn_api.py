"""ResNet18Features: scikit-learn conventions, cache reuse, GridSearchCV over image paths."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.utils import estimator_checks

import pipeline
import torch

from pipeline.features import extraction, stage as features, store
from pipeline.config import FeaturesConfig
from pipeline.heads.sklearn_api import ResNet18Features

from .conftest import make_dataset

CHECKS = ["check_no_attributes_set_in_init", "check_parameters_default_constructible", "check_get_params_invariance",
          "check_set_params", "check_estimator_repr", "check_estimator_cloneable", "check_valid_tag_types",
          "check_do_not_raise_errors_in_init_or_set_params"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Tiny colour-coded images plus their feature cache (random weights, seed 0)."""
    root = make_dataset(tmp_path_factory.mktemp("api") / "data")
    cache = root.parent / "cache"
    result = features.run(FeaturesConfig(data=str(root), cache=str(cache), weights="random", device="cpu",
                                         progress=False))
    return root, str(cache), result.path


def _split(root: Path, split: str):
    paths = sorted(str(p) for p in (root / split).rglob("*.jpg"))
    return np.asarray(paths), np.asarray([0 if "/ants/" in p else 1 for p in paths])


@pytest.fixture
def count_computed(monkeypatch):
    """One entry per image that went through the network (the extraction engine's forward)."""
    seen = []
    real = extraction.Extractor.forward

    def spy(self, images):  # a tensor, or the list of tensors of one forward batch
        n = sum(len(x) for x in images) if isinstance(images, (list, tuple)) else len(images)
        seen.extend([self.device.type] * n)
        return real(self, images)

    monkeypatch.setattr(extraction.Extractor, "forward", spy)
    return seen


@pytest.mark.parametrize("check", CHECKS)
def test_scikit_learn_conventions_that_apply(check):
    getattr(estimator_checks, check)("ResNet18Features", ResNet18Features(weights="random"))


def test_params_clone_and_lazy_export():
    est = ResNet18Features(weights="random", seed=3, batch_size=8, cache="somewhere", memory="there")
    assert pipeline.ResNet18Features is ResNet18Features
    assert clone(est).get_params() == est.get_params()
    assert est.set_params(seed=5, device="cpu").get_params()["seed"] == 5
    with pytest.raises(NotFittedError):
        est.transform(["a.jpg"])


def test_fit_transform_pickle_without_the_network(dataset, count_computed):
    root, _, _ = dataset
    paths, y = _split(root, "train")
    est = ResNet18Features(weights="random", device="cpu")
    assert est.fit(paths, y) is est
    X = est.transform(paths)
    assert X.shape == (12, 512) and X.dtype == np.float32 and np.isfinite(X).all()
    assert list(est.get_feature_names_out()[[0, 511]]) == ["resnet18_0", "resnet18_511"]
    assert est.weights_id_ == "random-seed0" and est.pretrained_ is False
    blob = pickle.dumps(est)  # after transform: the network it built is not pickled
    assert len(blob) < 4096 and b"torch" not in blob  # parameters and strings only
    again = pickle.loads(blob).transform(paths[::-1])
    np.testing.assert_allclose(again[::-1], X, rtol=1e-4, atol=1e-4)
    assert len(count_computed) == 24  # no memory=: computed by each transform
    assert vars(clone(est)) == vars(ResNet18Features(weights="random", device="cpu"))  # no fitted state


def test_fitted_on_a_gpu_with_device_auto_runs_where_there_is_none(dataset, monkeypatch, count_computed):
    """A transformer fitted where CUDA was, unpickled where it is not: "auto" means this machine."""
    root, _, _ = dataset
    paths, _ = _split(root, "val")
    with monkeypatch.context() as gpu:  # the machine it was fitted on (no CUDA call is made by fit)
        gpu.setattr(torch.cuda, "is_available", lambda: True)
        gpu.setattr(torch.cuda, "device_count", lambda: 1)
        gpu.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
        gpu.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
        fitted = ResNet18Features(weights="random").fit(paths)
    assert fitted.device_.startswith("cuda") and fitted.precision_ != "fp32"
    moved = pickle.loads(pickle.dumps(fitted))
    X = moved.transform(paths)
    assert set(count_computed) == {"cpu"} and X.shape == (len(paths), 512)
    expected = ResNet18Features(weights="random", device="cpu").fit(paths).transform(paths)
    np.testing.assert_allclose(X, expected, rtol=1e-4, atol=1e-4)  # fp32: this machine's auto precision
    with pytest.raises(ValueError, match="device='cuda'.*no CUDA GPU"):
        moved.set_params(device="cuda").transform(paths)  # asked for explicitly: not silently the CPU


def test_reads_a_matching_feature_cache_instead_of_recomputing(dataset, count_computed):
    root, cache, cache_file = dataset
    paths, _ = _split(root, "val")
    X = ResNet18Features(weights="random", device="cpu", cache=cache).fit(paths).transform(paths)
    assert count_computed == []
    known = store.read_known_rows(cache_file)
    expected = np.stack([known[str(Path(p).relative_to(root))].feature for p in paths])
    np.testing.assert_array_equal(X, expected)
    # other weights do not match the cache: computed, not read
    ResNet18Features(weights="random", seed=1, device="cpu", cache=cache_file).fit(paths).transform(paths)
    assert len(count_computed) == len(paths)
    computed = ResNet18Features(weights="random", device="cpu").fit(paths).transform(paths)
    np.testing.assert_allclose(computed, expected, rtol=1e-3, atol=1e-3)


def test_grid_search_and_cross_val_score_over_image_paths(dataset, count_computed, tmp_path):
    root, _, _ = dataset
    X_train, y_train = _split(root, "train")
    X_val, y_val = _split(root, "val")
    memory = str(tmp_path / "memory")
    model = make_pipeline(ResNet18Features(weights="random", device="cpu", memory=memory),
                          LogisticRegression(max_iter=1000))
    cv = StratifiedKFold(3, shuffle=True, random_state=0)
    search = GridSearchCV(model, {"logisticregression__C": [0.01, 1.0]}, cv=cv).fit(X_train, y_train)
    assert search.best_score_ >= 0.9
    assert np.mean(search.predict(X_val) == y_val) >= 0.9
    assert cross_val_score(clone(model), X_train, y_train, cv=cv).mean() >= 0.9
    assert len(count_computed) == len(X_train) + len(X_val)  # each image through the network once
    restored = pickle.loads(pickle.dumps(search))
    np.testing.assert_array_equal(restored.predict(X_val), search.predict(X_val))
    assert len(count_computed) == len(X_train) + len(X_val)  # remembered across the pickle too
    # The memory is keyed by settings: other weights are computed, not served from it.
    other = ResNet18Features(weights="random", seed=1, device="cpu", memory=memory).fit(X_val)
    assert not np.allclose(other.transform(X_val), search.best_estimator_[0].transform(X_val))
    assert len(count_computed) == len(X_train) + 2 * len(X_val)


def test_bad_inputs_raise_value_errors_naming_them(dataset, tmp_path):
    root, _, _ = dataset
    est = ResNet18Features(weights="random", device="cpu")
    with pytest.raises(ValueError, match="single path"):
        est.fit("one.jpg")
    with pytest.raises(ValueError, match=r"shape \(2, 2\)"):
        est.fit([["a", "b"], ["c", "d"]])
    with pytest.raises(ValueError, match="batch_size=-1"):
        ResNet18Features(weights="random", batch_size=-1).fit(["a.jpg"])
    with pytest.raises(ValueError, match="weights='nonsense'"):
        ResNet18Features(weights="nonsense").fit(["a.jpg"])
    with pytest.raises(ValueError, match="precision 'fp64' is not recognised"):
        ResNet18Features(weights="random", device="cpu", precision="fp64").fit(["a.jpg"])
    with pytest.raises(ValueError, match="memory"):
        ResNet18Features(weights="random", memory=3).fit(["a.jpg"])
    with pytest.raises(ValueError, match="cache=.*does not exist"):
        ResNet18Features(weights="random", cache=str(tmp_path / "nowhere")).fit(["a.jpg"])
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    good = str(next((root / "val").rglob("*.jpg")))
    est.fit([good])
    with pytest.raises(ValueError, match="cannot decode image .*broken.jpg"):
        est.transform([good, str(bad)])
    feats, ok, errors = est.extract([good, str(bad)])
    assert feats.shape == (1, 512) and list(ok) == [0] and errors[0][0] == str(bad)
