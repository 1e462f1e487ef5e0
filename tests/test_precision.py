"""--precision auto fits the hardware: native bf16 on CPU and CUDA, detected both ways by monkeypatching."""
from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import torch

from pipeline import backbones
from pipeline import cli
from pipeline.features import stage as features
from pipeline.export import predict
from pipeline.config import FeaturesConfig, PredictConfig
from pipeline.errors import UserError

from .conftest import make_dataset

CPU = torch.device("cpu")


@pytest.fixture
def detect(monkeypatch):
    """Detection from the (patched) CPU flags, not from the tests' pinned environment."""
    monkeypatch.delenv(backbones.NATIVE_BF16_ENV, raising=False)

    def flags(*names):
        monkeypatch.setattr(backbones.device, "cpu_features", lambda: frozenset(names))

    return flags


@pytest.mark.parametrize("flags, expected", [
    (("avx512f", "avx512bw", "avx512_bf16"), "bf16"),  # e.g. AMD Zen 4, Intel Cooper Lake
    (("avx512f", "amx_tile", "amx_bf16"), "bf16"),  # Intel Sapphire Rapids
    (("fp", "asimd", "bf16"), "bf16"),  # Arm with the BF16 extension (Graviton 3)
    (("avx512f", "avx512bw", "avx512_vnni"), "fp32"),  # AVX-512 without bf16: emulated, slow
    (("sse4_2", "avx2", "fma"), "fp32"),
    ((), "fp32"),
])
def test_auto_on_cpu_picks_bf16_only_where_it_is_native(detect, flags, expected):
    detect(*flags)
    assert backbones.choose_precision("auto", CPU) == expected


def test_cpu_features_reads_the_real_machine():
    flags = backbones.cpu_features()
    assert isinstance(flags, frozenset)
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
        text = fh.read()
    for flag in ("avx512_bf16", "amx_bf16"):
        if f" {flag}" in text:  # what the kernel says, torch's cpuinfo agrees with
            assert flag in flags


def test_environment_overrides_the_detection(detect, monkeypatch):
    detect("avx512_bf16")
    monkeypatch.setenv(backbones.NATIVE_BF16_ENV, "0")
    assert backbones.choose_precision("auto", CPU) == "fp32"
    detect()
    monkeypatch.setenv(backbones.NATIVE_BF16_ENV, "1")
    assert backbones.choose_precision("auto", CPU) == "bf16"


def test_explicit_precisions_on_cpu_are_kept(detect, caplog):
    detect("avx2")
    with caplog.at_level(logging.WARNING, logger="pipeline.backbone"):
        assert backbones.choose_precision("bf16", CPU) == "bf16"  # emulated, but it runs
    assert "emulated" in caplog.text
    assert backbones.choose_precision("fp32", CPU) == "fp32"
    with pytest.raises(UserError, match="fp8"):
        backbones.choose_precision("fp8", CPU)


@pytest.fixture
def gpus(monkeypatch):
    """Two fake CUDA devices: cuda:0 an A100 (8.0), cuda:1 a T4 (7.5). The current device is 0."""
    caps = {0: (8, 0), 1: (7, 5)}
    names = {0: "NVIDIA A100", 1: "Tesla T4"}
    index = lambda d: 0 if d is None else (d.index if isinstance(d, torch.device) else int(d))  # noqa: E731
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: caps[index(d)])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: names[index(d)])
    # What the old check read: the current device, counting emulation (True on a T4).
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    return torch.device("cuda", 0), torch.device("cuda", 1)


def test_auto_on_cuda_reads_the_device_passed_not_the_current_one(gpus):
    a100, t4 = gpus
    assert backbones.choose_precision("auto", a100) == "bf16"
    assert backbones.choose_precision("auto", t4) == "fp16"


def test_explicit_bf16_on_a_gpu_without_native_bf16_is_a_user_error(gpus):
    a100, t4 = gpus
    assert backbones.choose_precision("bf16", a100) == "bf16"
    with pytest.raises(UserError, match=r"cuda:1 \(Tesla T4, compute capability 7.5\) has no native bf16; use "
                                        r"--precision fp16 or auto"):
        backbones.choose_precision("bf16", t4)
    assert backbones.choose_precision("fp16", t4) == "fp16"


def test_results_made_elsewhere_get_what_this_device_supports(gpus, detect):
    a100, t4 = gpus
    detect("avx2")
    assert backbones.supported_precision("bf16", a100) == "bf16"
    assert backbones.supported_precision("bf16", t4) == "fp16"
    assert backbones.supported_precision("bf16", CPU) == "fp32"
    assert backbones.supported_precision("fp16", CPU) == "fp32"
    assert backbones.supported_precision("fp32", t4) == "fp32"
    detect("avx512_bf16")
    assert backbones.supported_precision("bf16", CPU) == "bf16"
    assert backbones.supported_precision("fp16", CPU) == "bf16"


def test_the_cache_key_includes_the_precision_auto_resolves_to(detect, small_images, tmp_path):
    data = make_dataset(tmp_path / "data", n_train=1, n_val=1)
    cfg = FeaturesConfig(data=str(data), cache=str(tmp_path / "c"), weights="random", device="cpu")
    detect("avx512_bf16")
    native = features.resolve(cfg)
    detect("avx2")
    emulated = features.resolve(cfg)
    assert (native.precision, emulated.precision) == ("bf16", "fp32")
    assert native.path != emulated.path
    assert native.path == features.resolve(replace(cfg, precision="bf16")).path


def test_predict_with_a_head_made_in_bf16_on_a_device_without_it(small_images, tmp_path, detect, caplog):
    data = make_dataset(tmp_path / "data", n_train=5, n_val=2)
    common = ["--data", str(data), "--cache", str(tmp_path / "c"), "--weights", "random", "--device", "cpu"]
    detect("avx512_bf16")  # made where bf16 is native ...
    assert cli.main(["features", *common, "--workers", "0", "--no-progress"]) == 0
    assert cli.main(["heads", *common, "--heads", "logistic"]) == 0
    detect("avx2")  # ... used where it is not
    with caplog.at_level(logging.WARNING, logger="pipeline.predict"):
        result = predict.run(PredictConfig(head="logistic", inputs=(str(data / "val"),), cache=str(tmp_path / "c"),
                                           device="cpu"))
    assert len(result.predictions) == 4 and not result.skipped
    assert "fitted on bf16 features" in caplog.text and "computing fp32 features instead" in caplog.text
