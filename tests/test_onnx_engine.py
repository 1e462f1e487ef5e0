"""--engine onnxruntime: the extractor exported once per weights, features equal to torch's fp32 ones."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from pipeline import backbones
from pipeline.features import stage as features, store
from pipeline.config import FeaturesConfig
from pipeline.errors import UserError

from .conftest import make_dataset

pytest.importorskip("onnxruntime")


def _cfg(data, cache, **kw) -> FeaturesConfig:
    return FeaturesConfig(data=str(data), cache=str(cache), weights="random", device="cpu", workers=0,
                          progress=False, **kw)


@pytest.mark.slow  # the export alone takes about 10 s on 2 cores
@pytest.mark.parametrize("backbone", ["resnet18", "timm:mobilenetv3_small_050"])
def test_onnxruntime_features_equal_torch_fp32_and_export_once(tmp_path, small_images, monkeypatch, backbone):
    data = make_dataset(tmp_path / "data", n_train=2, n_val=1)
    ref = features.run(_cfg(data, tmp_path / "torch", precision="fp32", backbone=backbone))
    ort = features.run(_cfg(data, tmp_path / "ort", precision="fp32", engine="onnxruntime", backbone=backbone))
    assert os.path.basename(ort.path) == os.path.basename(ref.path)  # the same fp32 cache key
    assert store.read_meta(ort.path)["extract_engine"] == "onnxruntime"
    for split in ("train", "val"):
        a, _, pa, _ = store.read_split(ref.path, split)
        b, _, pb, _ = store.read_split(ort.path, split)
        assert pa == pb
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)
    exported = list((tmp_path / "ort" / "features" / "onnx").glob("*.onnx"))
    assert len(exported) == 1

    def no_export(*a, **k):
        raise AssertionError("exported twice")

    monkeypatch.setattr(torch.onnx, "export", no_export)
    again = features.run(_cfg(data, tmp_path / "ort", precision="fp32", engine="onnxruntime", rebuild=True,
                              backbone=backbone))
    assert again.computed == 6


def test_onnxruntime_refuses_what_it_cannot_compute(tmp_path, small_images, monkeypatch):
    data = make_dataset(tmp_path / "data", n_train=1, n_val=1)
    with pytest.raises(UserError, match="--engine onnxruntime computes fp32 on CPU, not bf16"):
        features.resolve(_cfg(data, tmp_path / "c", precision="bf16", engine="onnxruntime"))
    monkeypatch.setenv(backbones.NATIVE_BF16_ENV, "1")  # where auto is bf16, fp32 must be asked for
    with pytest.raises(UserError, match="--precision fp32"):
        features.resolve(_cfg(data, tmp_path / "c", engine="onnxruntime"))
