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
from .data import seeded
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
    "supported_precision",
    "native_bf16",
    "cpu_features",
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


# Environment override of the CPU's native-bf16 detection: "1" or "0" (the tests pin it to 0, so
# that `auto` means fp32 on every test machine, subprocesses included).
NATIVE_BF16_ENV = "PIPELINE_NATIVE_BF16"
# CPU flags (Linux /proc/cpuinfo and torch.cpu.get_capabilities() names) of native bf16 compute:
# AVX512-BF16 / AMX-BF16 on x86, the BF16 extension on Arm.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")


def cpu_features() -> frozenset:
    """The CPU's feature flags: torch's cpuinfo view where available, else ``/proc/cpuinfo``."""
    get = getattr(getattr(torch, "cpu", None), "get_capabilities", None)
    if get is not None:
        try:
            return frozenset(name for name, value in get().items() if value is True)
        except Exception:  # an exotic platform cpuinfo cannot read: fall back to the kernel's view
            pass
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively, so that bf16 autocast is faster than fp32.

    CPU: the AVX512-BF16 or AMX-BF16 instructions (x86) or BF16 (Arm). oneDNN's own check
    (``torch.ops.mkldnn._is_mkldnn_bf16_supported``) is not used: it answers True on every
    AVX-512 CPU, where bf16 is emulated and slower than fp32. CUDA: compute capability 8.0 or
    higher of that very device (``torch.cuda.is_bf16_supported()`` reads the current device and,
    by default, counts emulation: True on sm75 cards, which have no bf16 convolution).
    """
    if device.type == "cuda":
        if torch.version.hip:
            return True
        return tuple(torch.cuda.get_device_capability(device)) >= (8, 0)
    if device.type == "cpu":
        forced = os.environ.get(NATIVE_BF16_ENV, "").strip()
        if forced in ("0", "1"):
            return forced == "1"
        return any(flag in cpu_features() for flag in CPU_BF16_FLAGS)
    return False


def _check_precision(spec: str) -> None:
    if spec not in PRECISIONS:
        raise UserError(f"--precision {spec!r} is not recognised; use one of {', '.join(PRECISIONS)}")


def choose_precision(spec: str, device: torch.device) -> str:
    """The precision to compute in on ``device``.

    ``auto``: bf16 where the device computes it natively (a CUDA GPU of compute capability 8.0
    or higher, a CPU with AVX512-BF16/AMX-BF16), else fp16 on CUDA and fp32 on CPU. An explicit
    ``bf16`` on a CUDA GPU without native bf16 is a user error (cuDNN has no bf16 convolution
    there); on such a CPU it runs, emulated and slower than fp32, with a warning.
    """
    _check_precision(spec)
    native = native_bf16(device) if spec in ("auto", "bf16") else False
    if spec == "auto":
        if native:
            return "bf16"
        return "fp16" if device.type == "cuda" else "fp32"
    if spec == "bf16" and not native:
        if device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(device)
            raise UserError(f"--precision bf16: {device} ({torch.cuda.get_device_name(device)}, compute capability "
                            f"{major}.{minor}) has no native bf16; use --precision fp16 or auto")
        log.warning("--precision bf16 on %s: this CPU has no native bf16 (%s), so it is emulated and "
                    "slower than fp32", device, "/".join(CPU_BF16_FLAGS[:2]))
    return spec


def supported_precision(precision: str, device: torch.device) -> str:
    """``precision`` where ``device`` runs it natively, else what ``auto`` picks there.

    For results made elsewhere (a head whose features were computed in bf16 on an A100 and
    is used on a T4 or a CPU): the features then differ slightly from the head's, which the
    caller says.
    """
    _check_precision(precision)
    if precision in ("auto", "fp32"):
        return choose_precision(precision, device)
    if precision == "bf16" and native_bf16(device):
        return precision
    if precision == "fp16" and device.type == "cuda":
        return precision
    return choose_precision("auto", device)


def autocast(device: torch.device, precision: str):
    """Autocast context for bf16/fp16; a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])
