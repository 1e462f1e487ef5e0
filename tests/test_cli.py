"""The command line: user errors are one line and exit 2; help lists every option with its default."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import config
from pipeline.cli import main

REPO = Path(__file__).resolve().parents[1]


def _user_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.parametrize("argv, expected", [
    (["features", "--data", "/no/such/folder", "--weights", "random"], "DATA_DIR"),
    (["features", "--weights", "resnet50"], "imagenet, random"),
    (["features", "--data", "{data}", "--weights", "random", "--device", "tpu"], "auto, cpu, cuda"),
    (["features", "--data", "{data}", "--weights", "random", "--precision", "fp8"], "fp32"),
    (["features", "--data", "{data}", "--weights", "random", "--batch-size", "-3"], ">= 0"),
    (["features", "--batch-size", "many"], "invalid int"),
    (["features", "--no-such-option"], "unrecognized"),
    (["no-such-stage"], "invalid choice"),
    (["info", "/no/such.h5"], "make features"),
])
def test_user_errors_are_one_line_exit_2(capsys, tiny_data, argv, expected):
    argv = [a.replace("{data}", str(tiny_data)) for a in argv]
    assert expected in _user_error(capsys, argv)


def test_imagenet_offline_names_the_expected_file(capsys, tiny_data, tmp_path):
    line = _user_error(capsys, ["features", "--data", str(tiny_data), "--cache", str(tmp_path)])
    assert "resnet18-f37072fd.pth" in line and "--weights random" in line


def test_cuda_without_gpu_is_a_user_error(capsys, tiny_data):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert "no CUDA GPU" in _user_error(capsys, ["features", "--data", str(tiny_data), "--weights", "random",
                                                 "--device", "cuda"])


def test_features_and_info_from_the_command_line(tiny_data, tmp_path):
    cmd = [sys.executable, "-m", "pipeline", "features", "--data", str(tiny_data), "--cache", str(tmp_path),
           "--weights", "random", "--no-progress"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "train 12, val 8" in out.stdout and "not pretrained" in out.stdout
    cache = next((tmp_path / "features").glob("*.h5"))
    info = subprocess.run([sys.executable, "-m", "pipeline", "info", str(cache)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert info.returncode == 0 and "random-seed0" in info.stdout and "train" in info.stdout
    bad = subprocess.run([sys.executable, "-m", "pipeline", "features", "--data", str(tmp_path / "nope"),
                          "--weights", "random"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_help_lists_options_with_defaults(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["features", "--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for option in ("--data", "--cache", "--weights", "--device", "--precision", "--seed", "--batch-size",
                   "--workers", "--views", "--strict", "--rebuild"):
        assert option in out
    assert "default: imagenet" in out


@pytest.mark.parametrize("stage", ["features", "info", "heads", "finetune", "compare", "predict"])
def test_every_stage_has_its_parser(capsys, stage):
    with pytest.raises(SystemExit) as exc:
        main([stage, "--help"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: python -m pipeline {stage}")


@pytest.mark.parametrize("argv, choices", [
    (["heads", "--format", "pickle"], config.HEAD_FORMATS),
    (["predict", "--head", "x", "--format", "xml", "img.jpg"], config.PREDICT_FORMATS),
])
def test_choices_come_from_the_config(capsys, argv, choices):
    line = _user_error(capsys, argv)
    assert "invalid choice" in line and all(repr(c) in line for c in choices)
