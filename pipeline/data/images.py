"""Image files without torch: finding them, decoding them to upright RGB, and the eval preprocessing.

``python -m pipeline predict --model FILE.onnx`` runs on this module, NumPy and ONNX Runtime
alone. :func:`eval_array` is the PIL + NumPy twin of ``data.eval_transform()`` up to (not
including) the normalisation: torchvision's Resize and CenterCrop call the same PIL
operations on PIL images, so the two give the same pixels.
"""
from __future__ import annotations

import io
import os
import warnings
from typing import List, Optional, Sequence

import numpy as np
from PIL import Image, ImageOps

from ..errors import UserError

__all__ = ["tensor_decodable", "is_image_file", "checked_utf8", "walk_images", "collect_images", "decode_image", "load_image", "eval_array",
           "INTERPOLATIONS"]

Image.init()
# Extensions PIL can open (not the save-only ones), compared case-insensitively.
_OPENABLE = {ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def is_image_file(name: str) -> bool:
    """True for a non-hidden file whose extension PIL can open (any case)."""
    base = os.path.basename(name)
    return not base.startswith(".") and os.path.splitext(base)[1].lower() in _OPENABLE


def checked_utf8(path: str) -> str:
    """``path``, if its name is valid UTF-8 (paths are stored as UTF-8 in caches and results)."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(path).decode("utf-8", "backslashreplace")
        raise UserError(f"'{shown}' has a name that is not valid UTF-8 (shown with \\x escapes); rename it") from None
    return path


def walk_images(folder: str) -> List[str]:
    """Image files under ``folder``, recursively, hidden files and folders excluded, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(checked_utf8(os.path.join(dirpath, f)) for f in filenames if is_image_file(f))
    return sorted(found)


def collect_images(inputs: Sequence[str]) -> List[str]:
    """Image files named directly or found (recursively) under the given folders."""
    paths: List[str] = []
    for entry in inputs:
        if os.path.isdir(entry):
            paths.extend(walk_images(entry))
        elif os.path.isfile(entry):
            paths.append(checked_utf8(entry))
        else:
            raise UserError(f"{entry!r} is neither an image file nor a folder; check the path")
    return paths


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB the way a person would expect to see it."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit or 32-bit samples: rescale; convert("L") would clip everything above 255.
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8)
        im = Image.fromarray(arr, mode="L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        # Composite on white: dropping alpha would expose whatever colour hides under it.
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, rgba)
    return im if im.mode == "RGB" else im.convert("RGB")


def decode_image(data: bytes, draft_size: Optional[int] = None) -> Image.Image:
    """Decode image bytes to an upright RGB PIL image.

    ``draft_size``: for JPEGs whose short side is at least twice this, let libjpeg decode
    at a reduced scale (a power of two) that keeps the short side >= draft_size.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im = Image.open(io.BytesIO(data))
        if draft_size and im.format == "JPEG" and min(im.size) >= 2 * draft_size:
            im.draft(im.mode, (draft_size, draft_size))
        im.load()
        im = ImageOps.exif_transpose(im)
    return _to_rgb(im)


# Larger JPEGs go through PIL (whose draft mode decodes them at a reduced scale), not to a GPU decoder.
TENSOR_DECODE_MAX_PIXELS = 64_000_000


def tensor_decodable(data: bytes) -> bool:
    """Whether a tensor JPEG decoder (``torchvision.io.decode_jpeg``) gives what :func:`decode_image` would:
    an 8-bit baseline RGB or greyscale JPEG of reasonable size (its header only is read).

    CMYK/YCCK, 12-bit and other formats, and huge images keep PIL's robust decoding.
    """
    if data[:3] != b"\xff\xd8\xff":
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            return im.format == "JPEG" and im.mode in ("RGB", "L") and 0 < w * h <= TENSOR_DECODE_MAX_PIXELS
    except Exception:  # not even a readable header: PIL's path reports it
        return False


def load_image(path: str, draft_size: Optional[int] = None) -> Image.Image:
    with open(path, "rb") as fh:
        return decode_image(fh.read(), draft_size)


# torchvision's InterpolationMode values (PREPROCESS["interpolation"]) -> PIL's filters.
INTERPOLATIONS = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
                  "box": Image.BOX, "hamming": Image.HAMMING, "lanczos": Image.LANCZOS}


def eval_array(image: Image.Image, resize: int, crop: int, interpolation: str = "bilinear") -> np.ndarray:
    """Resize the short side to ``resize`` (PIL resampling, antialiased), center-crop ``crop``
    pixels, and return a float32 array of shape (3, crop, crop) in [0, 1].

    The same pixels as torchvision's ``Resize(resize)``, ``CenterCrop(crop)`` and ``ToTensor()``
    on a PIL image: the output size is computed as torchvision computes it (long side
    truncated), the crop offset is rounded like ``center_crop`` does.
    """
    if crop > resize:
        raise ValueError(f"crop {crop} is larger than the resized short side {resize}")
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = resize, int(resize * long / short)
    size = (new_short, new_long) if w <= h else (new_long, new_short)
    if image.size != size:
        image = image.resize(size, INTERPOLATIONS[interpolation])
    w, h = size
    top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
    pixels = np.asarray(image.crop((left, top, left + crop, top + crop)), dtype=np.uint8)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)).astype(np.float32) / np.float32(255)
