"""A rerun of `features` on an unchanged data set: answered from the stamp, without torch; any
change to the data set, the cache or the request falls through to the full check."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline import cli
from pipeline.features import stage as features, uptodate

from .conftest import SMALL_PREPROCESS, make_dataset, make_image

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def project(tmp_path, small_images):
    data = make_dataset(tmp_path / "data", n_train=2, n_val=1)
    args = ["features", "--data", str(data), "--cache", str(tmp_path / "c"), "--weights", "random",
            "--device", "cpu", "--workers", "0", "--no-progress"]
    assert cli.main(args) == 0
    return data, args


@pytest.fixture
def full_runs(monkeypatch):
    """Counts the full runs of the stage (the path that imports torch and reads the cache)."""
    calls = []
    real = features.run

    def counted(cfg):
        calls.append(cfg)
        return real(cfg)

    monkeypatch.setattr(features, "run", counted)
    return calls


def test_an_unchanged_rerun_prints_the_same_summary_without_the_full_run(project, full_runs, capsys):
    _, args = project
    capsys.readouterr()
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert not full_runs
    assert "up to date" in out and "no forward pass" in out and "not pretrained" in out
    assert "train 4, val 2" in out


def test_the_no_op_command_does_not_import_torch(project):
    _, args = project
    code = ("import sys; from pipeline import cli, config; config.PREPROCESS.update(%r); rc = cli.main(%r); "
            "print('torch' in sys.modules, 'h5py' in sys.modules, rc)" % (SMALL_PREPROCESS, args))
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "False False 0", out.stderr


def test_any_change_falls_through_to_the_full_check(project, full_runs, capsys):
    data, args = project
    cache = Path(args[4])
    for change, still_up_to_date in (("touch", True), ("new_file", True), ("new_image", False),
                                     ("rebuild", False), ("rewritten_cache", True)):
        run_args = args
        if change == "touch":  # touched, same bytes: the full check re-hashes and finds it unchanged
            os.utime(data / "train" / "ants" / "img_000.jpg")
        elif change == "new_file":
            (data / "val" / "bees" / "notes.txt").write_text("not an image")
        elif change == "new_image":
            make_image(data / "train" / "bees" / "new.jpg", 1, np.random.default_rng(1))
        elif change == "rewritten_cache":
            os.utime(next((cache / "features").glob("*.h5")), ns=(1, 1))
        else:
            run_args = args + ["--rebuild"]
        full_runs.clear()
        capsys.readouterr()
        assert cli.main(run_args) == 0
        assert len(full_runs) == 1, change
        assert ("up to date" in capsys.readouterr().out) == still_up_to_date, change
    full_runs.clear()
    assert cli.main(args) == 0 and not full_runs  # the full run stamped its result: quick again
    assert cli.main(args + ["--seed", "1"]) == 0 and len(full_runs) == 1  # another request


def test_no_stamp_when_the_data_changed_during_the_run(tmp_path, small_images, monkeypatch, capsys):
    data = make_dataset(tmp_path / "data", n_train=2, n_val=1)
    args = ["features", "--data", str(data), "--cache", str(tmp_path / "c"), "--weights", "random",
            "--device", "cpu", "--workers", "0", "--no-progress"]
    real = features.run

    def racing(cfg):
        result = real(cfg)
        make_image(data / "train" / "ants" / "img_000.jpg", 1, np.random.default_rng(7))
        return result

    monkeypatch.setattr(features, "run", racing)
    assert cli.main(args) == 0
    assert not os.path.exists(uptodate.stamp_file(str(tmp_path / "c")))


def test_heads_straight_after_features_pays_no_second_check_and_no_torch(project, tmp_path):
    data, args = project
    heads = ["heads", "--data", str(data), "--cache", args[4], "--weights", "random", "--device", "cpu",
             "--heads", "ridge", "--cv-folds", "2"]
    code = ("import sys; from pipeline import cli, config; config.PREPROCESS.update(%r); rc = cli.main(%r); "
            "print('torch' in sys.modules, rc)" % (SMALL_PREPROCESS, heads))
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=300)
    assert out.stdout.strip().splitlines()[-1] == "False 0", out.stderr[-2000:]
