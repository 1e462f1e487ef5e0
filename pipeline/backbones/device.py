"""Device and precision choice: which device runs the network, and at which precision."""
from __future__ import annotations

import contextlib
import logging
import os

import torch

from ..config import PRECISIONS
from ..errors import UserError

__all__ = ["choose_device", "choose_precision", "supported_precision", "native_bf16", "cpu_features", "autocast",
           "NATIVE_BF16_ENV"]

log = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


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
