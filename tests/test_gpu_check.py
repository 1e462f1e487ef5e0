"""bench/gpu_check.py --dry-run: the GPU check's whole code path on CPU with tiny sizes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # about 30 s of CPU (2 minutes on the loaded 2-core machine): torchrun, 5 short trainings
def test_gpu_check_dry_run_prints_every_row_and_passes(tmp_path):
    out = tmp_path / "report.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--dry-run", "--json", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    checks = [r["check"] for r in report["rows"]]
    low = report["low_precision"]
    # issue 22: every row runs in a dry run, at tiny sizes
    assert checks == [
        "extraction fp32, steady state", f"extraction {low}, steady state", f"extraction {low}, --decode gpu, steady state",
        f"{low} vs fp32 features",
        "2 ranks vs 1 rank, fp32 (tensor all_reduce over gloo; object collectives over gloo)",
        checks[5],
        "fine-tune fp16 + GradScaler, 1 epoch", "resume 1+1 vs 2 straight epochs (deterministic algorithms)",
        checks[8]]
    assert checks[8].startswith("2")  # the 2-GPU DistributedDataParallel epoch (gloo on CPU in a dry run)
    assert checks[5].startswith("fine-tune epoch 2 (") and checks[5].endswith(", batch 4)")
    assert all(r["ok"] for r in report["rows"]) and report["environment"]["device"] == "cpu"
    rows = {r["check"].split(",")[0]: r for r in report["rows"]}
    assert rows["resume 1+1 vs 2 straight epochs (deterministic algorithms)"]["max_abs_diff"] == 0.0
    assert rows["fine-tune fp16 + GradScaler"]["scaled_steps"] >= 3  # 12 train images, batch 4
    for r in report["rows"][:3]:  # steady state: timed after warm-up, against both floors
        assert r["timed_images"] > 0 and r["floor_images_per_s"] <= r["bare_images_per_s"]
    for check in checks:
        assert check in proc.stdout


def _gpu_check():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("capability, expected", [((7, 5), "fp16"), ((7, 0), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_gpu_check_low_precision_is_bf16_only_where_native(monkeypatch, capability, expected):
    # issue 22.2: a T4 / RTX 20xx (sm75) has no bf16 convolutions
    import torch

    gpu_check = _gpu_check()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.version, "hip", None)
    assert gpu_check.low_precision(torch.device("cuda", 0)) == expected


@pytest.mark.parametrize("rate, strict, ok", [(80.0, True, True), (79.0, True, False), (1.0, False, True),
                                              (float("nan"), False, False)])
def test_gpu_check_extraction_row_can_fail(rate, strict, ok):
    # issue 22.7: below 0.8x of the decode + forward floor is a failure (outside a dry run)
    row = _gpu_check().extraction_row("x", {"images_per_s": rate, "timed_images": 10, "workers": 2}, 200.0, 100.0,
                                      0.8, strict)
    assert row["ok"] is ok


def test_gpu_check_agreement_is_head_predictions_and_relative_error(tmp_path):
    # issue 22.10: not cosine; a fitted head's predictions and ||a - b|| / ||a||
    import numpy as np

    gpu_check = _gpu_check()
    calls = {}

    def read_split(path, split):
        rng = np.random.default_rng(0 if split == "train" else 1)
        x = rng.normal(size=(40, 8)).astype(np.float32) + 3
        y = (x[:, 0] > 3).astype(np.int64)
        if path == "b":
            x = x * (1 + 0.01 * rng.normal(size=x.shape)).astype(np.float32)
        calls[path] = True
        return x, y, [f"{split}/{i}" for i in range(40)], []

    gpu_check.store.read_split, real = read_split, gpu_check.store.read_split
    try:
        agree = gpu_check.agreement("a", "b")
    finally:
        gpu_check.store.read_split = real
    assert 0.005 < agree["rel_err_median"] < 0.02 and agree["val"] == 40
    assert agree["agreement"] >= 0.9 and agree["changed"] == round((1 - agree["agreement"]) * 40)
