"""Stage 4 (compare): table, significance, figures, and refusal to mix results from other data.

Every input is a small synthetic result file written here following the schemas that
``heads`` (cache/heads/*.json) and ``finetune`` (cache/runs/<mode>[-<seed>]/metrics.json)
produce, so these tests need neither stage.
"""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import pytest

from pipeline import cli, compare, plots, store
from pipeline.config import CompareConfig
from pipeline.errors import UserError
from pipeline.metrics import evaluate
from pipeline.records import FeaturesRef, HeadRecord, RunRecord, WeightsRef

CLASSES = ["ants", "bees"]
PNG = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- synthetic results


def _val_items(data: Path):
    """(relpath, label) of the tiny data set's val images, in the order heads would see them."""
    items = []
    for label, name in enumerate(CLASSES):
        for f in sorted((data / "val" / name).iterdir()):
            items.append((f"val/{name}/{f.name}", label))
    return items


def _predict(y_true: Sequence[int], wrong: Sequence[int]) -> List[int]:
    """y_true with the labels at positions ``wrong`` flipped (two classes)."""
    y = list(y_true)
    for i in wrong:
        y[i] = 1 - y[i]
    return y


def _weights(weights_id: str) -> WeightsRef:
    if weights_id.startswith("random-seed"):
        return WeightsRef("random", "ab" * 32, seed=int(weights_id[len("random-seed"):]))
    return WeightsRef("imagenet", "ab" * 32)


def write_feature_cache(cache: Path, data: Path, weights_id="imagenet", pretrained=True) -> str:
    rng = np.random.default_rng(0)
    splits = {}
    for split in ("train", "val"):
        rows, labels = [], []
        for label, name in enumerate(CLASSES):
            for f in sorted((data / split / name).iterdir()):
                feat = (rng.normal(0, 1, 512) + 3 * label).astype(np.float32)
                rows.append(store.Row(f"{split}/{name}/{f.name}", "0" * 40, 1, 1, feat))
                labels.append(label)
        splits[split] = store.SplitRows(rows, labels)
    path = str(cache / "features" / f"data-{weights_id}.h5")
    meta = {"backbone": "resnet18", "weights_id": weights_id, "weights_sha256": "ab" * 32,
            "pretrained": pretrained, "weights": _weights(weights_id).to_json(), "precision": "fp32",
            "data_root": str(data), "extract_seconds": 30.0, "extract_device": "cpu"}
    store.write_cache(path, {"weights": weights_id}, meta, CLASSES, splits)
    return path


def write_head(cache: Path, name: str, items, wrong=(), *, data_root: str, classes=CLASSES,
               features_path: str = "", weights_id="imagenet", pretrained=True, extract_seconds=30.0,
               fit_seconds=0.5, paths: Optional[List[str]] = None) -> Path:
    assert pretrained == (not weights_id.startswith("random"))
    paths = paths if paths is not None else [p for p, _ in items]
    y_true = [y for _, y in items]
    record = HeadRecord(
        name=name, method=name, metrics=evaluate(y_true, _predict(y_true, wrong), classes, paths),
        fit_seconds=fit_seconds, predict_us_per_image=3.0, cv={"folds": 5}, hyperparameters={"C": 1.0},
        trainable_parameters=513,
        features=FeaturesRef(path=features_path, content_key="c" * 64, settings_key="s" * 64,
                             weights=_weights(weights_id), backbone="resnet18", precision="fp32",
                             extract_seconds=extract_seconds, extract_device="cpu", n_images=20),
        classes=list(classes), data_root=data_root, model_file=f"{name}.joblib", format="joblib",
        sha256="0" * 64, size_bytes=1000, versions={}, created="2024-01-01T00:00:00", used_views=False,
        has_proba=False, settings={})
    path = cache / "heads" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(record.dumps())
    return path


def write_run(cache: Path, mode: str, seed: int, items, wrong=(), *, data_root: str, weights_id="imagenet",
              pretrained=True, total_seconds=600.0, complete=True, history=True, name=None,
              best_val=(4, 0.9), train_per_class=0) -> Path:
    """A run whose final epoch (the result) gets the images at ``wrong`` wrong; its history peaks
    on val at epoch ``best_val[0]`` with ``best_val[1]`` (the labelled, optimistic number)."""
    assert pretrained == (not weights_id.startswith("random"))
    y_true = [y for _, y in items]
    y_pred = _predict(y_true, wrong)
    proba = np.array([[0.8, 0.2] if y == 0 else [0.3, 0.7] for y in y_pred])
    name = name or f"{mode}-{seed}"
    folder = cache / "runs" / name
    folder.mkdir(parents=True, exist_ok=True)
    epochs = 5
    record = RunRecord(
        name=name, mode=mode, seed=seed, metrics=evaluate(y_true, y_pred, CLASSES, [p for p, _ in items], proba),
        selection={"rule": "final", "selected_epoch": epochs, "selected_on": "nothing", "scored_on": "val"},
        best_val_epoch=best_val[0], best_val_acc=best_val[1], train_per_class=train_per_class,
        epochs=epochs, total_seconds=total_seconds, epoch_seconds=[total_seconds / epochs] * epochs,
        images_per_s=20.0, predict_ms_per_image=12.0, trainable_parameters=11_689_512,
        total_parameters=11_689_512, device="cpu", precision="fp32", weights=_weights(weights_id),
        classes=CLASSES, data_root=data_root, config={"mode": mode, "seed": seed}, versions={},
        size_bytes=45_000_000, key="k" * 64, settings={}, complete=complete, created="2024-01-01T00:00:00")
    (folder / "metrics.json").write_text(record.dumps())
    if history:
        final = record.metrics["accuracy"]
        hist = [{"epoch": e, "train_loss": 1 / e, "train_acc": 1 - 0.4 / e, "val_loss": 1.2 / e,
                 "val_acc": best_val[1] if e == best_val[0] else final, "lr": 1e-3, "seconds": 1.0}
                for e in range(1, epochs + 1)]
        (folder / "history.json").write_text(json.dumps({"epochs": hist}))
    return folder / "metrics.json"


@pytest.fixture
def results(tmp_path, tiny_data):
    """A cache with 3 heads, a 3-seed fine-tuning run and a not-pretrained scratch run.

    8 val images. logistic: all right (best). ridge: 1 wrong (b=1, c=0, p=1: not different).
    sgd: 6 wrong (b=6, c=0, p=2/64: worse). finetune seeds: 2, 1, 0 wrong. scratch: 6 wrong.
    """
    cache = tmp_path / "cache"
    items = _val_items(tiny_data)
    root = str(tiny_data)
    feats = write_feature_cache(cache, tiny_data)
    write_head(cache, "logistic", items, (), data_root=root, features_path=feats, fit_seconds=0.2)
    write_head(cache, "ridge", items, (0,), data_root=root, features_path=feats)
    write_head(cache, "sgd", items, (0, 1, 2, 4, 5, 6), data_root=root, features_path=feats)
    for seed, wrong in ((0, (0, 4)), (1, (3,)), (2, ())):
        write_run(cache, "finetune", seed, items, wrong, data_root=root)
    write_run(cache, "scratch", 0, items, (0, 1, 2, 3, 4, 5), data_root=root, weights_id="random-seed0",
              pretrained=False)
    return cache, tiny_data, items


def _cfg(tmp_path, cache, **kw) -> CompareConfig:
    return CompareConfig(cache=str(cache), reports=str(tmp_path / "reports"), **kw)


def _no_figures(monkeypatch):
    monkeypatch.setattr(compare, "_figures", lambda *a, **k: {})


# --------------------------------------------------------------------------- McNemar


def _mcnemar_by_hand(b: int, c: int) -> float:
    """Reference: two-sided exact binomial test of b successes in n = b + c trials with p = 1/2."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    return min(1.0, 2 * sum(math.comb(n, i) * 0.5 ** n for i in range(k + 1)))


@pytest.mark.parametrize("b, c, expected", [
    (0, 0, 1.0),
    (1, 0, 1.0),  # 2 * 1/2 = 1
    (5, 0, 0.0625),  # 2 * 1/32
    (6, 0, 0.03125),  # 2 * 1/64: the smallest n with p < 0.05 when one side is 0
    (2, 8, 0.109375),  # 2 * (1 + 10 + 45) / 1024
    (8, 2, 0.109375),  # symmetric
    (10, 10, 1.0),
    (3, 12, 0.03515625),  # 2 * (1 + 15 + 105 + 455) / 32768
])
def test_mcnemar_exact_matches_hand_computed_binomial(b, c, expected):
    assert compare.mcnemar_exact(b, c) == pytest.approx(expected, abs=1e-12)
    assert compare.mcnemar_exact(b, c) == pytest.approx(_mcnemar_by_hand(b, c), abs=1e-12)


def test_mcnemar_agrees_with_scipy_on_larger_counts():
    binomtest = pytest.importorskip("scipy.stats").binomtest
    for b, c in ((17, 31), (40, 41), (0, 25), (120, 80)):
        assert compare.mcnemar_exact(b, c) == pytest.approx(binomtest(b, b + c, 0.5).pvalue, rel=1e-9)


def test_mcnemar_rejects_negative_counts():
    with pytest.raises(ValueError, match="discordant counts must be >= 0"):
        compare.mcnemar_exact(-1, 3)


# --------------------------------------------------------------------------- the report


def test_compare_table_significance_and_seeds(tmp_path, results, monkeypatch):
    _no_figures(monkeypatch)
    cache, data, items = results
    res = compare.run(_cfg(tmp_path, cache))
    by_label = {r.label: r for r in res.rows}
    assert [r.label for r in res.rows][0] == "logistic"
    assert res.best is by_label["logistic"] and by_label["logistic"].mark == "best"
    # ridge: one image only the best gets right -> b=1, c=0 -> p = 1.
    assert by_label["ridge"].discordant == (1, 0)
    assert by_label["ridge"].p_value == pytest.approx(1.0)
    assert by_label["ridge"].mark == "not significantly different"
    # sgd and scratch: six such images -> p = 2 / 2**6.
    for label in ("sgd", "scratch"):
        assert by_label[label].discordant == (6, 0)
        assert by_label[label].p_value == pytest.approx(_mcnemar_by_hand(6, 0))
        assert by_label[label].mark == "worse"
    # finetune: three seeds in one row, mean ± sample std; the test uses the median seed (seed 1).
    ft = by_label["finetune"]
    accs = [6 / 8, 7 / 8, 8 / 8]
    assert ft.seeds == 3
    assert ft.accuracy == pytest.approx(np.mean(accs))
    assert ft.accuracy_std == pytest.approx(np.std(accs, ddof=1))
    assert ft.representative.seed == 1 and ft.discordant == (1, 0)
    assert "± 0.125 (3 seeds)" in res.table
    # A head's total time: the full extraction (30 s) + its own fit.
    assert by_label["logistic"].total_seconds == pytest.approx(30.2)
    assert by_label["logistic"].train_seconds == pytest.approx(0.2)
    assert by_label["finetune"].total_seconds == pytest.approx(600.0)
    assert not res.excluded


def test_compare_writes_md_csv_json_and_every_figure(tmp_path, results):
    cache, data, items = results
    res = compare.run(_cfg(tmp_path, cache))
    reports = tmp_path / "reports"
    assert set(res.figures) == {"accuracy_vs_time", "learning_curves", "confusion", "predictions", "pca"}
    md = (reports / "compare.md").read_text()
    for name, path in res.figures.items():
        blob = Path(path).read_bytes()
        assert blob.startswith(PNG) and len(blob) > 5000, name
        assert f"(figures/{name}.png)" in md  # embedded by a path relative to the report
        assert (reports / "figures" / f"{name}.png").is_file()
    assert not list(reports.rglob("*.tmp-*")), "temporary files left behind"

    rows = list(csv.DictReader((reports / "compare.csv").open()))
    kinds = [r["row_type"] for r in rows]
    assert kinds.count("method") == 5
    seeds = sorted(r["seed"] for r in rows if r["row_type"] == "result" and r["method"] == "finetune")
    assert seeds == ["0", "1", "2"]
    method_rows = {r["label"]: r for r in rows if r["row_type"] == "method"}
    assert method_rows["sgd"]["vs_best"] == "worse"
    assert float(method_rows["sgd"]["mcnemar_p"]) == pytest.approx(0.03125)

    doc = json.loads((reports / "compare.json").read_text())
    assert doc["best"] == "logistic" and doc["alpha"] == 0.05
    ft = next(r for r in doc["rows"] if r["label"] == "finetune")
    assert [s["seed"] for s in ft["per_seed"]] == [0, 1, 2]
    assert doc["figures"]["pca"] == os.path.join("figures", "pca.png")


def test_not_pretrained_label_everywhere(tmp_path, results, monkeypatch):
    """Random-weights results say so in the table, CSV, JSON and figure labels."""
    cache, data, items = results
    seen = {}

    def spy(name):
        original = getattr(plots, name)

        def wrapper(*args, **kwargs):
            seen[name] = (args, kwargs)
            return original(*args, **kwargs)
        return wrapper

    for name in ("accuracy_vs_time", "learning_curves", "confusion_matrices"):
        monkeypatch.setattr(plots, name, spy(name))
    res = compare.run(_cfg(tmp_path, cache))
    reports = tmp_path / "reports"
    scratch = next(r for r in res.rows if r.method == "scratch")
    assert scratch.weights_label == "random-seed0 (not pretrained)"
    assert "random-seed0 (not pretrained)" in res.table
    assert "not pretrained" in res.summary()
    csv_row = next(r for r in csv.DictReader((reports / "compare.csv").open())
                   if r["row_type"] == "method" and r["method"] == "scratch")
    assert csv_row["weights"] == "random-seed0 (not pretrained)" and csv_row["pretrained"] == "False"
    doc = json.loads((reports / "compare.json").read_text())
    row = next(r for r in doc["rows"] if r["method"] == "scratch")
    assert row["weights"] == "random-seed0 (not pretrained)" and row["pretrained"] is False
    # Mixed weights: the not-pretrained point / curve / matrix carries the label itself.
    points = seen["accuracy_vs_time"][0][0]
    assert [p.label for p in points if "scratch" in p.label] == ["scratch (not pretrained)"]
    assert all("not pretrained" not in p.label for p in points if "scratch" not in p.label)
    assert any("not pretrained" in c.group for c in seen["learning_curves"][0][0])
    assert any("scratch (not pretrained)" in title for title, _ in seen["confusion_matrices"][0][0])


def test_all_not_pretrained_goes_into_figure_titles(tmp_path, tiny_data, monkeypatch):
    cache = tmp_path / "cache"
    items = _val_items(tiny_data)
    write_head(cache, "logistic", items, (), data_root=str(tiny_data), weights_id="random-seed0", pretrained=False)
    write_run(cache, "scratch", 0, items, (1,), data_root=str(tiny_data), weights_id="random-seed0",
              pretrained=False)
    seen = {}
    original = plots.accuracy_vs_time

    def spy(points, path, title_note=""):
        seen["note"] = title_note
        return original(points, path, title_note=title_note)

    monkeypatch.setattr(plots, "accuracy_vs_time", spy)
    res = compare.run(_cfg(tmp_path, cache))
    assert seen["note"] == " — weights random-seed0 (not pretrained)"
    assert "accuracy_vs_time" in res.figures


# --------------------------------------------------------------------------- never silently mixed


@pytest.mark.parametrize("change, reason", [
    ("data_root", "different data root"),
    ("classes", "different class list"),
    ("val_set", "different val images"),
])
def test_results_from_other_data_are_flagged_not_mixed(tmp_path, results, monkeypatch, change, reason):
    _no_figures(monkeypatch)
    cache, data, items = results
    kw = {"data_root": str(data)}
    if change == "data_root":
        kw["data_root"] = str(tmp_path / "other_data")
    elif change == "classes":
        kw["classes"] = ["bees", "ants"]
    else:
        kw["paths"] = [p for p, _ in items[:-1]] + ["val/bees/not_in_reference.jpg"]
    # The intruder is perfect on its own data: if mixed in, it would be "best".
    odd = write_head(cache, "intruder", items, (), **kw)
    with pytest.warns(UserWarning, match=reason):
        res = compare.run(_cfg(tmp_path, cache))
    assert "intruder" not in [r.label for r in res.rows]
    assert [r.source for r in res.excluded] == [str(odd)]
    assert reason in res.excluded[0].issue
    md = (tmp_path / "reports" / "compare.md").read_text()
    assert "Not compared" in md and reason in md
    assert "NOT COMPARED" in res.summary()
    excluded = [r for r in csv.DictReader((tmp_path / "reports" / "compare.csv").open())
                if r["row_type"] == "excluded"]
    assert len(excluded) == 1 and excluded[0]["comparable"] == "False" and reason in excluded[0]["issue"]
    assert json.loads((tmp_path / "reports" / "compare.json").read_text())["excluded"][0]["name"] == "intruder"


def test_data_option_selects_the_reference_and_refuses_unknown_roots(tmp_path, results, monkeypatch):
    _no_figures(monkeypatch)
    cache, data, items = results
    other = tmp_path / "other_data"
    other.mkdir()
    write_head(cache, "other_head", items, (), data_root=str(other))
    with pytest.warns(UserWarning):
        res = compare.run(_cfg(tmp_path, cache, data=str(other)))
    assert [r.label for r in res.rows] == ["other_head"]
    assert len(res.excluded) == 7
    with pytest.raises(UserError, match="no head or run result was measured on data root"):
        compare.run(_cfg(tmp_path, cache, data=str(tmp_path / "nowhere")))


def test_incomplete_and_unreadable_results_are_ignored_with_a_warning(tmp_path, results, monkeypatch):
    _no_figures(monkeypatch)
    cache, data, items = results
    write_run(cache, "finetune", 7, items, (), data_root=str(data), complete=False)
    (cache / "heads" / "broken.json").write_text("{not json")
    (cache / "heads" / "nometrics.json").write_text(json.dumps({"kind": "head", "name": "x"}))
    with pytest.warns(UserWarning) as record:
        res = compare.run(_cfg(tmp_path, cache))
    messages = " ".join(str(w.message) for w in record)
    assert "not complete" in messages and "broken.json" in messages and "nometrics.json" in messages
    assert len(res.skipped) == 3
    assert next(r for r in res.rows if r.label == "finetune").seeds == 3
    assert "Files ignored" in (tmp_path / "reports" / "compare.md").read_text()


def test_no_results_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no head or run results"):
        compare.run(_cfg(tmp_path, tmp_path / "empty"))


def test_alpha_out_of_range_is_a_user_error(tmp_path, results):
    with pytest.raises(UserError, match="alpha"):
        compare.run(_cfg(tmp_path, results[0], alpha=1.5))


def test_equal_accuracy_best_is_the_cheaper_one(tmp_path, tiny_data, monkeypatch):
    _no_figures(monkeypatch)
    cache = tmp_path / "cache"
    items = _val_items(tiny_data)
    write_run(cache, "finetune", 0, items, (1,), data_root=str(tiny_data), total_seconds=900)
    write_head(cache, "logistic", items, (2,), data_root=str(tiny_data))
    res = compare.run(_cfg(tmp_path, cache))
    assert res.best.label == "logistic"
    assert res.rows[1].discordant == (1, 1) and res.rows[1].mark == "not significantly different"


def test_same_method_on_other_weights_gets_distinct_labels(tmp_path, tiny_data, monkeypatch):
    _no_figures(monkeypatch)
    cache = tmp_path / "cache"
    items = _val_items(tiny_data)
    write_head(cache, "logistic", items, (), data_root=str(tiny_data))
    path = write_head(cache, "logistic", items, (1, 2), data_root=str(tiny_data), weights_id="random-seed0",
                      pretrained=False)
    path.rename(path.with_name("logistic-random.json"))
    write_head(cache, "logistic", items, (), data_root=str(tiny_data))
    res = compare.run(_cfg(tmp_path, cache))
    assert sorted(r.label for r in res.rows) == ["logistic [imagenet]", "logistic [random-seed0 (not pretrained)]"]


# --------------------------------------------------------------------------- figures on their own


def test_prediction_grid_survives_missing_images(tmp_path, tiny_data):
    items = _val_items(tiny_data)
    y = [label for _, label in items]
    preds = {"y_true": y, "y_pred": _predict(y, (0, 5)), "paths": [p for p, _ in items]}
    (tiny_data / items[0][0]).unlink()
    with pytest.warns(UserWarning, match="1 val image"):
        out = plots.prediction_grid(preds, CLASSES, [str(tmp_path / "moved"), str(tiny_data)],
                                    str(tmp_path / "grid.png"))
    assert Path(out).read_bytes().startswith(PNG)
    assert plots._grid_order(y, preds["y_pred"], None, 4, 2)[:2] == [0, 5]  # misclassified first


def test_figure_functions_skip_empty_inputs(tmp_path):
    out = str(tmp_path / "x.png")
    assert plots.accuracy_vs_time([], out) is None
    assert plots.learning_curves([plots.Curve("a", "a", {"epochs": []})], out) is None
    assert plots.confusion_matrices([], CLASSES, out) is None
    assert plots.prediction_grid({"y_true": [], "y_pred": []}, CLASSES, [], out) is None
    assert plots.feature_pca([], CLASSES, out) is None
    assert not os.path.exists(out)


# --------------------------------------------------------------------------- CLI


def test_cli_compare_prints_the_table(tmp_path, results, monkeypatch, capsys):
    _no_figures(monkeypatch)
    cache, data, items = results
    code = cli.main(["compare", "--cache", str(cache), "--reports", str(tmp_path / "rep"), "--alpha", "0.01"])
    out = capsys.readouterr().out
    assert code == 0
    assert "| logistic" in out and "**best**" in out and "not pretrained" in out
    assert (tmp_path / "rep" / "compare.md").is_file()
    assert cli.main(["compare", "--cache", str(tmp_path / "none"), "--reports", str(tmp_path / "r")]) == 2
    assert "no head or run results" in capsys.readouterr().err
    (cache / "heads" / "broken.json").write_text("{")
    assert cli.main(["compare", "--cache", str(cache), "--reports", str(tmp_path / "rep")]) == 0
    err = capsys.readouterr().err
    assert err.startswith("warning: ignoring ") and "broken.json" in err and "Traceback" not in err


def test_cli_compare_help_lists_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["compare", "--help"])
    out = capsys.readouterr().out
    for option in ("--cache", "--reports", "--data", "--alpha"):
        assert option in out
