"""Issue 22: the GPU paths, round two, without a GPU (arch list, capability, cgroup files, device count patched)."""
from __future__ import annotations

import threading
import types
import warnings

import pytest
import torch

from pipeline import backbones
from pipeline.backbones import device as devices
from pipeline.errors import UserError
from pipeline.features import extraction

CUDA = torch.device("cuda", 0)


# --------------------------------------------------------------------------- 1. TF32 off, guarded and thread-safe


def _tf32_state():
    conv = torch.backends.cudnn.conv
    return conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision


def test_exact_fp32_falls_back_to_allow_tf32_on_torch_before_2_9(monkeypatch):
    # torch <= 2.8 has no cudnn.conv.fp32_precision: the allow_tf32 switches are used instead
    monkeypatch.setattr(torch.backends.cudnn, "conv", types.SimpleNamespace(), raising=False)
    flags = types.SimpleNamespace(allow_tf32=True)
    monkeypatch.setattr(torch.backends.cuda, "matmul", flags)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    with extraction.exact_fp32(CUDA, "fp32"):
        assert (torch.backends.cudnn.allow_tf32, flags.allow_tf32) == (False, False)
    assert (torch.backends.cudnn.allow_tf32, flags.allow_tf32) == (True, True)


def test_exact_fp32_in_two_threads_restores_tf32_after_the_last_one():
    before = _tf32_state()
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def first():
        with extraction.exact_fp32(CUDA, "fp32"):
            a_in.set()
            b_in.wait(5)
        a_out.set()

    def second():
        a_in.wait(5)
        with extraction.exact_fp32(CUDA, "fp32"):
            b_in.set()
            a_out.wait(5)
            seen["after_first_left"] = _tf32_state()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen["after_first_left"] == ("ieee", "ieee")  # the other thread still runs in IEEE fp32
    assert _tf32_state() == before  # and nothing is left switched for good


# --------------------------------------------------------------------------- 3. a GPU this torch has no kernels for


@pytest.mark.parametrize("capability, arch_list, expected", [
    ((7, 0), ["sm_75", "sm_80", "sm_86", "sm_90"], False),  # V100 under a wheel built for sm75+
    ((6, 0), ["sm_75", "sm_80"], False),  # P100
    ((8, 6), ["sm_80", "sm_90"], True),  # sm_80 cubin runs on sm_86
    ((8, 0), ["sm_86"], False),  # a newer minor does not run on an older one
    ((12, 0), ["sm_90", "compute_90"], True),  # PTX is compiled by the driver for newer GPUs
    ((7, 5), [], True),  # a build that does not say
])
def test_has_kernels_reads_the_arch_list(capability, arch_list, expected):
    assert backbones.has_kernels(capability, arch_list) is expected


@pytest.fixture
def v100(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_75", "sm_80", "sm_90"])
    monkeypatch.setattr(torch.version, "hip", None)


def test_auto_on_a_gpu_without_kernels_runs_on_the_cpu_with_a_warning(v100):
    with pytest.warns(UserWarning, match=r"Tesla V100 \(compute capability 7.0\) has no kernels.*running on the CPU"):
        assert backbones.choose_device("auto") == torch.device("cpu")


@pytest.mark.parametrize("spec", ["cuda", "cuda:1"])
def test_explicit_cuda_without_kernels_is_one_line_user_error(v100, spec):
    with pytest.raises(UserError, match=r"has no kernels in this torch .*built for sm_75 sm_80 sm_90.*--device cpu") \
            as info:
        backbones.choose_device(spec)
    assert "\n" not in str(info.value)


def test_auto_on_a_gpu_with_kernels_picks_it(v100, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backbones.choose_device("auto") == torch.device("cuda")
