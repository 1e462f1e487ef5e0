"""Reliability: kill anywhere, run twice at once, corrupt every artifact, feed bad input.

Every case checks what DESIGN.md promises: a rerun completes and equals an uninterrupted run;
nothing partial is ever read as complete; damage and bad input stop with one line, exit 2, no
traceback, and lose nothing. Each case is counted in ``tests.faults.FIGURES`` (the README's
reliability table; pytest prints the figures at the end of the session).

The kill and concurrency tests start subprocesses and are marked slow (``make test-all``);
corruption, bad input, full disk, unwritable folders and bad options run in-process in the
fast suite.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
import time
from pathlib import Path
from typing import Dict, List

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import cli, config
from pipeline.features import stage as features, store
from pipeline.finetune import stage as finetune
from pipeline.heads import stage as heads
from pipeline import files as atomic_files  # the one writer of caches, parts, heads, checkpoints and reports
from pipeline.config import FeaturesConfig, FinetuneConfig, HeadsConfig
from tests import faults
from tests.conftest import SMALL_PREPROCESS, make_dataset, make_image, small_project
from tests.faults import KillPoint

SMALL = SMALL_PREPROCESS


pytestmark = pytest.mark.usefixtures("small_images")


def _features_cfg(data, cache, **kw) -> FeaturesConfig:
    kw.setdefault("workers", 0)
    return FeaturesConfig(data=str(data), cache=str(cache), weights="random", device="cpu", progress=False, **kw)


def _finetune_cfg(data, cache, **kw) -> FinetuneConfig:
    kw.setdefault("workers", 0)
    kw.setdefault("epochs", 2)
    kw.setdefault("threads", 1)
    return FinetuneConfig(data=str(data), cache=str(cache), weights="random", device="cpu", progress=False, **kw)


def _read_cache(path: str) -> Dict[str, tuple]:
    out = {}
    for split in ("train", "val"):
        feats, labels, paths, _ = store.read_split(path, split)
        out[split] = (feats, labels.tolist(), paths)
    return out


def _assert_same_cache(path: str, reference: str) -> None:
    got, want = _read_cache(path), _read_cache(reference)
    for split in want:
        assert got[split][2] == want[split][2] and got[split][1] == want[split][1]
        np.testing.assert_allclose(got[split][0], want[split][0], rtol=1e-5, atol=1e-5)
    assert store.read_meta(path)["content_key"] == store.read_meta(reference)["content_key"]


def _one_line_exit_2(capsys, argv: List[str], *expected: str) -> str:
    """``main(argv)`` is a user error: exit 2, one line on stderr, no traceback."""
    code = cli.main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if not line.startswith("warning: ")]
    assert code == 2, err
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


# =============================================================================== shared set-up


_RANDOM_WEIGHTS: dict = {}


@pytest.fixture
def fast_weights(monkeypatch):
    """Resolve each random init once per session (each costs a ResNet18 init and a sha256)."""
    from pipeline import backbones

    memo = _RANDOM_WEIGHTS
    real = backbones.resolve_weights

    def resolve(spec, seed=0, backbone=None):
        if spec != "random":
            return real(spec, seed, backbone)
        if (seed, backbone) not in memo:
            memo[seed, backbone] = real(spec, seed, backbone)
        return memo[seed, backbone]

    monkeypatch.setattr(backbones.network, "resolve_weights", resolve)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A tiny data set with a complete feature cache, heads and a finished fixed-mode run."""
    runs = []
    project = small_project(tmp_path_factory.mktemp("small"), ("logistic", "ridge"), then=lambda data, cache: runs.append(
        finetune.run(_finetune_cfg(data, cache, mode="fixed")).runs[0].path))
    return dict(project, run=Path(runs[0]))


@pytest.fixture
def copy(small, tmp_path):
    """A private copy of ``small``'s cache folder (same file names: same data root)."""
    cache = tmp_path / "cache"
    shutil.copytree(small["cache"], cache)
    features_path = str(cache / os.path.relpath(small["features"], small["cache"]))
    return {"data": small["data"], "cache": cache, "features": features_path, "run": cache / "runs" / "fixed",
            "pristine": small}


def _features_cli(data, cache, *extra) -> List[str]:
    return ["features", "--data", str(data), "--cache", str(cache), "--weights", "random", "--device", "cpu",
            "--workers", "0", "--no-progress", *extra]


def _finetune_cli(data, cache, *extra) -> List[str]:
    return ["finetune", "--data", str(data), "--cache", str(cache), "--weights", "random", "--device", "cpu",
            "--mode", "fixed", "--epochs", "2", "--workers", "0", "--threads", "1", "--no-progress", *extra]


# =============================================================================== corruption


def _truncate(path, keep: float) -> None:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * keep)])


def _garbage(path) -> None:
    Path(path).write_bytes(np.random.default_rng(0).bytes(max(64, os.path.getsize(path))))


def _drop_dataset(path) -> None:
    with h5py.File(path, "r+") as f:
        del f["train/labels"]


def _short_rows(path) -> None:
    with h5py.File(path, "r+") as f:
        f["val/features"].resize((1, 512))


def _foreign(path) -> None:
    os.remove(path)
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=np.zeros(3))


CACHE_CORRUPTIONS = {
    "truncated to half": lambda p: _truncate(p, 0.5),
    "truncated to 99%": lambda p: _truncate(p, 0.99),
    "truncated to its first 100 bytes": lambda p: _truncate(p, 100 / os.path.getsize(p)),
    "zero bytes": lambda p: _truncate(p, 0.0),
    "garbage of the same size": _garbage,
    "a data set deleted": _drop_dataset,
    "rows missing from one data set": _short_rows,
    "another HDF5 file under its name": _foreign,
}


@pytest.mark.parametrize("kind", CACHE_CORRUPTIONS)
def test_damaged_feature_cache_is_one_line_naming_the_file_and_rebuild(kind, copy, capsys, fast_weights):
    with faults.case("corruptions", f"feature cache: {kind}"):
        CACHE_CORRUPTIONS[kind](copy["features"])
        damaged = Path(copy["features"]).read_bytes()
        for argv in (_features_cli(copy["data"], copy["cache"]),
                     ["heads", "--features", copy["features"], "--cache", str(copy["cache"])],
                     ["info", copy["features"]]):
            _one_line_exit_2(capsys, argv, copy["features"], "--rebuild")
        assert Path(copy["features"]).read_bytes() == damaged  # refused, not silently replaced
        if kind in ("truncated to half", "a data set deleted"):  # the fix it names works
            assert cli.main(_features_cli(copy["data"], copy["cache"], "--rebuild")) == 0
            _assert_same_cache(copy["features"], copy["pristine"]["features"])


# --------------------------------------------------------------------------- bit flips inside an intact cache


def flip_in_chunk(path, dataset: str = "val/features", chunk: int = 0) -> None:
    """Flip one bit in the middle of one stored chunk of ``dataset`` (its data, not its checksum)."""
    with h5py.File(path, "r") as f:
        assert f[dataset].fletcher32, "every data set is checksummed"
        info = f[dataset].id.get_chunk_info(chunk)
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset + (info.size - 4) // 2)
        byte = fh.read(1)[0]
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte ^ 0x10]))


@pytest.fixture(scope="module")
def flipped(tmp_path_factory):
    """Features and a head made by the stages, then one bit flipped inside a feature chunk."""
    project = small_project(tmp_path_factory.mktemp("flipped"), ("logistic",))
    flip_in_chunk(project["features"])
    return dict(project, bytes=Path(project["features"]).read_bytes())


def _flipped_commands(flipped, reports) -> Dict[str, List[str]]:
    cache, path = str(flipped["cache"]), flipped["features"]
    return {
        "info": ["info", path],
        "heads": ["heads", "--features", path, "--cache", cache, "--heads", "ridge", "--cv-folds", "2"],
        "compare": ["compare", "--cache", cache, "--reports", str(reports)],
        "predict": ["predict", "--head", "logistic", "--cache", cache, "--device", "cpu",
                    str(flipped["data"] / "val" / "bees")],
    }


CHECKSUM_MESSAGE = ("data set val/features failed its checksum", "--rebuild")


@pytest.mark.parametrize("stage", ["info", "heads", "compare", "predict"])
def test_a_flipped_bit_in_a_feature_chunk_is_one_line_naming_the_file_and_rebuild(stage, flipped, tmp_path,
                                                                                   capsys, fast_weights):
    with faults.case("bit flips (checksums)", f"{stage}: one bit flipped in a val/features chunk"):
        argv = _flipped_commands(flipped, tmp_path / "reports")[stage]
        _one_line_exit_2(capsys, argv, flipped["features"], *CHECKSUM_MESSAGE)
        assert Path(flipped["features"]).read_bytes() == flipped["bytes"]  # refused, not replaced


def test_load_head_evaluate_and_the_transformer_refuse_a_flipped_bit(flipped, fast_weights):
    from pipeline.heads.sklearn_api import ResNet18Features

    with faults.case("bit flips (checksums)", "load_head(...).evaluate and ResNet18Features(cache=...)"):
        head = heads.load_head(flipped["cache"] / "heads" / "logistic.json")
        with pytest.raises(store.DamagedCacheError, match="failed its checksum.*--rebuild"):
            head.evaluate(flipped["features"])
        images = sorted(str(p) for p in (flipped["data"] / "val").rglob("*.jpg"))
        extractor = ResNet18Features(weights="random", device="cpu", precision="fp32", cache=str(flipped["cache"]))
        with pytest.raises(store.DamagedCacheError, match="failed its checksum"):
            extractor.fit(images).transform(images)


@pytest.mark.slow
def test_a_flipped_bit_stops_every_reading_stage_as_a_real_subprocess(flipped, tmp_path):
    for stage, argv in _flipped_commands(flipped, tmp_path / "reports").items():
        with faults.case("bit flips (checksums)", f"{stage} as a subprocess: one bit flipped in a val/features chunk"):
            proc = faults.start(argv, preprocess=SMALL)
            out, err = proc.communicate(timeout=300)
            lines = [line for line in err.strip().splitlines() if not line.startswith("warning: ")]
            assert proc.returncode == 2 and "Traceback" not in err and len(lines) == 1, err
            assert flipped["features"] in lines[0] and all(t in lines[0] for t in CHECKSUM_MESSAGE), lines[0]
    assert Path(flipped["features"]).read_bytes() == flipped["bytes"]


@pytest.mark.parametrize("dataset", ["train/features", "train/labels", "train/paths", "val/sha1", "val/mtime_ns"])
def test_every_data_set_is_checksummed(dataset, copy):
    with faults.case("bit flips (checksums)", f"store: one bit flipped in {dataset}"):
        flip_in_chunk(copy["features"], dataset)
        with pytest.raises(store.DamagedCacheError, match=f"{dataset} failed its checksum"):
            store.verify(copy["features"])
        split, column = dataset.split("/")
        with pytest.raises(store.DamagedCacheError, match=f"{dataset} failed its checksum"):
            if column in ("features", "labels", "paths"):  # what the heads read
                store.read_split(copy["features"], split)
            else:  # what `features` reads to plan an update
                store.read_known_rows(copy["features"], features=False)


def test_a_version_1_cache_is_read_with_a_note(tmp_path, monkeypatch):
    rows = [store.Row(f"train/a/{i}.jpg", f"{i:040x}", 1, 1, np.full(512, i, np.float32)) for i in range(4)]
    splits = {s: store.SplitRows(rows, [0, 1, 0, 1]) for s in ("train", "val")}
    path = str(tmp_path / "v1.h5")
    monkeypatch.setattr(store, "library_versions", lambda *libraries: {})
    with monkeypatch.context() as mp:
        mp.setattr(store, "FORMAT_VERSION", 1)
        store.write_cache(path, {"old": True}, {}, ["a", "b"], splits)
    with pytest.warns(UserWarning, match="format version 1, which stores no checksums"):
        feats, labels, paths, _ = store.read_split(path, "train")
    assert paths == [r.relpath for r in rows] and feats[3, 0] == 3


def _finetune_ok(capsys, copy) -> dict:
    assert cli.main(_finetune_cli(copy["data"], copy["cache"])) == 0, capsys.readouterr().err
    return _json(copy["run"] / "metrics.json")


CHECKPOINT_CORRUPTIONS = {
    "last.pt truncated": ("last.pt", lambda p: _truncate(p, 0.5), True),
    "last.pt garbage": ("last.pt", _garbage, True),
    "model.pt truncated, run complete": ("model.pt", lambda p: _truncate(p, 0.5), True),
    "model.pt deleted": ("model.pt", os.remove, True),
    # A flipped bit in a weight still loads (torch.load checks no checksum): the sha256 catches it.
    "last.pt one bit flipped, run complete": ("last.pt", lambda p: _flip(p), True),
    "model.pt one bit flipped, run complete": ("model.pt", lambda p: _flip(p), True),
}


@pytest.mark.parametrize("kind", CHECKPOINT_CORRUPTIONS)
def test_damaged_checkpoint_is_one_line_naming_the_file_and_rebuild(kind, copy, capsys, fast_weights):
    name, damage, complete = CHECKPOINT_CORRUPTIONS[kind]
    with faults.case("corruptions", f"run: {kind}"):
        if not complete:
            os.remove(copy["run"] / "metrics.json")
        damage(copy["run"] / name)
        kept = {p: (copy["run"] / p).read_bytes() for p in os.listdir(copy["run"]) if p.endswith((".pt", ".json"))}
        _one_line_exit_2(capsys, _finetune_cli(copy["data"], copy["cache"]), str(copy["run"] / name), "--rebuild")
        # Nothing was deleted or overwritten by the refusal.
        assert {p: (copy["run"] / p).read_bytes() for p in kept} == kept
        if kind == "last.pt truncated":  # the fix it names works, and gives the same run
            assert cli.main(_finetune_cli(copy["data"], copy["cache"], "--rebuild")) == 0
            got, want = _load(copy["run"] / "last.pt")["model"], _load(copy["pristine"]["run"] / "last.pt")["model"]
            assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("name", ["metrics.json", "history.json"])
def test_damaged_run_json_is_rewritten_from_the_checkpoints(name, copy, capsys, fast_weights):
    with faults.case("corruptions", f"run: {name} garbage"):
        _garbage(copy["run"] / name)
        metrics = _finetune_ok(capsys, copy)
        want = _json(copy["pristine"]["run"] / "metrics.json")
        assert metrics["metrics"] == want["metrics"] and metrics["complete"]
        assert _json(copy["run"] / "history.json") == _json(copy["pristine"]["run"] / "history.json")


def test_flipped_model_of_an_unfinished_holdout_run_is_refused(copy, capsys, fast_weights):
    """Holdout selection: model.pt is an earlier epoch's, checked against the sha256 last.pt holds."""
    with faults.case("corruptions", "run: model.pt one bit flipped, holdout run unfinished"):
        argv = _finetune_cli(copy["data"], copy["cache"], "--select", "holdout:0.34")
        assert cli.main(argv) == 0, capsys.readouterr().err
        run = copy["cache"] / "runs" / "fixed-holdout0.34"
        os.remove(run / "metrics.json")
        _flip(run / "model.pt")
        kept = {p: (run / p).read_bytes() for p in os.listdir(run) if p.endswith((".pt", ".json"))}
        _one_line_exit_2(capsys, argv, str(run / "model.pt"), "sha256", "--rebuild")
        assert {p: (run / p).read_bytes() for p in kept} == kept


def test_damaged_model_of_an_unfinished_run_is_rewritten_from_last_pt(copy, capsys, fast_weights):
    """Final-epoch selection: model.pt is the final epoch's weights, which last.pt also holds."""
    with faults.case("corruptions", "run: model.pt truncated, run unfinished"):
        os.remove(copy["run"] / "metrics.json")
        _truncate(copy["run"] / "model.pt", 0.5)
        metrics = _finetune_ok(capsys, copy)
        assert metrics["metrics"] == _json(copy["pristine"]["run"] / "metrics.json")["metrics"]
        got, want = _load(copy["run"] / "model.pt")["model"], _load(copy["pristine"]["run"] / "model.pt")["model"]
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_damaged_weights_file_is_a_user_error(copy, capsys, fast_weights):
    with faults.case("corruptions", "--weights model.pt truncated"):
        _truncate(copy["run"] / "model.pt", 0.5)
        _one_line_exit_2(capsys, _features_cli(copy["data"], copy["cache"], "--weights", str(copy["run"] / "model.pt")),
                         "model.pt", "not a readable")


def _flip(path) -> None:
    data = bytearray(Path(path).read_bytes())
    data[len(data) // 2] ^= 0xFF
    Path(path).write_bytes(bytes(data))


HEAD_CORRUPTIONS = {
    "model file with one byte flipped": ("logistic.joblib", _flip),
    "model file truncated": ("logistic.joblib", lambda p: _truncate(p, 0.5)),
    "model file deleted": ("logistic.joblib", os.remove),
    "model file swapped for another head's": ("logistic.joblib",
                                              lambda p: shutil.copy(Path(p).with_name("ridge.joblib"), p)),
    "sidecar garbage": ("logistic.json", _garbage),
}


@pytest.mark.parametrize("kind", HEAD_CORRUPTIONS)
def test_tampered_head_is_refused_and_refitted(kind, copy, capsys, fast_weights):
    name, damage = HEAD_CORRUPTIONS[kind]
    with faults.case("corruptions", f"head: {kind}"):
        path = copy["cache"] / "heads" / name
        damage(path)
        _one_line_exit_2(capsys, ["predict", "--head", "logistic", "--cache", str(copy["cache"]),
                                  str(copy["data"] / "val")], str(path), "--rebuild")
        # `heads` sees the damage too (sha256 against the sidecar) and refits: the same head again.
        assert cli.main(["heads", "--features", copy["features"], "--cache", str(copy["cache"]),
                         "--heads", "logistic,ridge", "--cv-folds", "2"]) == 0
        out = capsys.readouterr().out
        assert "logistic " in out and "ridge (up to date)" in out
        X, _, _, _ = store.read_split(copy["features"], "val")
        got = heads.load_head(copy["cache"] / "heads" / "logistic.json")
        want = heads.load_head(copy["pristine"]["cache"] / "heads" / "logistic.json")
        np.testing.assert_array_equal(got.predict(X), want.predict(X))


# =============================================================================== bad input


def _bad_images(root: Path, classes) -> Dict[str, bool]:
    """Every bad-image kind in a class folder named with spaces and non-ASCII letters.

    Returns ``{path relative to root: must be cached}``; files not listed must be ignored.
    """
    d = root / "train" / classes[1]
    rgb = Image.new("RGB", (64, 48), (30, 30, 160))
    cases = {}

    def add(name, keep):
        cases[f"train/{classes[1]}/{name}"] = keep

    (d / "zero.jpg").write_bytes(b"")
    add("zero.jpg", False)
    (d / "text.jpg").write_text("not an image at all")
    add("text.jpg", False)
    rgb.save(d / "whole.jpg")
    (d / "truncated.jpg").write_bytes((d / "whole.jpg").read_bytes()[:300])
    (d / "whole.jpg").unlink()
    add("truncated.jpg", False)
    Image.new("CMYK", (50, 50), (0, 200, 200, 0)).save(d / "cmyk.jpg")
    Image.fromarray(np.full((40, 40), 40000, np.uint16)).save(d / "sixteen.png")
    Image.new("RGBA", (40, 40), (0, 0, 255, 128)).save(d / "alpha.png")
    rgb.convert("P").save(d / "palette.gif")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    rgb.save(d / "rotated.jpg", exif=exif.tobytes())
    rgb.save(d / "UPPER.JPEG")
    Image.new("RGB", (4000, 3000), (10, 10, 200)).save(d / "huge.jpg", quality=50)
    (d / "nested" / "deeper").mkdir(parents=True)
    rgb.save(d / "nested" / "deeper" / "nested.png")
    for name in ("cmyk.jpg", "sixteen.png", "alpha.png", "palette.gif", "rotated.jpg", "UPPER.JPEG", "huge.jpg",
                 "nested/deeper/nested.png"):
        add(name, True)
    (d / ".hidden.jpg").write_bytes(b"junk")
    (d / ".hidden_folder").mkdir()
    rgb.save(d / ".hidden_folder" / "inside.jpg")
    (d / "notes.txt").write_text("not an image extension")
    (root / "val" / classes[0] / "empty_subfolder").mkdir()
    return cases


BAD_IMAGE_KINDS = ("truncated", "zero bytes", "text named .jpg", "CMYK", "16-bit PNG", "RGBA", "palette GIF",
                   "huge (4000x3000)", "EXIF-rotated", "upper-case extension", "hidden file", "hidden folder",
                   "nested folders", "non-image extension", "class folder with spaces and non-ASCII",
                   "empty sub-folder")


def test_every_bad_image_kind_in_one_folder_through_features_heads_and_finetune(tmp_path, capsys, fast_weights):
    classes = ("ants", "bees und wespen ünï 蜂")
    data = make_dataset(tmp_path / "data", n_train=3, n_val=2, classes=classes)
    cases = _bad_images(data, classes)
    with contextlib.ExitStack() as each_kind:
        for kind in BAD_IMAGE_KINDS:  # one folder holds them all; each counts as a bad input tried
            each_kind.enter_context(faults.case("bad inputs", f"image folder: {kind}"))
        assert cli.main(_features_cli(data, tmp_path / "c", "--views", "1")) == 0
        out = capsys.readouterr().out
        path = glob.glob(str(tmp_path / "c" / "features" / "*.h5"))[0]
        meta = store.read_meta(path)
        assert meta["classes"] == list(classes)
        skipped = {s["path"] for s in meta["splits"]["train"]["skipped"]}
        assert skipped == {p for p, keep in cases.items() if not keep}  # listed, with reasons
        assert all(s["reason"] for s in meta["splits"]["train"]["skipped"])
        feats, labels, paths, views = store.read_split(path, "train", views=True)
        assert {p for p, keep in cases.items() if keep} <= set(paths)
        assert not [p for p in paths if "hidden" in p or p.endswith(".txt")]
        assert np.isfinite(feats).all() and np.isfinite(views).all() and len(paths) == 6 + 8
        assert "skipped        3" in out and "zero.jpg" in out
        assert cli.main(["heads", "--features", path, "--cache", str(tmp_path / "c"), "--cv-folds", "2",
                         "--heads", "logistic,ridge", "--use-views"]) == 0
        assert cli.main(_finetune_cli(data, tmp_path / "c", "--epochs", "1")) == 0
        metrics = _json(tmp_path / "c" / "runs" / "fixed" / "metrics.json")
        assert {s["path"] for s in metrics["skipped"]} == skipped
        assert "Traceback" not in capsys.readouterr().err


def _non_utf8(root: Path, what: str) -> None:
    folder = os.fsencode(root / "train" / "ants")
    if what == "file":
        os.rename(os.path.join(folder, b"img_000.jpg"), os.path.join(folder, b"caf\xe9.jpg"))
    else:
        os.rename(folder, os.fsencode(root / "train") + b"/fourmis \xe9")
        os.rename(os.fsencode(root / "val" / "ants"), os.fsencode(root / "val") + b"/fourmis \xe9")


def _every_train_image_of_a_class_undecodable(root: Path) -> None:
    for p in (root / "train" / "ants").iterdir():
        p.write_bytes(b"broken")


DATA_SET_PROBLEMS = {
    # name: (how to break the data set, what the one line must contain)
    "an empty train class folder": (lambda r: shutil.rmtree(r / "train" / "bees") or (r / "train" / "bees").mkdir(),
                                    "has no images"),
    "only one class": (lambda r: [shutil.rmtree(r / s / "bees") for s in ("train", "val")], "at least 2"),
    "a val class not in train": (lambda r: (r / "val" / "wasps").mkdir() or make_image(
        r / "val" / "wasps" / "w.jpg", 0, np.random.default_rng(0)), "'wasps'"),
    "no val images": (lambda r: shutil.rmtree(r / "val") or (r / "val").mkdir(), "val"),
    "no train folder": (lambda r: shutil.rmtree(r / "train"), "train"),
    "a file name that is not UTF-8": (lambda r: _non_utf8(r, "file"), "caf\\xe9.jpg"),
    "a class folder name that is not UTF-8": (lambda r: _non_utf8(r, "folder"), "fourmis \\xe9"),
}


@pytest.mark.parametrize("problem", DATA_SET_PROBLEMS)
def test_unusable_data_set_is_one_line_for_every_stage(problem, tmp_path, capsys, fast_weights):
    data = make_dataset(tmp_path / "data", n_train=3, n_val=2)
    breaks, expected = DATA_SET_PROBLEMS[problem]
    breaks(data)
    with faults.case("bad inputs", f"data set: {problem}"):
        for argv in (_features_cli(data, tmp_path / "c"), _finetune_cli(data, tmp_path / "c"),
                     ["heads", "--data", str(data), "--cache", str(tmp_path / "c"), "--weights", "random"]):
            _one_line_exit_2(capsys, argv, expected)
        assert not glob.glob(str(tmp_path / "c" / "**" / "*.*"), recursive=True)  # nothing written


def test_a_class_whose_train_images_all_fail_to_decode(tmp_path, capsys, fast_weights):
    data = make_dataset(tmp_path / "data", n_train=3, n_val=2)
    _every_train_image_of_a_class_undecodable(data)
    with faults.case("bad inputs", "data set: every train image of a class undecodable"):
        assert cli.main(_features_cli(data, tmp_path / "c")) == 0  # skipped and listed, the rest cached
        assert "train/ants/img_000.jpg" in capsys.readouterr().out
        _one_line_exit_2(capsys, ["heads", "--data", str(data), "--cache", str(tmp_path / "c"), "--weights",
                                  "random"], "['ants']", "fewer than 2 usable train images")


def test_an_empty_val_class_folder_is_fine(tmp_path, capsys, fast_weights):
    data = make_dataset(tmp_path / "data", n_train=3, n_val=2)
    shutil.rmtree(data / "val" / "bees")
    (data / "val" / "bees").mkdir()
    with faults.case("bad inputs", "data set: an empty val class folder"):
        assert cli.main(_features_cli(data, tmp_path / "c")) == 0
        assert "val 2" in capsys.readouterr().out


# =============================================================================== the machine: read-only, full disk


def _unwritable_dir() -> str:
    """A folder root cannot create anything in (sysfs); tests run as root, where chmod stops nothing."""
    path = "/sys/pipeline-reliability-test"
    try:
        os.makedirs(path)
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.EACCES, errno.EROFS, errno.ENOENT):
            return path
        raise
    os.rmdir(path)
    pytest.skip("/sys is writable here")


@pytest.mark.parametrize("where", ["read-only folder (/sys)", "a path under a regular file"])
def test_unwritable_cache_folder_is_one_line_for_every_stage(where, small, tmp_path, capsys, fast_weights):
    if where.startswith("read-only"):
        cache = _unwritable_dir()
    else:
        (tmp_path / "file").write_text("a file, not a folder")
        cache = str(tmp_path / "file" / "cache")
    data = small["data"]
    with faults.case("bad inputs", f"cache folder: {where}"):
        for argv in (_features_cli(data, cache), _finetune_cli(data, cache),
                     ["heads", "--features", small["features"], "--cache", cache],
                     ["compare", "--cache", str(small["cache"]), "--reports", os.path.join(cache, "reports")]):
            _one_line_exit_2(capsys, argv, cache)


class _Full:
    """Redirect a module's temporary-file writes to /dev/full: the kernel's own ENOSPC, mid-write."""

    def __init__(self, monkeypatch, module):
        self.hits = 0

        def full_open(path, mode="r", *args, **kwargs):
            if "w" in mode and ".tmp" in os.fspath(path):
                self.hits += 1
                return open("/dev/full", mode, *args, **kwargs)
            return open(path, mode, *args, **kwargs)

        monkeypatch.setattr(module, "open", full_open, raising=False)


def _full_h5(monkeypatch) -> None:
    """HDF5 files being created on a full disk: HDF5 itself writes to /dev/full (ENOSPC from the kernel)."""
    real = h5py.File

    def full_file(name, mode="r", *args, **kwargs):
        if mode == "w" and ".tmp-" in os.fspath(name):
            return real("/dev/full", mode, *args, **kwargs)
        return real(name, mode, *args, **kwargs)

    monkeypatch.setattr(h5py, "File", full_file)


def _permission_denied(monkeypatch) -> None:
    """The cache folder turns read-only between the plan and the final write (EACCES from the OS)."""
    real = h5py.File

    def denied(name, mode="r", *args, **kwargs):
        if mode == "w":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(name))
        return real(name, mode, *args, **kwargs)

    monkeypatch.setattr(h5py, "File", denied)


def test_full_disk_during_extraction_loses_nothing(tmp_path, capsys, monkeypatch, fast_weights):
    data = make_dataset(tmp_path / "data", n_train=3, n_val=2)
    cache = tmp_path / "c"
    with faults.case("bad inputs", "no space left: writing a batch's part"):
        with monkeypatch.context() as mp:
            _Full(mp, atomic_files)
            _one_line_exit_2(capsys, _features_cli(data, cache, "--batch-size", "4"), "no space left", str(cache))
        assert not glob.glob(str(cache / "features" / "*.h5"))
        assert cli.main(_features_cli(data, cache, "--batch-size", "4")) == 0


@pytest.mark.parametrize("fault", ["no space left", "permission denied"])
def test_failed_final_write_keeps_every_computed_batch(fault, tmp_path, capsys, monkeypatch, fast_weights):
    data = make_dataset(tmp_path / "data", n_train=3, n_val=2)
    cache = tmp_path / "c"
    with faults.case("bad inputs", f"{fault}: writing the feature cache"):
        with monkeypatch.context() as mp:
            (_full_h5 if fault == "no space left" else _permission_denied)(mp)
            _one_line_exit_2(capsys, _features_cli(data, cache), fault, str(cache))
        assert not glob.glob(str(cache / "features" / "*.h5")) and not glob.glob(str(cache / "features" / "*.tmp-*"))
        result = features.run(_features_cfg(data, cache))
        assert result.computed == 0  # every batch was kept in its part: only the write is redone


def test_full_disk_while_saving_heads_and_checkpoints(copy, capsys, monkeypatch, fast_weights):
    with faults.case("bad inputs", "no space left: saving a head"):
        with monkeypatch.context() as mp:
            _Full(mp, atomic_files)
            _one_line_exit_2(capsys, ["heads", "--features", copy["features"], "--cache", str(copy["cache"]),
                                      "--heads", "logistic", "--cv-folds", "2", "--rebuild"], "no space left")
        _heads_consistent(copy["cache"])
        assert cli.main(["heads", "--features", copy["features"], "--cache", str(copy["cache"]),
                         "--heads", "logistic", "--cv-folds", "2"]) == 0
    with faults.case("bad inputs", "no space left: saving a checkpoint"):
        shutil.rmtree(copy["run"])
        with monkeypatch.context() as mp:
            full = _Full(mp, atomic_files)
            _one_line_exit_2(capsys, _finetune_cli(copy["data"], copy["cache"]), "no space left", str(copy["cache"]))
            assert full.hits == 1
        assert not (copy["run"] / "metrics.json").exists() and not glob.glob(str(copy["run"] / "*.tmp-*"))
        metrics = _finetune_ok(capsys, copy)
        assert metrics["metrics"] == _json(copy["pristine"]["run"] / "metrics.json")["metrics"]
    with faults.case("bad inputs", "no space left: writing the report"):
        with monkeypatch.context() as mp:
            _Full(mp, atomic_files)
            _one_line_exit_2(capsys, ["compare", "--cache", str(copy["cache"]), "--reports",
                                      str(copy["cache"] / "reports"), "--no-figures", "--no-curve"],
                             "no space left", "--reports")


BAD_OPTIONS = [
    ["features", "--seed", str(2 ** 64)],
    ["features", "--seed", "-1"],
    ["features", "--batch-size", str(2 ** 64)],
    ["features", "--views", "100000"],
    ["features", "--workers", "100000"],
    ["features", "--dist-timeout", "nan"],
    ["heads", "--seed", str(2 ** 40)],
    ["heads", "--jobs", "100000"],
    ["heads", "--cv-folds", "1"],
    ["heads", "--heads", "logistic,resnet"],
    ["finetune", "--threads", "100000"],
    ["finetune", "--weight-decay", "inf"],
    ["finetune", "--gamma", "inf"],
    ["finetune", "--lr", "nan"],
    ["finetune", "--lr", "1e308"],
    ["finetune", "--gamma", "1e30", "--step-size", "1", "--epochs", "3"],
    ["finetune", "--seeds", "0,4294967296"],
    ["finetune", "--momentum", "1"],
    ["compare", "--alpha", "nan"],
    ["predict", "--batch-size", "-1", "--head", "x", "y.jpg"],
]


@pytest.mark.parametrize("argv", BAD_OPTIONS, ids=" ".join)
def test_bad_option_values_are_one_line(argv, small, capsys, fast_weights):
    stage, *options = argv
    common = {"features": ["--data", str(small["data"]), "--weights", "random", "--device", "cpu"],
              "heads": ["--features", small["features"]], "finetune": ["--data", str(small["data"]),
                                                                          "--weights", "random"],
              "compare": [], "predict": []}[stage]
    with faults.case("bad inputs", "option value: " + " ".join(argv)):
        _one_line_exit_2(capsys, [stage, *common, "--cache", str(small["cache"]) + "-never-written", *options],
                         options[0])


# =============================================================================== kill anywhere

FEATURE_KILLS = [
    KillPoint("start-up: planning", "pipeline.features.stage:_plan"),
    KillPoint("start-up: network built", "pipeline.backbones.network:feature_extractor", when="after"),
    KillPoint("mid-batch: 3rd forward done, its part unsaved", "pipeline.features.extraction:Extractor.forward", call=3,
              when="after"),
    KillPoint("mid-batch: 2nd part written, not yet renamed", "os:replace", call=2, match=".npz')"),
    KillPoint("between batches: 4th part saved", "pipeline.features.store:write_part", call=4, when="after"),
    KillPoint("final save: half the cache written", "pipeline.features.store:_write_split", call=2),
    KillPoint("final save: cache written, not yet renamed", "os:replace", match=".h5')"),
    KillPoint("final save: renamed, work files not yet removed", "shutil:rmtree", match=".parts'"),
    KillPoint("index: written, not yet renamed", "os:replace", match="index.json'"),
]


def _features_argv(data, cache) -> List[str]:
    return ["features", "--data", str(data), "--cache", str(cache), "--weights", "random", "--device", "cpu",
            "--batch-size", "2", "--workers", "0", "--no-progress"]


def _no_cache_looks_complete(cache_dir: Path, reference: str) -> None:
    """Whatever a kill left: any file under the final name is complete and right."""
    for path in glob.glob(str(cache_dir / "features" / "*.h5")):
        _assert_same_cache(path, reference)
    for part in glob.glob(str(cache_dir / "features" / "*.parts" / "*.npz")):
        rows = store.read_part_files([part])  # every part under its final name is whole
        assert rows and all(r.error or r.feature is not None for r in rows.values())


@pytest.fixture(scope="module")
def kill_data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("kill") / "data", n_train=4, n_val=2)


@pytest.fixture(scope="module")
def features_reference(kill_data, tmp_path_factory) -> str:
    with pytest.MonkeyPatch.context() as mp:
        for key, value in SMALL.items():
            mp.setitem(config.PREPROCESS, key, value)
        return features.run(_features_cfg(kill_data, tmp_path_factory.mktemp("ref"), batch_size=2)).path


@pytest.mark.slow
@pytest.mark.parametrize("point", FEATURE_KILLS, ids=lambda p: p.name)
def test_features_killed_anywhere_resumes_to_the_same_cache(point, kill_data, features_reference, tmp_path):
    with faults.case("kill points", f"features: {point.name}"):
        cache = tmp_path / "c"
        faults.run_killed(_features_argv(kill_data, cache), point, SMALL)
        _no_cache_looks_complete(cache, features_reference)
        result = features.run(_features_cfg(kill_data, cache, batch_size=2))
        assert result.path.endswith(os.path.basename(features_reference))
        _assert_same_cache(result.path, features_reference)
        left = sorted(os.listdir(cache / "features"))
        name = os.path.basename(result.path)
        assert left == sorted([name, name + ".lock", "index.json", "index.json.lock"]), left
        assert features.find_cache(_features_cfg(kill_data, cache)) == result.path


HEADS = "logistic,sgd_log,ridge"
HEAD_KILLS = [
    KillPoint("start-up: reading the cache", "pipeline.features.store:read_meta"),
    KillPoint("mid-fit: cross-validating the 2nd head", "pipeline.heads.stage:cross_validate", call=2),
    KillPoint("final save: model written, not yet renamed", "os:replace", match=".joblib')"),
    KillPoint("final save: model renamed, sidecar not yet written", "pipeline.files:atomic_write", call=2),
    KillPoint("final save: sidecar written, not yet renamed", "os:replace", match=".json')"),
    KillPoint("between heads: the 1st saved", "pipeline.heads.saved:save", call=2),
]


def _heads_argv(features_path, cache, *extra) -> List[str]:
    return ["heads", "--features", str(features_path), "--cache", str(cache), "--heads", HEADS, *extra]


def _heads_cfg(features_path, cache, **kw) -> HeadsConfig:
    return HeadsConfig(features=str(features_path), cache=str(cache), heads=tuple(HEADS.split(",")), **kw)


def _heads_consistent(cache: Path) -> None:
    """Every sidecar has its model, with the sha256 it records (no sidecar without its model)."""
    for sidecar in glob.glob(str(cache / "heads" / "*.json")):
        heads.load_head(sidecar)


def _assert_same_heads(cache: Path, reference: Path, features_path: str) -> None:
    X, _, _, _ = store.read_split(features_path, "val")
    for name in HEADS.split(","):
        got = heads.load_head(cache / "heads" / f"{name}.json", features=features_path)
        want = heads.load_head(reference / "heads" / f"{name}.json", features=features_path)
        np.testing.assert_array_equal(got.predict(X), want.predict(X))
        np.testing.assert_allclose(got.decision_function(X), want.decision_function(X), rtol=1e-6, atol=1e-9)
        assert got.meta["metrics"]["predictions"] == want.meta["metrics"]["predictions"]
        assert got.meta["cv"]["best"] == want.meta["cv"]["best"]


@pytest.fixture(scope="module")
def heads_reference(features_reference, tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("heads_ref")
    heads.run(_heads_cfg(features_reference, cache))
    return cache


@pytest.mark.slow
@pytest.mark.parametrize("point", HEAD_KILLS, ids=lambda p: p.name)
@pytest.mark.parametrize("over_saved", [False, True], ids=["fresh", "refit over saved heads"])
def test_heads_killed_anywhere_rerun_gives_the_same_heads(point, over_saved, features_reference, heads_reference,
                                                          tmp_path):
    if over_saved and point.target == "pipeline.features.store:read_meta":
        pytest.skip("nothing is written before the cache is read")
    with faults.case("kill points", f"heads ({'--rebuild over saved' if over_saved else 'fresh'}): {point.name}"):
        cache = tmp_path / "c"
        if over_saved:
            shutil.copytree(heads_reference / "heads", cache / "heads")
        faults.run_killed(_heads_argv(features_reference, cache, *(["--rebuild"] if over_saved else [])), point)
        _heads_consistent(cache)
        heads.run(_heads_cfg(features_reference, cache))
        _assert_same_heads(cache, heads_reference, features_reference)
        left = {p for p in os.listdir(cache / "heads") if not p.startswith(".")}
        assert left == {f"{n}.{ext}" for n in HEADS.split(",") for ext in ("joblib", "json")}, left


FINETUNE_KILLS = [
    KillPoint("start-up: network built", "pipeline.finetune.stage:_build", when="after"),
    KillPoint("mid-epoch 1: after the 1st optimiser step", "torch.optim.sgd:SGD.step", when="after"),
    KillPoint("mid-epoch 2: after the 3rd optimiser step", "torch.optim.sgd:SGD.step", call=3, when="after"),
    KillPoint("epoch save: history.json written, not yet renamed", "os:replace", match="history.json')"),
    KillPoint("epoch save: last.pt of epoch 2 written, not yet renamed", "os:replace", call=2, match="last.pt')"),
    KillPoint("final save: model.pt written, not yet renamed", "os:replace", match="model.pt')"),
    KillPoint("final save: evaluating the reported model", "pipeline.finetune.stage:_finish"),
    KillPoint("final save: metrics.json written, not yet renamed", "os:replace", match="metrics.json')"),
]


def _finetune_argv(data, cache) -> List[str]:
    return ["finetune", "--data", str(data), "--cache", str(cache), "--weights", "random", "--device", "cpu",
            "--epochs", "2", "--workers", "0", "--threads", "1", "--no-progress"]


def _load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _json(path) -> dict:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


@pytest.fixture(scope="module")
def finetune_reference(kill_data, tmp_path_factory) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        for key, value in SMALL.items():
            mp.setitem(config.PREPROCESS, key, value)
        return Path(finetune.run(_finetune_cfg(kill_data, tmp_path_factory.mktemp("ft_ref"))).runs[0].path)


@pytest.mark.slow
@pytest.mark.parametrize("point", FINETUNE_KILLS, ids=lambda p: p.name)
def test_finetune_killed_anywhere_resumes_bit_identical(point, kill_data, finetune_reference, tmp_path):
    with faults.case("kill points", f"finetune: {point.name}"):
        cache = tmp_path / "c"
        faults.run_killed(_finetune_argv(kill_data, cache), point, SMALL)
        run_dir = cache / "runs" / "finetune"
        assert not (run_dir / "metrics.json").exists()  # an unfinished run never looks finished
        for name in ("model.pt", "last.pt"):
            if (run_dir / name).exists():
                assert _load(run_dir / name)["format"] == finetune.RUN_FORMAT  # whole, never torn
        run = finetune.run(_finetune_cfg(kill_data, cache)).runs[0]
        for name in ("last.pt", "model.pt"):
            got, want = _load(run_dir / name)["model"], _load(finetune_reference / name)["model"]
            assert all(torch.equal(got[k], want[k]) for k in want), name
        assert _json(run_dir / "history.json")["epochs"] == [
            dict(e, **{k: g[k] for k in ("seconds", "train_seconds", "val_seconds") if k in g})  # timings differ
            for e, g in zip(_json(finetune_reference / "history.json")["epochs"],
                            _json(run_dir / "history.json")["epochs"])]
        want = _json(finetune_reference / "metrics.json")
        assert run.metrics["metrics"]["predictions"] == want["metrics"]["predictions"]
        assert run.metrics["selection"] == want["selection"] and run.metrics["complete"]
        assert sorted(p for p in os.listdir(run_dir) if not p.startswith(".")) == [
            "history.json", "last.pt", "metrics.json", "model.pt"]


# =============================================================================== data changing during a run


def _rows(path: str) -> Dict[str, tuple]:
    """relpath -> (label, feature, sha1) of every cached image, plus relpath -> reason of skipped ones."""
    meta = store.read_meta(path)
    known = store.read_known_rows(path)
    out = {}
    for split in ("train", "val"):
        feats, labels, paths, _ = store.read_split(path, split)
        for feat, label, rel in zip(feats, labels, paths):
            out[rel] = (int(label), feat, known[rel].sha1)
    skipped = {s["path"]: s["reason"] for info in meta["splits"].values() for s in info["skipped"]}
    return out, skipped


def test_images_deleted_rewritten_and_added_during_extraction(kill_data, features_reference, tmp_path, monkeypatch,
                                                              fast_weights):
    """Deterministic hooks (no sleeps) change the data set at chosen moments of a `features` run."""
    from pipeline.data import imagefolder as data_mod

    root = tmp_path / "data"
    shutil.copytree(kill_data, root)
    ref, _ = _rows(features_reference)
    deleted_early, deleted_late = "train/ants/img_000.jpg", "train/ants/img_001.jpg"
    rewritten_early, rewritten_late = "train/bees/img_000.jpg", "train/bees/img_003.jpg"
    added = "train/ants/added.jpg"
    # What each changed file holds afterwards: the bytes of another image, whose features `ref` knows.
    source = {rewritten_early: "val/ants/img_000.jpg", rewritten_late: "val/ants/img_001.jpg", added: "val/bees/img_000.jpg"}

    def copy_over(rel):
        (root / rel).write_bytes((root / source[rel]).read_bytes())

    real_discover, real_getitem = data_mod.discover, data_mod.ExtractionDataset.__getitem__
    reads: List[str] = []
    gone = {"bytes": (root / deleted_late).read_bytes(), "stat": os.stat(root / deleted_late)}

    def discover(*args, **kwargs):  # listed, then deleted before the plan looks at it
        listed = real_discover(*args, **kwargs)
        os.remove(root / deleted_early)
        return listed

    def getitem(self, index):
        rel = self.relpaths[index]
        if not reads:  # the first image the loader reads: change others before they are read
            os.remove(root / deleted_late)
            copy_over(rewritten_early)
            copy_over(added)
        if rel.startswith("val/") and rewritten_late in reads and not (root / rewritten_late).read_bytes() == (
                root / source[rewritten_late]).read_bytes():
            copy_over(rewritten_late)  # after it was read and stored in a batch
        reads.append(rel)
        return real_getitem(self, index)

    cases = ["deleted after listing, before planning", "deleted before it was read",
             "rewritten before it was read", "rewritten after it was read", "added during the run"]
    with contextlib.ExitStack() as each:
        for name in cases:
            each.enter_context(faults.case("data changed during a run", f"features: an image {name}"))
        with monkeypatch.context() as mp:
            mp.setattr(data_mod, "discover", discover)
            mp.setattr(data_mod.ExtractionDataset, "__getitem__", getitem)
            first = features.run(_features_cfg(root, tmp_path / "c", batch_size=2))
        assert rewritten_late in reads and reads.index(rewritten_late) < len(reads) - 1
        rows, skipped = _rows(first.path)
        # Deleted: skipped and listed (in the cache and the run's summary), never a crash.
        assert set(skipped) == {deleted_early, deleted_late}, skipped
        assert {s["path"] for s in first.skipped} == {deleted_early, deleted_late}
        assert "deleted" in skipped[deleted_early] and "FileNotFoundError" in skipped[deleted_late]
        # Rewritten before the read: the feature and the fingerprint are both of the new bytes.
        label, feat, sha1 = rows[rewritten_early]
        np.testing.assert_allclose(feat, ref[source[rewritten_early]][1], rtol=1e-5, atol=1e-5)
        assert sha1 == ref[source[rewritten_early]][2]
        # Rewritten after the read: the old feature under the old bytes' fingerprint (redone next run).
        np.testing.assert_allclose(rows[rewritten_late][1], ref[rewritten_late][1], rtol=1e-5, atol=1e-5)
        assert rows[rewritten_late][2] == ref[rewritten_late][2]
        assert added not in rows

        # A sync tool puts the deleted file back with its old size and mtime: it is read this time.
        (root / deleted_late).write_bytes(gone["bytes"])
        os.utime(root / deleted_late, ns=(gone["stat"].st_atime_ns, gone["stat"].st_mtime_ns))
        second = features.run(_features_cfg(root, tmp_path / "c", batch_size=2))
        assert second.computed == 3  # the image rewritten after its read, the one added, the one restored
        rows, skipped = _rows(second.path)
        assert not skipped
        # Equal to a clean run on the data as it is now: every image's features are those of its bytes.
        expected = {rel: v for rel, v in ref.items() if rel != deleted_early}
        for rel, src in source.items():
            expected[rel] = (0 if "/ants/" in rel else 1, *ref[src][1:])
        assert sorted(rows) == sorted(expected)
        for rel, (label, feat, sha1) in expected.items():
            assert rows[rel][0] == label and rows[rel][2] == sha1, rel
            np.testing.assert_allclose(rows[rel][1], feat, rtol=1e-5, atol=1e-5, err_msg=rel)
        assert features.run(_features_cfg(root, tmp_path / "c", batch_size=2)).up_to_date


# =============================================================================== concurrency


def _wait_for(pattern: str, count: int, proc, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while len(glob.glob(pattern)) < count:
        assert proc.poll() is None and time.time() < deadline, f"never saw {count} x {pattern}"
        time.sleep(0.05)


def _finish(proc, timeout: float = 300) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-2000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("first_killed", [False, True], ids=["both finish", "first killed while the second waits"])
def test_two_features_runs_on_one_cache(first_killed, kill_data, features_reference, tmp_path):
    name = "two `features` at once" + (", the first killed" if first_killed else "")
    with faults.case("concurrent runs", name):
        cache = tmp_path / "c"
        argv = _features_argv(kill_data, cache)
        first = faults.start(argv, faults.slow("pipeline.features.store:write_part", 0.4), SMALL)
        _wait_for(str(cache / "features" / "*.parts" / "*.npz"), 2, first)
        second = faults.start(argv, preprocess=SMALL)
        if first_killed:
            time.sleep(1.0)
            first.kill()
            first.communicate()
        else:
            _finish(first)
        out = _finish(second)
        if not first_killed:
            assert "up to date" in out  # it waited on the lock, then found nothing to do
        path = glob.glob(str(cache / "features" / "*.h5"))
        assert len(path) == 1
        _assert_same_cache(path[0], features_reference)
        assert not glob.glob(str(cache / "features" / "*.parts")) and not glob.glob(str(cache / "features" / "*.tmp-*"))


@pytest.mark.slow
def test_two_heads_runs_at_once(features_reference, heads_reference, tmp_path):
    with faults.case("concurrent runs", "two `heads --rebuild` at once"):
        cache = tmp_path / "c"
        procs = [faults.start(_heads_argv(features_reference, cache, "--rebuild")) for _ in range(2)]
        for proc in procs:
            _finish(proc)
        _heads_consistent(cache)
        _assert_same_heads(cache, heads_reference, features_reference)
        assert not glob.glob(str(cache / "heads" / "*.tmp-*"))


@pytest.mark.slow
def test_two_finetune_runs_at_once(kill_data, finetune_reference, tmp_path):
    with faults.case("concurrent runs", "two `finetune` of one run at once"):
        cache = tmp_path / "c"
        procs = [faults.start(_finetune_argv(kill_data, cache), preprocess=SMALL) for _ in range(2)]
        outs = [_finish(proc) for proc in procs]
        assert sum("up to date" in out for out in outs) == 1  # the second waited on the lock
        run_dir = cache / "runs" / "finetune"
        got, want = _load(run_dir / "last.pt")["model"], _load(finetune_reference / "last.pt")["model"]
        assert all(torch.equal(got[k], want[k]) for k in want)
        assert _json(run_dir / "metrics.json")["complete"]
