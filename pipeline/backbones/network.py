"""ResNet18 construction and weights resolution."""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Dict, Optional

import torch
from torch import nn
from torchvision.models import ResNet18_Weights, resnet18

from ..data.imagefolder import seeded
from ..errors import UserError
from ..records import WeightsRef

__all__ = [
    "BACKBONE",
    "Weights",
    "resolve_weights",
    "imagenet_cache_file",
    "build_model",
    "feature_extractor",
    "state_dict_sha256",
]

log = logging.getLogger(__name__)

BACKBONE = "resnet18"
WEIGHT_CHOICES = "imagenet, random, or the path of a state_dict file"


@dataclass(frozen=True)
class Weights:
    """Resolved backbone weights: the state_dict and its structured provenance ``ref``.

    ``id`` names the source (``imagenet``, ``random-seed0``, ``file:best.pt``); ``pretrained``
    is False for random init, whose results are labelled "not pretrained" everywhere.
    """

    ref: WeightsRef
    state_dict: Dict[str, torch.Tensor]
    spec: str

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


def imagenet_cache_file() -> str:
    """Where torch's hub cache keeps torchvision's ImageNet ResNet18 weights."""
    url = ResNet18_Weights.IMAGENET1K_V1.url
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))


def _imagenet_state_dict() -> Dict[str, torch.Tensor]:
    target = imagenet_cache_file()
    if os.path.isfile(target):
        return torch.load(target, map_location="cpu", weights_only=True)
    try:
        return ResNet18_Weights.IMAGENET1K_V1.get_state_dict(progress=True, check_hash=True)
    except Exception as exc:  # offline, proxy, DNS: the user's fix is the same
        raise UserError(
            f"ImageNet weights are not cached at {target} and could not be downloaded "
            f"({type(exc).__name__}); copy resnet18-f37072fd.pth there (or set TORCH_HOME), "
            "or use --weights random (not pretrained) or --weights PATH (a state_dict file)"
        ) from None


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


def resolve_weights(spec: str, seed: int = 0) -> Weights:
    """Turn ``imagenet``, ``random`` or a file path into a state_dict with provenance."""
    if spec == "imagenet":
        sd = _imagenet_state_dict()
    elif spec == "random":
        with seeded(seed):  # the CPU generator only: a caller's CUDA generators are left alone
            sd = resnet18(weights=None).state_dict()
    elif spec and (os.sep in spec or os.path.splitext(spec)[1] or os.path.exists(spec)):
        sd = _file_state_dict(spec)
    else:
        raise UserError(f"--weights {spec!r} is not recognised; use {WEIGHT_CHOICES}")
    return Weights(WeightsRef.from_spec(spec, state_dict_sha256(sd), seed), sd, spec)


def build_model(weights: Optional[Weights], num_classes: Optional[int] = None) -> nn.Module:
    """ResNet18 with the given backbone weights.

    ``num_classes=None`` gives the feature extractor (``fc`` is the identity, so the output
    is the 512-d global-average-pooled pre-logits); otherwise a fresh ``fc`` of that size,
    unless the weights carry an ``fc`` of exactly that shape.
    """
    model = resnet18(weights=None)
    if weights is not None:
        sd = dict(weights.state_dict)
        fc_keys = [k for k in sd if k.startswith("fc.")]
        keep_fc = num_classes is not None and sd.get("fc.weight", torch.empty(0)).shape[:1] == (num_classes,)
        if not keep_fc:
            for k in fc_keys:
                sd.pop(k)
        if num_classes is not None and not keep_fc:
            model.fc = nn.Linear(model.fc.in_features, num_classes)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        bad = [k for k in missing if not k.startswith("fc.")] + list(unexpected)
        if bad:
            raise UserError(
                f"weights {weights.id!r} do not fit ResNet18 (mismatched keys, e.g. {bad[:3]}); "
                f"use {WEIGHT_CHOICES}"
            )
    elif num_classes is not None:
        model.fc = nn.Linear(model.fc.in_features, num_classes)
    if num_classes is None:
        model.fc = nn.Identity()
    return model


def feature_extractor(weights: Weights, device: torch.device, channels_last: bool = True) -> nn.Module:
    """The frozen backbone in eval mode, on ``device``, ready for inference."""
    model = build_model(weights).eval().requires_grad_(False).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model
