"""Stage 1: the feature cache — correctness, resume, incremental updates, staleness, bad images."""
from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import models, transforms

from pipeline import backbones
from pipeline.features import stage as features, store
from pipeline.config import FeaturesConfig
from pipeline.errors import UserError
from tests.conftest import make_dataset, make_image

REPO = Path(__file__).resolve().parents[1]


def _cfg(data, cache, **kw) -> FeaturesConfig:
    kw.setdefault("workers", 0)
    return FeaturesConfig(data=str(data), cache=str(cache), weights="random", progress=False, **kw)


def _read(path, split="train"):
    with h5py.File(path, "r") as f:
        g = f[split]
        return g["features"][()], g["labels"][()], list(g["paths"].asstr()[()])


def test_features_equal_an_independent_torchvision_forward(tiny_data, tmp_path):
    result = features.run(_cfg(tiny_data, tmp_path / "c"))
    feats, labels, paths = _read(result.path, "val")

    torch.manual_seed(0)  # what --weights random --seed 0 promises: torchvision's init under seed 0
    model = models.resnet18()
    model.fc = torch.nn.Identity()
    model.eval()
    tf = transforms.Compose([
        transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])
    batch = torch.stack([tf(Image.open(tiny_data / p).convert("RGB")) for p in paths])
    with torch.no_grad():
        expected = model(batch).numpy()
    cos = (feats * expected).sum(1) / (np.linalg.norm(feats, axis=1) * np.linalg.norm(expected, axis=1))
    assert cos.min() >= 0.9999
    assert feats.shape == (8, 512) and feats.dtype == np.float32
    assert labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert paths[0] == "val/ants/img_000.jpg"


def test_cache_is_self_describing_plain_hdf5(tiny_data, tmp_path):
    result = features.run(_cfg(tiny_data, tmp_path / "c"))
    with h5py.File(result.path, "r") as f:
        assert f.attrs["format"] == store.FORMAT
        assert f.attrs["backbone"] == "resnet18"
        assert f.attrs["weights_id"] == "random-seed0"
        assert not f.attrs["pretrained"]
        assert f.attrs["precision"] == "fp32"
        assert '"ants"' in f.attrs["classes"]
        assert "Resize" in f.attrs["transform"] and "torch" in f.attrs["versions"]
        assert len(f.attrs["weights_sha256"]) == 64
        for split in ("train", "val"):
            assert f[split].attrs["complete"]
            assert f[split]["labels"].dtype == np.int64
    assert "not pretrained" in store.describe(result.path)


def test_warm_rerun_does_no_forward_pass(tiny_data, tmp_path, monkeypatch):
    cfg = _cfg(tiny_data, tmp_path / "c")
    first = features.run(cfg)
    assert first.computed == 20 and not first.up_to_date

    def no_network(*a, **k):
        raise AssertionError("the backbone must not run on an unchanged data set")

    monkeypatch.setattr(backbones.network, "feature_extractor", no_network)
    os.utime(tiny_data / "train/ants/img_000.jpg")  # touched, not changed: the hash decides
    second = features.run(cfg)
    assert second.up_to_date and second.computed == 0
    assert second.content_key == first.content_key
    assert "no forward pass" in second.summary()


def test_incremental_update_touches_only_changed_rows(tiny_data, tmp_path):
    cfg = _cfg(tiny_data, tmp_path / "c")
    first = features.run(cfg)
    before, _, before_paths = _read(first.path)
    rng = np.random.default_rng(5)
    make_image(tiny_data / "train/bees/new.jpg", 1, rng)  # new
    make_image(tiny_data / "train/ants/img_001.jpg", 1, rng)  # changed content
    (tiny_data / "train/ants/img_002.jpg").unlink()  # removed
    second = features.run(cfg)
    assert second.computed == 2
    after, labels, paths = _read(second.path)
    assert "train/bees/new.jpg" in paths and "train/ants/img_002.jpg" not in paths
    keep = before_paths.index("train/ants/img_000.jpg")
    np.testing.assert_array_equal(after[paths.index("train/ants/img_000.jpg")], before[keep])
    changed = before_paths.index("train/ants/img_001.jpg")
    assert not np.allclose(after[paths.index("train/ants/img_001.jpg")], before[changed])
    assert second.content_key != first.content_key
    assert labels.tolist() == [0] * 5 + [1] * 7


@pytest.mark.parametrize("change", [{"precision": "bf16"}, {"views": 1}, {"draft": False}, {"weights": "seed1"}])
def test_changed_settings_never_reuse_a_stale_cache(tiny_data, tmp_path, change):
    base = _cfg(tiny_data, tmp_path / "c")
    if change == {"weights": "seed1"}:
        other = replace(base, seed=1)
    else:
        other = replace(base, **change)
    a, b = features.resolve(base).path, features.resolve(other).path
    assert a != b


def test_random_seed_changes_the_weights_and_the_file(tiny_data, tmp_path):
    a = features.run(_cfg(tiny_data, tmp_path / "c"))
    b = features.run(_cfg(tiny_data, tmp_path / "c", seed=1))
    assert a.path != b.path and not b.up_to_date
    assert not np.allclose(_read(a.path)[0], _read(b.path)[0])


def test_views_are_stored_and_deterministic(tiny_data, tmp_path):
    a = features.run(_cfg(tiny_data, tmp_path / "a", views=2))
    b = features.run(_cfg(tiny_data, tmp_path / "b", views=2, workers=1))
    _, _, _, va = store.read_split(a.path, "train", views=True)
    _, _, _, vb = store.read_split(b.path, "train", views=True)
    assert va.shape == (12, 2, 512)
    np.testing.assert_allclose(va, vb, rtol=1e-5, atol=1e-5)
    assert not np.allclose(va[:, 0], va[:, 1])  # two different augmentations
    assert store.read_meta(a.path)["splits"]["val"]["views"] == 0


def _bad_images(root: Path) -> dict:
    """Every bad-image kind, keyed by path, with whether it must be skipped."""
    ants = root / "train" / "ants"
    rgb = Image.new("RGB", (64, 48), (120, 30, 30))
    cases = {}
    (ants / "zero.jpg").write_bytes(b"")
    cases["zero.jpg"] = True
    (ants / "text.jpg").write_text("not an image at all")
    cases["text.jpg"] = True
    rgb.save(ants / "full.jpg")
    (ants / "truncated.jpg").write_bytes((ants / "full.jpg").read_bytes()[:300])
    (ants / "full.jpg").unlink()
    cases["truncated.jpg"] = True
    Image.new("CMYK", (50, 50), (0, 200, 200, 0)).save(ants / "cmyk.jpg")
    Image.fromarray(np.full((40, 40), 40000, np.uint16)).save(ants / "sixteen.png")
    Image.new("RGBA", (40, 40), (255, 0, 0, 0)).save(ants / "alpha.png")
    rgb.convert("P").save(ants / "palette.gif")
    exif = Image.Exif()
    exif[0x0112] = 6
    rgb.save(ants / "rotated.jpg", exif=exif.tobytes())
    rgb.save(ants / "UPPER.JPEG")
    Image.new("RGB", (3000, 2200), (10, 10, 200)).save(ants / "huge.jpg", quality=70)
    for name in ("cmyk.jpg", "sixteen.png", "alpha.png", "palette.gif", "rotated.jpg", "UPPER.JPEG", "huge.jpg"):
        cases[name] = False
    (ants / ".DS_Store").write_bytes(b"\0junk")
    (ants / "readme.txt").write_text("ignored")
    return cases


def test_bad_images_are_skipped_listed_and_the_rest_cached(tiny_data, tmp_path):
    cases = _bad_images(tiny_data)
    result = features.run(_cfg(tiny_data, tmp_path / "c"))
    skipped = {Path(s["path"]).name: s["reason"] for s in result.skipped}
    assert set(skipped) == {n for n, bad in cases.items() if bad}
    assert all(skipped.values())
    _, _, paths = _read(result.path)
    names = {Path(p).name for p in paths}
    assert {n for n, bad in cases.items() if not bad} <= names
    assert ".DS_Store" not in names and "readme.txt" not in names
    assert "zero.jpg" in result.summary()
    # Skipped files are remembered: an unchanged rerun does not try them again.
    assert features.run(_cfg(tiny_data, tmp_path / "c")).up_to_date


def test_strict_makes_a_bad_image_fatal(tiny_data, tmp_path):
    (tiny_data / "val" / "bees" / "broken.jpg").write_bytes(b"garbage")
    with pytest.raises(UserError, match="broken.jpg.*--strict"):
        features.run(_cfg(tiny_data, tmp_path / "c", strict=True))


def test_imagenet_weights_come_from_the_torch_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    with pytest.raises(UserError, match="resnet18-f37072fd.pth"):
        backbones.resolve_weights("imagenet")
    torch.manual_seed(3)
    sd = models.resnet18().state_dict()
    target = Path(backbones.imagenet_cache_file())
    assert target.parent == tmp_path / "th" / "hub" / "checkpoints"
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, target)
    w = backbones.resolve_weights("imagenet")
    assert w.id == "imagenet" and w.pretrained
    assert w.sha256 == backbones.state_dict_sha256(sd)


def test_weights_from_a_state_dict_file(tmp_path):
    sd = models.resnet18().state_dict()
    torch.save({"model": sd}, tmp_path / "best.pt")
    w = backbones.resolve_weights(str(tmp_path / "best.pt"))
    assert w.id == "file:best.pt" and w.sha256 == backbones.state_dict_sha256(sd)
    (tmp_path / "junk.pt").write_text("no")
    with pytest.raises(UserError, match="not a readable"):
        backbones.resolve_weights(str(tmp_path / "junk.pt"))


_SLOW_RUN = """
import sys, time
import pipeline.features.store as s
original = s.write_part
def slow(*a, **k):
    out = original(*a, **k)
    time.sleep(0.4)
    return out
s.write_part = slow
from pipeline.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_killed_run_resumes_to_the_same_cache(tmp_path):
    data = make_dataset(tmp_path / "data", n_train=8, n_val=4)
    args = ["features", "--data", str(data), "--cache", str(tmp_path / "c"), "--weights", "random",
            "--batch-size", "2", "--workers", "0", "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_RUN, *args], cwd=REPO)
    deadline = time.time() + 120
    while time.time() < deadline and len(glob.glob(str(tmp_path / "c/features/*.parts/*.npz"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    parts = store.read_parts(glob.glob(str(tmp_path / "c/features/*.parts"))[0])
    assert 3 * 2 <= len(parts) < 24
    assert not glob.glob(str(tmp_path / "c/features/*.h5"))  # nothing partial under the final name

    resumed = features.run(_cfg(data, tmp_path / "c", batch_size=2))
    assert resumed.computed == 24 - len(parts)  # only the batch in flight (if any) is redone
    assert not os.path.exists(resumed.path + ".parts")
    fresh = features.run(_cfg(data, tmp_path / "fresh", batch_size=2))
    for split in ("train", "val"):
        a, la, pa = _read(resumed.path, split)
        b, lb, pb = _read(fresh.path, split)
        assert pa == pb and la.tolist() == lb.tolist()
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert resumed.content_key == fresh.content_key


def test_corrupt_cache_is_a_user_error_naming_rebuild(tiny_data, tmp_path):
    result = features.run(_cfg(tiny_data, tmp_path / "c"))
    with open(result.path, "r+b") as fh:
        fh.truncate(2000)
    with pytest.raises(UserError, match="--rebuild"):
        features.run(_cfg(tiny_data, tmp_path / "c"))
    rebuilt = features.run(_cfg(tiny_data, tmp_path / "c", rebuild=True))
    assert rebuilt.computed == 20


def test_real_data_set(real_data, tmp_path):
    result = features.run(_cfg(real_data, tmp_path / "c", workers=1))
    meta = store.read_meta(result.path)
    assert meta["splits"]["train"]["n"] + len(meta["splits"]["train"]["skipped"]) == 245
    assert meta["splits"]["val"]["n"] + len(meta["splits"]["val"]["skipped"]) == 153
    feats, labels, _, _ = store.read_split(result.path, "val")
    assert np.isfinite(feats).all() and set(labels.tolist()) == {0, 1}
