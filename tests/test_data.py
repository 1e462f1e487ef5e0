"""Robust image decoding and data-set discovery."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.data import imagefolder as data
from pipeline.errors import UserError
from tests.conftest import make_dataset


def _png_bytes(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_sixteen_bit_is_rescaled_not_clipped():
    arr = np.full((8, 8), 32896, dtype=np.uint16)  # 32896 / 257 = 128
    rgb = np.asarray(data.decode_image(_png_bytes(Image.fromarray(arr))))
    assert rgb.shape == (8, 8, 3)
    assert abs(int(rgb[0, 0, 0]) - 128) <= 1


def test_transparent_pixels_become_white_not_hidden_colour():
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # pure red, fully transparent
    rgb = np.asarray(data.decode_image(_png_bytes(Image.fromarray(rgba, "RGBA"))))
    assert (rgb == 255).all()


def test_palette_with_transparency_and_cmyk_and_grayscale_become_rgb():
    pal = Image.new("P", (6, 6), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.info["transparency"] = 0
    assert np.asarray(data.decode_image(_png_bytes(pal, "GIF")))[0, 0].tolist() == [10, 200, 30]
    cmyk = Image.new("CMYK", (6, 6), (0, 255, 255, 0))  # red in CMYK
    red = np.asarray(data.decode_image(_png_bytes(cmyk, "JPEG")))[0, 0]
    assert red[0] > 200 and red[1] < 60
    assert data.decode_image(_png_bytes(Image.new("L", (5, 5), 77))).mode == "RGB"


def test_exif_orientation_is_applied():
    im = Image.new("RGB", (40, 20), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when displayed
    out = data.decode_image(_png_bytes(im, "JPEG", exif=exif.tobytes()))
    assert out.size == (20, 40)


def test_draft_decoding_keeps_short_side_at_least_resize():
    im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (1200, 1600, 3), dtype=np.uint8))
    raw = _png_bytes(im, "JPEG")
    drafted = data.decode_image(raw, draft_size=256)
    assert min(drafted.size) >= 256 and drafted.size[0] < 1600
    assert data.decode_image(raw).size == (1600, 1200)


@pytest.mark.parametrize("payload", [b"", b"this is text, not a JPEG", "truncated"])
def test_undecodable_files_raise(payload):
    if payload == "truncated":
        payload = _png_bytes(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")[:200]
    with pytest.raises(Exception):
        data.decode_image(payload)


def test_discover_classes_nested_hidden_and_extension_case(tmp_path):
    root = make_dataset(tmp_path / "d", n_train=2, n_val=1)
    nested = root / "train" / "ants" / "deeper" / "UPPER.JPG"
    nested.parent.mkdir()
    (root / "train" / "ants" / "img_000.jpg").replace(nested)
    (root / "train" / "ants" / ".hidden.jpg").write_bytes(b"x")
    (root / "train" / "ants" / "notes.txt").write_text("not an image")
    ds = data.discover(str(root))
    assert ds.classes == ["ants", "bees"]
    paths = [it.relpath for it in ds.splits["train"]]
    assert "train/ants/deeper/UPPER.JPG" in paths
    assert not any(".hidden" in p or p.endswith(".txt") for p in paths)
    assert [it.label for it in ds.splits["train"]] == [0, 0, 1, 1]


@pytest.mark.parametrize("problem, message", [
    ("missing", "does not exist"),
    ("one_class", "at least 2"),
    ("unknown_val_class", "that train/ does not have"),
    ("empty_class", "has no images"),
    ("no_val", "val"),
])
def test_discover_user_errors(tmp_path, problem, message):
    root = make_dataset(tmp_path / "d", n_train=1, n_val=1)
    if problem == "missing":
        root = tmp_path / "nope"
    elif problem == "one_class":
        for split in ("train", "val"):
            for f in (root / split / "bees").iterdir():
                f.unlink()
            (root / split / "bees").rmdir()
    elif problem == "unknown_val_class":
        (root / "val" / "wasps").mkdir()
    elif problem == "empty_class":
        (root / "train" / "wasps").mkdir()
    elif problem == "no_val":
        for f in (root / "val").rglob("*.jpg"):
            f.unlink()
    with pytest.raises(UserError, match=message):
        data.discover(str(root))
