"""predict: classify a folder with a saved head; undecodable files are reported, the rest classified."""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import time

import pytest

from pipeline import cli
from pipeline.features import stage as features
from pipeline.heads import stage as heads
from pipeline.export import predict
from pipeline.config import FeaturesConfig, HeadsConfig, PredictConfig
from pipeline.errors import UserError

from .conftest import make_dataset


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Tiny colour-coded data, its feature cache (random weights) and two heads."""
    base = tmp_path_factory.mktemp("predict")
    root = make_dataset(base / "data", n_train=8, n_val=3)
    cache = str(base / "cache")
    features.run(FeaturesConfig(data=str(root), cache=cache, weights="random", device="cpu", progress=False))
    # the Makefile's call: python -m pipeline heads $(COMMON) --views $(VIEWS) --heads $(HEADS)
    assert cli.main(["heads", "--data", str(root), "--cache", cache, "--weights", "random", "--device", "cpu",
                     "--views", "0", "--heads", "logistic,ridge"]) == 0
    return root, cache


@pytest.fixture
def folder(project, tmp_path):
    """Three val images and one undecodable file in a nested folder."""
    root, _ = project
    d = tmp_path / "new"
    for cls in ("ants", "bees"):
        (d / cls).mkdir(parents=True)
    shutil.copy(root / "val" / "ants" / "img_000.jpg", d / "ants" / "a.jpg")
    shutil.copy(root / "val" / "bees" / "img_000.jpg", d / "bees" / "b.jpg")
    shutil.copy(root / "val" / "bees" / "img_001.jpg", d / "bees" / "c.png.jpg")
    (d / "ants" / "broken.jpg").write_bytes(b"\xff\xd8 truncated, not a JPEG")
    (d / "notes.txt").write_text("not an image: ignored")
    return d


def test_folder_with_an_undecodable_file_reports_it_and_classifies_the_rest(project, folder):
    _, cache = project
    result = predict.run(PredictConfig(head="logistic", inputs=(str(folder),), cache=cache, device="cpu"))
    assert [os.path.basename(s["path"]) for s in result.skipped] == ["broken.jpg"]
    got = {os.path.basename(p["path"]): p for p in result.predictions}
    assert sorted(got) == ["a.jpg", "b.jpg", "c.png.jpg"]
    assert [got[n]["class"] for n in ("a.jpg", "b.jpg", "c.png.jpg")] == ["ants", "bees", "bees"]
    assert all(0.5 <= p["probability"] <= 1.0 for p in result.predictions)
    table = result.render("table")
    assert "broken.jpg" in table and "3 classified, 1 skipped" in table and "not pretrained" in table


def test_formats_and_cli(project, folder, capsys):
    _, cache = project
    args = ["predict", "--head", "ridge", "--cache", cache, "--device", "cpu", str(folder / "bees"),
            str(folder / "ants" / "a.jpg")]
    assert cli.main(args + ["--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["head"] == "ridge" and doc["classes"] == ["ants", "bees"] and doc["pretrained"] is False
    assert [p["class"] for p in doc["predictions"]] == ["bees", "bees", "ants"]
    assert all(p["probability"] is None for p in doc["predictions"])  # ridge gives no probabilities
    assert cli.main(["predict", "--head", "logistic", "--cache", cache, "--device", "cpu", str(folder),
                     "--format", "csv"]) == 0
    captured = capsys.readouterr()
    rows = list(csv.DictReader(io.StringIO(captured.out)))
    assert [r["error"] != "" for r in rows] == [False, False, False, True]  # classified first, then skipped
    assert rows[-1]["path"].endswith("broken.jpg") and rows[-1]["class"] == ""
    assert "could not be decoded" in captured.err


def test_user_errors(project, folder, tmp_path, capsys):
    _, cache = project
    assert cli.main(["predict", "--head", "nope", "--cache", cache, str(folder)]) == 2
    assert "available: logistic, ridge" in capsys.readouterr().err
    assert cli.main(["predict", "--head", "logistic", "--cache", cache, str(tmp_path / "missing")]) == 2
    assert "neither an image file nor a folder" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_bytes(b"")
    assert cli.main(["predict", "--head", "logistic", "--cache", cache, "--device", "cpu", str(tmp_path / "bad")]) == 2
    assert "nothing was classified" in capsys.readouterr().err


def test_refuses_other_backbone_weights(project, folder):
    _, cache = project
    with pytest.raises(UserError, match="are not the weights head 'logistic' was fitted on"):
        predict.run(PredictConfig(head="logistic", inputs=(str(folder),), cache=cache, device="cpu",
                                  weights=_other_weights(folder.parent)))


def _other_weights(where) -> str:
    import torch
    from torchvision.models import resnet18

    torch.manual_seed(123)
    path = os.path.join(where, "other.pt")
    torch.save(resnet18(weights=None).state_dict(), path)
    return path


def test_make_heads_contract_on_tiny_data(project):
    """`make heads` again: every head is up to date (nothing refitted) and loads."""
    root, cache = project
    start = time.perf_counter()
    result = heads.run(HeadsConfig(data=str(root), cache=cache, weights="random", device="cpu",
                                   heads=("logistic", "ridge")))
    assert all(r.reused for r in result.rows) and time.perf_counter() - start < 60
    assert heads.load_head(result.rows[0].sidecar_path, features=result.features).name == "logistic"
