"""Data-set discovery, robust image loading and the transforms (built from PREPROCESS)."""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import warnings
import zlib
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence

import torch
from torchvision import transforms

from ..config import DEFAULT_DATA_DIR, DEFAULT_DATA_URL, PREPROCESS, SPLITS
from ..errors import UserError
from .images import tensor_decodable, checked_utf8, walk_images, collect_images, decode_image, is_image_file, load_image

__all__ = [
    "Item",
    "DataSet",
    "discover",
    "is_image_file",
    "load_image",
    "decode_image",
    "eval_transform",
    "train_transform",
    "describe_transforms",
    "seeded",
    "ImageDataset",
    "ExtractionDataset",
    "collect_images",
    "tensor_decodable",
    "decode_jpegs",
    "tensor_eval_transform",
    "TENSOR_DECODE",
]

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Item:
    """One image of a split: its path relative to the data root and its class index."""

    relpath: str
    label: int


@dataclass(frozen=True)
class DataSet:
    """An ImageFolder-style data set: ``root/<split>/<class>/**/<image>``."""

    root: str
    classes: List[str]
    splits: Dict[str, List[Item]]

    def path(self, item: Item) -> str:
        return os.path.join(self.root, item.relpath)


def _class_dirs(split_dir: str) -> List[str]:
    return sorted(
        d for d in os.listdir(split_dir)
        if not d.startswith(".") and os.path.isdir(os.path.join(split_dir, d)) and checked_utf8(os.path.join(split_dir, d))
    )


def _download_default(root: str) -> None:
    """Fetch the tutorial's hymenoptera data set into ``data/`` (where the network allows)."""
    from torchvision.datasets.utils import download_and_extract_archive

    parent = os.path.dirname(os.path.abspath(root))
    log.info("downloading %s into %s", DEFAULT_DATA_URL, parent)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)
    try:
        download_and_extract_archive(DEFAULT_DATA_URL, download_root=parent, remove_finished=True)
    except Exception as exc:  # any network failure means the same thing to the user
        raise UserError(
            f"the default data set could not be downloaded from {DEFAULT_DATA_URL} ({type(exc).__name__}); "
            "point DATA_DIR=/path (or --data /path) at an image folder with train/ and val/"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)


def discover(root: str) -> DataSet:
    """Find classes (from ``train/``) and the images of each split.

    Raises
    ------
    UserError
        Missing folders, fewer than two classes, a train class without images, or a val
        class that train does not have.
    """
    if not os.path.isdir(root) and os.path.normpath(root) == os.path.normpath(DEFAULT_DATA_DIR):
        _download_default(root)
    checked_utf8(os.path.abspath(root))
    if not os.path.isdir(root):
        raise UserError(
            f"data folder {root!r} does not exist; pass --data DIR (make: DATA_DIR=DIR) "
            "pointing at a folder with train/<class>/ and val/<class>/ images"
        )
    for split in SPLITS:
        if not os.path.isdir(os.path.join(root, split)):
            raise UserError(
                f"{os.path.join(root, split)!r} is missing; the data folder needs train/<class>/ and "
                "val/<class>/ sub-folders (ImageFolder layout)"
            )
    classes = _class_dirs(os.path.join(root, "train"))
    if len(classes) < 2:
        raise UserError(
            f"{os.path.join(root, 'train')!r} has {len(classes)} class folder(s); a classifier needs at "
            "least 2: add one sub-folder of images per class"
        )
    splits: Dict[str, List[Item]] = {}
    for split in SPLITS:
        split_dir = os.path.join(root, split)
        unknown = sorted(set(_class_dirs(split_dir)) - set(classes))
        if unknown:
            raise UserError(
                f"{split_dir!r} has class folder(s) {unknown} that train/ does not have "
                f"(train classes: {classes}); rename or remove them"
            )
        items = []
        for label, name in enumerate(classes):
            class_dir = os.path.join(split_dir, name)
            files = walk_images(class_dir) if os.path.isdir(class_dir) else []
            if split == "train" and not files:
                raise UserError(
                    f"class folder {class_dir!r} has no images; add images or remove the folder"
                )
            items.extend(Item(os.path.relpath(f, root).replace(os.sep, "/"), label) for f in files)
        splits[split] = items
    if not splits["val"]:
        raise UserError(f"{os.path.join(root, 'val')!r} has no images; add validation images per class")
    return DataSet(os.path.abspath(root), classes, splits)


def _interpolation(preprocess: dict):
    return transforms.InterpolationMode(preprocess["interpolation"])


def eval_transform(preprocess: Optional[dict] = None) -> transforms.Compose:
    """Resize + CenterCrop + normalisation of ``preprocess`` (the backbone's; default: the
    protocol's ``Resize(256)``, ``CenterCrop(224)``, ImageNet mean and std)."""
    pp = PREPROCESS if preprocess is None else preprocess
    return transforms.Compose([
        transforms.Resize(pp["resize"], interpolation=_interpolation(pp)),
        transforms.CenterCrop(pp["crop"]),
        transforms.ToTensor(),
        transforms.Normalize(pp["mean"], pp["std"]),
    ])


def train_transform(preprocess: Optional[dict] = None) -> transforms.Compose:
    """RandomResizedCrop + RandomHorizontalFlip + normalisation (the protocol's train transform, at
    the backbone's crop size, interpolation, mean and std)."""
    pp = PREPROCESS if preprocess is None else preprocess
    return transforms.Compose([
        transforms.RandomResizedCrop(
            pp["crop"], scale=pp["train_scale"], ratio=pp["train_ratio"], interpolation=_interpolation(pp),
        ),
        transforms.RandomHorizontalFlip(pp["hflip"]),
        transforms.ToTensor(),
        transforms.Normalize(pp["mean"], pp["std"]),
    ])


def describe_transforms(views: int, draft: bool, preprocess: Optional[dict] = None) -> dict:
    """A JSON-able description of everything that shapes the backbone's input."""
    pp = PREPROCESS if preprocess is None else preprocess
    desc = {
        "preprocess": {k: list(v) if isinstance(v, tuple) else v for k, v in pp.items()},
        "eval": repr(eval_transform(pp)),
        "draft_jpeg_min_side": pp["resize"] if draft else None,
        "rgb": "palette/alpha composited on white; 16-bit rescaled; EXIF orientation applied",
    }
    if views:
        desc["views"] = {"count": views, "train": repr(train_transform(pp))}
    return desc


# What the tensor decode path is, for the cache's settings (it changes feature values slightly).
TENSOR_DECODE = ("torchvision.io.decode_jpeg (RGB, EXIF orientation applied, full resolution) of baseline "
                 "RGB/greyscale JPEGs, then tensor Resize (bilinear, antialiased) + CenterCrop + Normalize; "
                 "other files through PIL")


def decode_jpegs(blobs: Sequence[bytes], device: torch.device) -> List[torch.Tensor]:
    """JPEG files' bytes as upright RGB uint8 tensors (3, H, W) on ``device``, decoded there
    (``torchvision.io.decode_jpeg``: nvJPEG on CUDA, libjpeg-turbo on CPU), in one batched call."""
    from torchvision.io import ImageReadMode, decode_jpeg

    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    with warnings.catch_warnings():  # torchvision 0.29 points at TorchCodec on every call
        warnings.simplefilter("ignore", DeprecationWarning)
        out = decode_jpeg(data, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
    return list(out) if isinstance(out, (list, tuple)) else [out]


def tensor_eval_transform(image: torch.Tensor, preprocess: Optional[dict] = None) -> torch.Tensor:
    """The eval transform on a decoded uint8 tensor (3, H, W), on its device: Resize (antialiased,
    rounded to uint8 like PIL) + CenterCrop + ToTensor scaling + Normalize of ``preprocess``."""
    from torchvision.transforms import functional as TF

    pp = PREPROCESS if preprocess is None else preprocess
    image = TF.resize(image, [pp["resize"]], interpolation=_interpolation(pp), antialias=True)
    image = TF.center_crop(image, [pp["crop"]])
    return TF.normalize(image.float().div_(255), pp["mean"], pp["std"])


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with torch's CPU generator seeded by ``seed``, then restore its state.

    Only the CPU generator: ``torch.manual_seed`` would also reseed every CUDA generator
    (``torch.cuda.manual_seed_all``), and ``fork_rng(devices=[])`` restores the CPU one only,
    so a caller's CUDA random streams would be reset. Transforms and module init draw from
    the CPU generator.
    """
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(int(seed))
        yield


def view_seed(seed: int, relpath: str, k: int) -> int:
    """Seed of augmented view k of one image: fixed by path, independent of order or sharding."""
    return zlib.crc32(f"{seed}:{k}:{relpath}".encode("utf-8"))


class ImageDataset(torch.utils.data.Dataset):
    """(tensor, label) pairs for training; ``items`` must already be decodable."""

    def __init__(self, root: str, items: Sequence[Item], transform):
        self.root = root
        self.items = list(items)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        item = self.items[index]
        image = load_image(os.path.join(self.root, item.relpath))
        return self.transform(image), item.label


class ExtractionDataset(torch.utils.data.Dataset):
    """Images for feature extraction, never raising on a bad file.

    Each sample is a dict: ``image`` (3, crop, crop), ``views`` (K, 3, crop, crop), ``index``,
    ``sha1`` of the file bytes, ``error`` ("" when decoding worked).
    """

    def __init__(self, root: str, relpaths: Sequence[str], views: int = 0, seed: int = 0,
                 draft: bool = True, raw_jpeg: bool = False, preprocess: Optional[dict] = None):
        self.root = root
        # raw_jpeg: JPEGs the tensor path can decode come back undecoded, as ``jpeg`` bytes (the
        # caller decodes them on its device); every other file is decoded here, through PIL.
        self.raw_jpeg = raw_jpeg and not views
        self.relpaths = list(relpaths)
        self.views = views
        self.seed = seed
        self.preprocess = PREPROCESS if preprocess is None else preprocess
        # Augmented crops may zoom into a small region, so they need the full resolution.
        self.draft_size = self.preprocess["resize"] if draft and not views else None
        self.eval_tf = eval_transform(self.preprocess)
        self.train_tf = train_transform(self.preprocess) if views else None

    def __len__(self) -> int:
        return len(self.relpaths)

    def __getitem__(self, index: int) -> dict:
        relpath = self.relpaths[index]
        crop = self.preprocess["crop"]
        sample = {"index": index, "sha1": "", "error": ""}
        if self.raw_jpeg:
            sample["jpeg"] = b""
        image = torch.zeros(3, crop, crop)
        views = torch.zeros(self.views, 3, crop, crop)
        try:
            with open(os.path.join(self.root, relpath), "rb") as fh:
                data = fh.read()
            sample["sha1"] = hashlib.sha1(data).hexdigest()
            if not data:
                raise ValueError("empty file (0 bytes)")
            if self.raw_jpeg and tensor_decodable(data):
                sample.update(jpeg=data, image=image, views=views)
                return sample
            pil = decode_image(data, self.draft_size)
            image = self.eval_tf(pil)
            for k in range(self.views):
                with seeded(view_seed(self.seed, relpath, k)):
                    views[k] = self.train_tf(pil)
        except Exception as exc:  # a bad image is data, not a crash: report and move on
            sample["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        sample["image"] = image
        sample["views"] = views
        return sample
