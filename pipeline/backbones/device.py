"""Device and precision choice: which device runs the network, and at which precision."""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings

import torch

from ..config import PRECISIONS
from ..errors import UserError

__all__ = ["choose_device", "choose_precision", "supported_precision", "native_bf16", "cpu_features", "autocast",
           "has_kernels", "ieee_fp32", "NATIVE_BF16_ENV"]

log = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def choose_device(spec: str) -> torch.device:
    """``auto`` (CUDA when present and this torch has kernels for it), ``cpu``, ``cuda`` or ``cuda:N``.

    A GPU the installed torch was not built for (``torch.cuda.get_arch_list()``, e.g. a V100 under
    a wheel built for sm75 and later) would fail at its first convolution with "no kernel image is
    available": ``auto`` then runs on the CPU with a warning, an explicit ``cuda`` is a user error.
    """
    if spec == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        device = torch.device("cuda", 0)
        problem = _missing_kernels(device)
        if problem:
            warnings.warn(f"--device auto: {problem}; running on the CPU (pass --device cpu to silence this, or "
                          "install a torch build for this GPU)", UserWarning, stacklevel=2)
            return torch.device("cpu")
        return torch.device("cuda")
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
        problem = _missing_kernels(torch.device("cuda", index))
        if problem:
            raise UserError(f"--device {spec!r}: {problem}; install a torch build for this GPU or use --device cpu")
        return torch.device("cuda", index)
    raise UserError(f"--device {spec!r} is not recognised; use auto, cpu, cuda or cuda:N")


def has_kernels(capability, arch_list) -> bool:
    """Whether a torch built for ``arch_list`` (``torch.cuda.get_arch_list()``) runs on ``capability``.

    A cubin ``sm_XY`` runs on devices of the same major version and a minor at least Y; PTX
    (``compute_XY``) is compiled by the driver for any device of capability at least X.Y. An
    empty list (a build that does not say) counts as supported.
    """
    major, minor = int(capability[0]), int(capability[1])
    if not arch_list:
        return True
    for arch in arch_list:
        kind, _, number = arch.partition("_")
        digits = "".join(ch for ch in number if ch.isdigit())
        if len(digits) < 2:
            continue
        a_major, a_minor = int(digits[:-1]), int(digits[-1])
        if kind == "sm" and a_major == major and a_minor <= minor:
            return True
        if kind == "compute" and (a_major, a_minor) <= (major, minor):
            return True
    return False


def _missing_kernels(device: torch.device) -> str:
    """Empty when this torch has kernels for ``device``, else why not (one clause)."""
    if torch.version.hip:
        return ""
    capability = tuple(torch.cuda.get_device_capability(device))
    arch_list = list(torch.cuda.get_arch_list())
    if has_kernels(capability, arch_list):
        return ""
    return (f"{torch.cuda.get_device_name(device)} (compute capability {capability[0]}.{capability[1]}) has no "
            f"kernels in this torch {torch.__version__} (built for {' '.join(arch_list)})")


# ----------------------------------------------------------------------- IEEE fp32 on CUDA

# TF32 is a process-wide setting. Threads (``transform`` called concurrently, a server) share it,
# so it is turned off by the first block that enters and restored by the last that leaves.
_TF32_LOCK = threading.Lock()
_TF32_STATE = {"depth": 0, "saved": None}


def _tf32_flags():
    """(read, write) of the TF32 switches: the ``fp32_precision`` API of torch >= 2.9, else ``allow_tf32``."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    matmul = torch.backends.cuda.matmul
    if conv is not None and hasattr(conv, "fp32_precision") and hasattr(matmul, "fp32_precision"):
        def read():
            return ("fp32_precision", conv.fp32_precision, matmul.fp32_precision)

        def write(state):
            conv.fp32_precision, matmul.fp32_precision = state[1], state[2]

        return read, write, ("fp32_precision", "ieee", "ieee")

    def read():
        return ("allow_tf32", torch.backends.cudnn.allow_tf32, matmul.allow_tf32)

    def write(state):
        torch.backends.cudnn.allow_tf32, matmul.allow_tf32 = state[1], state[2]

    return read, write, ("allow_tf32", False, False)


@contextlib.contextmanager
def ieee_fp32():
    """TF32 off for CUDA convolutions and matrix products while any such block runs, in any thread.

    The first block to enter saves the settings and turns TF32 off; the last to leave restores
    them, so concurrent blocks never leave TF32 on or off for good.
    """
    read, write, ieee = _tf32_flags()
    with _TF32_LOCK:
        if _TF32_STATE["depth"] == 0:
            _TF32_STATE["saved"] = read()
            write(ieee)
        _TF32_STATE["depth"] += 1
    try:
        yield
    finally:
        with _TF32_LOCK:
            _TF32_STATE["depth"] -= 1
            if _TF32_STATE["depth"] == 0:
                write(_TF32_STATE["saved"])
                _TF32_STATE["saved"] = None


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
