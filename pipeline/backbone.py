"""ResNet18 construction, weights resolution, device and precision choice."""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Dict, Optional

import torch
from torch import nn
from torchvision.models import ResNet18_Weights, resnet18

from .config import PRECISIONS
from .errors import UserError
from .records import WeightsRef

__all__ = [
    "BACKBONE",
    "Weights",
    "resolve_weights",
    "imagenet_cache_file",
    "build_model",
    "feature_extractor",
    "choose_device",
    "choose_precision",
    "autocast",
    "state_dict_sha256",
]

log = logging.getLogger(__name__)

BACKBONE = "resnet18"
WEIGHT_CHOICES = "imagenet, random, or the path of a state_dict file"
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


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
    # Accept a bare state_dict or a checkpoint that wraps one (this project's best.pt).
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
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
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


def choose_device(spec: str) -> torch.device:
    """``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or (spec.startswith("cuda:") and spec[5:].isdigit()):
        if not torch.cuda.is_available():
            raise UserError(f"--device {spec!r}: no CUDA GPU is available here; use --device cpu or auto")
        index = int(spec[5:]) if ":" in spec else 0
        if index >= torch.cuda.device_count():
            raise UserError(
                f"--device {spec!r}: only {torch.cuda.device_count()} GPU(s) here; use cuda:0..."
                f"{torch.cuda.device_count() - 1} or auto"
            )
        return torch.device("cuda", index)
    raise UserError(f"--device {spec!r} is not recognised; use auto, cpu, cuda or cuda:N")


def choose_precision(spec: str, device: torch.device) -> str:
    """``auto``: fp32 on CPU, bf16 on a CUDA GPU that supports it (else fp16)."""
    if spec not in PRECISIONS:
        raise UserError(f"--precision {spec!r} is not recognised; use one of {', '.join(PRECISIONS)}")
    if spec != "auto":
        return spec
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def autocast(device: torch.device, precision: str):
    """Autocast context for bf16/fp16; a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])
