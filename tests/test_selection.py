"""Nothing reported on val is chosen on val: permuting the val labels changes no choice.

End-to-end runs under ``--select holdout:F`` choose their epoch on held-out *train* images;
heads choose their hyper-parameter by cross-validation on train. Relabelling val (every
val label permuted) must leave every selected checkpoint and hyper-parameter identical.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from pipeline.finetune import stage as finetune
from pipeline.heads import stage as heads
from pipeline.config import FinetuneConfig, HeadsConfig
from tests.test_heads import write_feature_cache

pytestmark = pytest.mark.usefixtures("small_images")


def _swap_val_labels(data) -> None:
    """Every val image of one class now sits in the other class's folder (labels permuted)."""
    val = data / "val"
    (val / "ants").rename(val / "tmp")
    (val / "bees").rename(val / "ants")
    (val / "tmp").rename(val / "bees")


def _run(data, cache):
    cfg = FinetuneConfig(data=str(data), cache=str(cache), weights="random", device="cpu", progress=False,
                         workers=0, epochs=3, select="holdout:0.34")
    return finetune.run(cfg).runs[0]


def test_holdout_selection_of_runs_ignores_val_labels(tiny_data, tmp_path):
    before = _run(tiny_data, tmp_path / "a")
    permuted = tmp_path / "permuted"
    shutil.copytree(tiny_data, permuted)
    _swap_val_labels(permuted)
    after = _run(permuted, tmp_path / "b")
    a, b = before.metrics, after.metrics
    # The val labels did change what val says...
    swap = {"ants": "bees", "bees": "ants"}
    truth_a = dict(zip(a["metrics"]["predictions"]["paths"], a["metrics"]["predictions"]["y_true"]))
    truth_b = {"/".join(["val", swap[p.split("/")[1]], p.split("/")[2]]): y  # keyed by the image's old path
               for p, y in zip(b["metrics"]["predictions"]["paths"], b["metrics"]["predictions"]["y_true"])}
    assert len(truth_a) == 8 and all(truth_a[p] != truth_b[p] for p in truth_a)
    # ... and nothing that was chosen.
    assert a["selection"] == b["selection"] and a["selection"]["rule"] == "holdout"
    assert a["selection"]["holdout_n"] == 5 and all(p.startswith("train/") for p in a["selection"]["holdout"])
    ma, mb = (torch.load(os.path.join(r.path, "model.pt"), map_location="cpu", weights_only=True)
              for r in (before, after))
    assert ma["epoch"] == mb["epoch"] == a["selection"]["selected_epoch"]
    assert all(torch.equal(ma["model"][k], mb["model"][k]) for k in ma["model"])
    ha, hb = (json.load(open(os.path.join(r.path, "history.json")))["epochs"] for r in (before, after))
    assert [e["holdout_acc"] for e in ha] == [e["holdout_acc"] for e in hb]


def test_heads_hyper_parameters_ignore_val_labels(tmp_path):
    kw = dict(n_train=12, n_val=10, sep=0.3, seed=4)
    clean = write_feature_cache(tmp_path / "clean.h5", **kw)
    poisoned = write_feature_cache(tmp_path / "poisoned.h5", poison_val=True, **kw)
    names = ("logistic", "sgd_log", "sgd_hinge", "linear_svm", "ridge", "knn")
    rows = [heads.run(HeadsConfig(cache=str(tmp_path / c), features=f, heads=names)).rows
            for c, f in (("a", clean), ("b", poisoned))]
    for ra, rb in zip(*rows):
        assert ra.doc["metrics"]["predictions"]["y_true"] != rb.doc["metrics"]["predictions"]["y_true"]
        assert ra.doc["cv"]["best"] == rb.doc["cv"]["best"], ra.name
        assert ra.doc["cv"]["mean"] == rb.doc["cv"]["mean"], ra.name
        assert ra.doc["metrics"]["predictions"]["y_pred"] == rb.doc["metrics"]["predictions"]["y_pred"], ra.name
