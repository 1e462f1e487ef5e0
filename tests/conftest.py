"""Shared fixtures: tiny synthetic ImageFolder data sets (small images, fast on 2 cores)."""
from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CLASSES = ("ants", "bees")


def make_image(path: Path, label: int, rng: np.random.Generator, size=(40, 32)) -> None:
    """A small image whose colour depends on its class, so even random features separate them."""
    w, h = size
    base = np.array([200, 60, 40]) if label == 0 else np.array([40, 80, 210])
    pixels = np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def make_dataset(root: Path, n_train: int = 6, n_val: int = 4, seed: int = 0, classes=CLASSES) -> Path:
    """root/{train,val}/<class>/img_<i>.jpg with ``n_*`` images per class."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for label, name in enumerate(classes):
            for i in range(n):
                make_image(root / split / name / f"img_{i:03d}.jpg", label, rng)
    return root


@pytest.fixture
def tiny_data(tmp_path) -> Path:
    """12 train + 8 val images of two colour-coded classes."""
    return make_dataset(tmp_path / "data")


@pytest.fixture
def real_data() -> Path:
    """The real hymenoptera data set, when PIPELINE_TEST_DATA points at it."""
    path = os.environ.get("PIPELINE_TEST_DATA")
    if not path or not os.path.isdir(path):
        pytest.skip("set PIPELINE_TEST_DATA to the hymenoptera_data folder to run this test")
    return Path(path)


SMALL_PREPROCESS = {"resize": 40, "crop": 32}


@functools.lru_cache(maxsize=None)
def stand_in_weights():
    """Random ResNet18 weights, for tests that replace the engine's network by a stand-in (the
    engine still reads its backbone and preprocessing from them)."""
    from pipeline import backbones

    return backbones.resolve_weights("random")


def small_project(root: Path, head_names, then=None) -> dict:
    """A 3 + 2 image per class data set under ``root``, its feature cache and ``head_names``
    fitted on it, at SMALL_PREPROCESS; ``then(data, cache)`` runs under the same preprocessing
    (an end-to-end run, say). Returns ``{"data", "cache", "features"}``."""
    from pipeline import config
    from pipeline.features import stage as features
    from pipeline.heads import stage as heads
    from pipeline.config import FeaturesConfig, HeadsConfig

    data = make_dataset(root / "data", n_train=3, n_val=2)
    cache = root / "cache"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in SMALL_PREPROCESS.items():
            mp.setitem(config.PREPROCESS, key, value)
        path = features.run(FeaturesConfig(data=str(data), cache=str(cache), weights="random", device="cpu",
                                           workers=0, progress=False)).path
        heads.run(HeadsConfig(features=path, cache=str(cache), heads=tuple(head_names), cv_folds=2))
        if then is not None:
            then(data, cache)
    return {"data": data, "cache": cache, "features": path}


@pytest.fixture
def small_images(monkeypatch):
    """32-pixel crops keep a ResNet18 pass cheap; one thread avoids OpenMP stalls on busy cores."""
    import torch
    from pipeline import config

    for key, value in SMALL_PREPROCESS.items():
        monkeypatch.setitem(config.PREPROCESS, key, value)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="session")
def _fp32_on_every_cpu():
    """`--precision auto` means fp32 in every test, whatever the CPU (and in subprocesses too):
    on a CPU with native bf16 it would pick bf16. tests/test_precision.py tests the detection.
    Session-scoped, so that module-scoped fixtures see it too."""
    from pipeline import backbones

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(backbones.NATIVE_BF16_ENV, "0")
        yield


@pytest.fixture(autouse=True)
def _offline_torch_home(tmp_path, monkeypatch):
    """Keep tests away from the user's hub cache; nothing is downloaded in tests."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


def pytest_terminal_summary(terminalreporter):
    """The reliability figures (README): faults tried and how many lost or corrupted anything."""
    from tests import faults

    if faults.FIGURES:
        terminalreporter.section("reliability figures")
        for line in faults.summary():
            terminalreporter.write_line(line)
