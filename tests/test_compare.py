"""Stage 4 (compare): table, which wins (all pairs), the data-size curve, figures, the report
written as one set, and refusal to mix results from other data.

Every input is a small synthetic result file written here following the schemas that
``heads`` (cache/heads/*.json) and ``finetune`` (cache/runs/<mode>[-<seed>]/metrics.json)
produce, so these tests need neither stage.
"""
from __future__ import annotations

import csv
import errno
import json
import os
import warnings
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import pytest

from pipeline import cli, files, metrics
from pipeline.compare import stage as compare, report, plots
from pipeline.features import store
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


def write_feature_cache(cache: Path, data: Path, weights_id="imagenet", pretrained=True, views=0) -> str:
    rng = np.random.default_rng(0)
    splits = {}
    for split in ("train", "val"):
        rows, labels = [], []
        for label, name in enumerate(CLASSES):
            for f in sorted((data / split / name).iterdir()):
                feat = (rng.normal(0, 1, 512) + 3 * label).astype(np.float32)
                rows.append(store.Row(f"{split}/{name}/{f.name}", "0" * 40, 1, 1, feat,
                                      views=np.repeat(feat[None], views, 0) if views and split == "train" else None))
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
               fit_seconds=0.5, paths: Optional[List[str]] = None, used_views=False) -> Path:
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
        sha256="0" * 64, size_bytes=1000, versions={}, created="2024-01-01T00:00:00", used_views=used_views,
        has_proba=False, settings={})
    path = cache / "heads" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(record.dumps())
    return path


def write_run(cache: Path, mode: str, seed: int, items, wrong=(), *, data_root: str, weights_id="imagenet",
              pretrained=True, total_seconds=600.0, complete=True, history=True, name=None,
              best_val=(4, 0.9), train_per_class=0, settings=None, device="cpu", eval_seconds=0.0,
              correct_paths=None) -> Path:
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
        total_parameters=11_689_512, device=device, precision="fp32", weights=_weights(weights_id),
        classes=CLASSES, data_root=data_root, config={"mode": mode, "seed": seed}, versions={},
        size_bytes=45_000_000, key="k" * 64, settings=settings or {}, complete=complete,
        created="2024-01-01T00:00:00", eval_seconds=eval_seconds)
    (folder / "metrics.json").write_text(record.dumps())
    if history:
        final = record.metrics["accuracy"]
        hist = [{"epoch": e, "train_loss": 1 / e, "train_acc": 1 - 0.4 / e, "val_loss": 1.2 / e,
                 "val_acc": best_val[1] if e == best_val[0] else final, "lr": 1e-3, "seconds": 1.0}
                for e in range(1, epochs + 1)]
        (folder / "history.json").write_text(json.dumps({"epochs": hist}))
    return folder / "metrics.json"


def _items(n_per_class: int = 20):
    """Synthetic val items (no image files): ``n_per_class`` per class, ants first."""
    return [(f"val/{c}/img_{i:03d}.jpg", label) for label, c in enumerate(CLASSES) for i in range(n_per_class)]


@pytest.fixture
def results(tmp_path, tiny_data):
    """A cache with 3 heads, a 3-seed fine-tuning run and a not-pretrained scratch run on 40 val images.

    logistic: all right; ridge: 1 wrong; sgd: 14 wrong; finetune seeds 0/1/2: 2/1/0 wrong (the
    tests use seed 0); scratch: 14 wrong. Pairs with 14 discordant images one way give raw
    p = 2/2**14, significant after Holm over the 10 pairs; every other pair is not.
    """
    cache = tmp_path / "cache"
    items = _items()
    root = str(tiny_data)
    feats = write_feature_cache(cache, tiny_data)
    write_head(cache, "logistic", items, (), data_root=root, features_path=feats, fit_seconds=0.2)
    write_head(cache, "ridge", items, (0,), data_root=root, features_path=feats)
    write_head(cache, "sgd", items, range(14), data_root=root, features_path=feats)
    for seed, wrong in ((0, (0, 4)), (1, (3,)), (2, ())):
        write_run(cache, "finetune", seed, items, wrong, data_root=root)
    write_run(cache, "scratch", 0, items, range(14), data_root=root, weights_id="random-seed0", pretrained=False)
    return cache, tiny_data, items


def _cfg(tmp_path, cache, **kw) -> CompareConfig:
    kw.setdefault("curve", False)
    return CompareConfig(cache=str(cache), reports=str(tmp_path / "reports"), **kw)


def _report(tmp_path, name="compare.md") -> Path:
    return tmp_path / "reports" / "compare" / name


# --------------------------------------------------------------------------- which wins


def test_top_group_by_all_pairs_holm_and_the_cheapest_is_recommended(tmp_path, results):
    cache, data, items = results
    res = compare.run(_cfg(tmp_path, cache, figures=False))
    by = {r.label: r for r in res.rows}
    assert {r.label for r in res.rows if r.top} == {"logistic", "ridge", "finetune"}
    assert res.recommended is by["logistic"] and by["logistic"].recommended  # 30.2 s < 30.5 s < 600 s
    assert [r.label for r in res.rows][:3] == ["logistic", "ridge", "finetune"]  # top group, cheapest first
    assert by["sgd"].beaten_by == ["logistic", "ridge", "finetune"]
    assert by["scratch"].beaten_by == ["logistic", "ridge", "finetune"]
    pairs = {(res.pairwise.names[t.i], res.pairwise.names[t.j]): t for t in res.pairwise.tests}
    t = pairs[("logistic", "sgd")]
    assert (t.b, t.c, t.p) == (14, 0, 2 / 2 ** 14) and t.winner == res.pairwise.names.index("logistic")
    assert pairs[("logistic", "ridge")].p_adjusted == 1.0
    # finetune: three seeds in one row, mean ± sample std; the tests use every seed.
    ft = by["finetune"]
    accs = [38 / 40, 39 / 40, 40 / 40]
    assert ft.seeds == 3 and ft.representative.seed == 0
    assert ft.accuracy == pytest.approx(np.mean(accs)) and ft.accuracy_std == pytest.approx(np.std(accs, ddof=1))
    # Seed-averaged discordance: images 0, 3, 4 are each wrong in one seed of three: 3 x 1/3 = 1.
    assert (pairs[("logistic", "finetune")].b, pairs[("logistic", "finetune")].c) == (1, 0)
    assert "± 0.025 (3 seeds)" in res.table and "**top group, recommended**" in res.table
    # A head's total time: the full extraction (30 s) + its own fit.
    assert by["logistic"].total_seconds == pytest.approx(30.2) and by["finetune"].total_seconds == 600.0
    # compare.json: every pair with b, c, raw and adjusted p; csv: the same rule.
    doc = json.loads(_report(tmp_path, "compare.json").read_text())
    assert len(doc["pairs"]) == 10 and doc["recommended"] == "logistic"
    assert doc["top_group"] == ["logistic", "ridge", "finetune"]
    pair = next(p for p in doc["pairs"] if {p["a"], p["b_label"]} == {"logistic", "sgd"})
    assert (pair["b"], pair["c"], pair["p_raw"]) == (14, 0, 2 / 2 ** 14) and pair["winner"] == "logistic"
    assert pair["p_adjusted"] == pytest.approx(10 * 2 / 2 ** 14)  # the smallest of 10 raw p's (tied): x10
    rows = list(csv.DictReader(_report(tmp_path, "compare.csv").open()))
    assert sum(r["row_type"] == "pair" for r in rows) == 10
    method = {r["label"]: r for r in rows if r["row_type"] == "method"}
    assert method["sgd"]["top_group"] == "False" and method["logistic"]["recommended"] == "True"
    assert method["finetune"]["tested_seeds"] == "0;1;2"
    assert not res.excluded


def test_best_val_epoch_is_shown_apart_labelled_and_never_ranked_tested_or_plotted(tmp_path, tiny_data,
                                                                                    monkeypatch):
    """A planted history: the run's best val epoch (0.99 at epoch 2) beats its final epoch, which is
    worse than a head. The result is the final epoch everywhere; 0.99 only in its own column."""
    cache = tmp_path / "cache"
    items = _items()
    write_head(cache, "logistic", items, range(4), data_root=str(tiny_data))
    write_run(cache, "finetune", 0, items, range(10), data_root=str(tiny_data), best_val=(2, 0.99))
    seen = {}
    original = plots.accuracy_vs_time
    monkeypatch.setattr(plots, "accuracy_vs_time", lambda pts, p, **kw: seen.setdefault("points", pts) and None)
    res = compare.run(_cfg(tmp_path, cache))
    ft = next(r for r in res.rows if r.method == "finetune")
    assert ft.accuracy == 30 / 40 and ft.best_val == (0.99, [2])
    assert res.recommended.label == "logistic" and [r.label for r in res.rows] == ["logistic", "finetune"]
    header, _sep, *lines = res.table.splitlines()
    assert "best epoch on val: chosen on val, optimistic" in header
    ft_line = next(line for line in lines if "finetune" in line).split("|")
    assert ft_line[3].strip() == "0.750" and ft_line[-2].strip() == "0.990 (epoch 2)"
    assert {round(p.accuracy, 3) for p in seen["points"]} == {0.9, 0.75}  # never 0.99
    md = _report(tmp_path).read_text()
    assert "chosen on val, optimistic" in md and "never ranked, tested or plotted" in md
    doc = json.loads(_report(tmp_path, "compare.json").read_text())
    row = next(r for r in doc["rows"] if r["method"] == "finetune")
    assert row["accuracy"] == 0.75 and row["best_val_acc_chosen_on_val"] == 0.99
    del original


def test_runs_on_k_images_per_class_are_curve_points_not_table_rows(tmp_path, tiny_data):
    cache = tmp_path / "cache"
    items = _val_items(tiny_data)
    feats = write_feature_cache(cache, tiny_data)
    for name in ("logistic", "ridge"):
        write_head(cache, name, items, (), data_root=str(tiny_data), features_path=feats)
    for seed in (0, 1):
        write_run(cache, "fixed", seed, items, (seed,), data_root=str(tiny_data), train_per_class=2,
                  name=f"fixed-k2-{seed}")
    res = compare.run(_cfg(tmp_path, cache, curve=True, figures=False))
    assert [r.label for r in res.rows] == ["logistic", "ridge"]
    curve = res.curve
    assert curve.curve.ks == [1, 2, 4, 6] and curve.curve.heads == ["logistic", "ridge"]
    e2e = next(s for s in curve.series if s.kind == "run")
    assert (e2e.label, list(e2e.k), e2e.n) == ("fixed", [2], [2])
    assert e2e.mean[0] == pytest.approx(7 / 8) and e2e.std[0] == 0.0
    at2 = next(c for c in curve.cheapest if c["k"] == 2)
    assert "fixed (end-to-end)" in at2["top_group"]
    assert curve.sentence.startswith("Data-size curve: the cheapest method non-inferior to the most accurate within "
                                     "3 points (tested separately at each k")
    doc = json.loads(_report(tmp_path, "compare.json").read_text())["data_size_curve"]
    assert doc["ks"] == [1, 2, 4, 6] and len(doc["heads"]["ridge"]) == 4 and doc["end_to_end"]["fixed"][0]["k"] == 2
    assert doc["heads"]["ridge"][1]["n_subsets"] == 5
    rows = list(csv.DictReader(_report(tmp_path, "compare.csv").open()))
    assert sum(r["row_type"] == "curve" for r in rows) == 2 * 4 + 1
    assert "## Data-size curve" in _report(tmp_path).read_text()


def test_curve_runs_at_any_k_are_tested_at_their_own_cost_and_heads_of_one_name_stay_apart(tmp_path, tiny_data):
    cache = tmp_path / "cache"
    items = _val_items(tiny_data)
    feats = write_feature_cache(cache, tiny_data)
    write_head(cache, "logistic", items, (), data_root=str(tiny_data), features_path=feats, extract_seconds=20.0)
    other = write_head(cache, "logistic", items, (1,), data_root=str(tiny_data), features_path=feats)
    other.rename(other.with_name("logistic-again.json"))
    write_head(cache, "logistic", items, (), data_root=str(tiny_data), features_path=feats, extract_seconds=20.0)
    for seed in (0, 1, 2):  # k = 3: not a power of two
        write_run(cache, "fixed", seed, items, (seed,), data_root=str(tiny_data), train_per_class=3,
                  name=f"fixed-k3-{seed}", total_seconds=50.0, eval_seconds=10.0)
    res = compare.run(_cfg(tmp_path, cache, curve=True, figures=False))
    curve = res.curve
    assert 3 in curve.curve.ks
    heads = [s.label for s in curve.series if s.kind == "head"]
    assert len(heads) == 2 and len(set(heads)) == 2  # two rows, two series
    at3 = next(c for c in curve.cheapest if c["k"] == 3)
    assert "fixed (end-to-end)" in at3["top_group"]
    # A head's cost at k: extraction of its 6 train images (20 s over 20 images) + its fit at k=3.
    j = curve.curve.ks.index(3)
    fit = curve.curve.fit_seconds[0, j]
    assert at3["costs"][heads[0]] == pytest.approx(20.0 * 6 / 20 + fit)
    assert at3["costs"]["fixed (end-to-end)"] == pytest.approx(40.0)  # its training, val passes apart
    assert "tested separately at each k" in curve.sentence


# --------------------------------------------------------------------------- the report and figures


def test_compare_writes_md_csv_json_and_every_figure(tmp_path, tiny_data):
    cache = tmp_path / "cache"
    items = _val_items(tiny_data)
    root = str(tiny_data)
    feats = write_feature_cache(cache, tiny_data)
    write_head(cache, "logistic", items, (), data_root=root, features_path=feats, fit_seconds=0.2)
    write_head(cache, "ridge", items, (0,), data_root=root, features_path=feats)
    for seed, wrong in ((0, (0, 4)), (1, (3,))):
        write_run(cache, "finetune", seed, items, wrong, data_root=root)
    res = compare.run(_cfg(tmp_path, cache, curve=True))
    target = tmp_path / "reports" / "compare"
    assert set(res.figures) == {"accuracy_vs_time", "pairwise", "data_size", "learning_curves", "confusion",
                                "predictions", "pca"}
    md = (target / "compare.md").read_text()
    for name, path in res.figures.items():
        blob = Path(path).read_bytes()
        assert blob.startswith(PNG) and len(blob) > 5000, name
        assert f"(figures/{name}.png)" in md  # embedded by a path relative to the report
        assert Path(path).parent == target / "figures"
    assert target.is_symlink() and not list((tmp_path / "reports").rglob("*.tmp-*"))
    hidden = [p.name for p in (tmp_path / "reports").iterdir() if p.name.startswith(".compare-")]
    assert hidden == [os.readlink(target)]  # only the published set: no leftovers
    doc = json.loads((target / "compare.json").read_text())
    assert doc["figures"]["pca"] == "figures/pca.png" and doc["seeds_rule"].endswith("use every seed")


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

    for name in ("accuracy_vs_time", "learning_curves", "confusion_matrices", "pairwise_heatmap"):
        monkeypatch.setattr(plots, name, spy(name))
    with pytest.warns(UserWarning, match="val image"):  # synthetic paths: grey tiles in the grid
        res = compare.run(_cfg(tmp_path, cache))
    scratch = next(r for r in res.rows if r.method == "scratch")
    assert scratch.weights_label == "random-seed0 (not pretrained)"
    assert "random-seed0 (not pretrained)" in res.table
    assert "not pretrained" in res.summary()
    csv_row = next(r for r in csv.DictReader(_report(tmp_path, "compare.csv").open())
                   if r["row_type"] == "method" and r["method"] == "scratch")
    assert csv_row["weights"] == "random-seed0 (not pretrained)" and csv_row["pretrained"] == "False"
    doc = json.loads(_report(tmp_path, "compare.json").read_text())
    row = next(r for r in doc["rows"] if r["method"] == "scratch")
    assert row["weights"] == "random-seed0 (not pretrained)" and row["pretrained"] is False
    # Mixed weights: the not-pretrained point / curve / matrix / heatmap label carries the label itself.
    points = seen["accuracy_vs_time"][0][0]
    assert [p.label for p in points if "scratch" in p.label] == ["scratch (not pretrained)"]
    assert all("not pretrained" not in p.label for p in points if "scratch" not in p.label)
    assert any("not pretrained" in c.group for c in seen["learning_curves"][0][0])
    assert any("scratch (not pretrained)" in title for title, _ in seen["confusion_matrices"][0][0])
    assert "scratch (not pretrained)" in seen["pairwise_heatmap"][0][0]


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
def test_results_from_other_data_are_flagged_not_mixed(tmp_path, results, change, reason):
    cache, data, items = results
    kw = {"data_root": str(data)}
    if change == "data_root":
        kw["data_root"] = str(tmp_path / "other_data")
    elif change == "classes":
        kw["classes"] = ["bees", "ants"]
    else:
        kw["paths"] = [p for p, _ in items[:-1]] + ["val/bees/not_in_reference.jpg"]
    # The intruder is perfect on its own data: if mixed in, it would be in the top group.
    odd = write_head(cache, "intruder", items, (), **kw)
    with pytest.warns(UserWarning, match=reason):
        res = compare.run(_cfg(tmp_path, cache, figures=False))
    assert "intruder" not in [r.label for r in res.rows]
    assert [r.source for r in res.excluded] == [str(odd)]
    assert reason in res.excluded[0].issue
    md = _report(tmp_path).read_text()
    assert "Not compared" in md and reason in md
    assert "NOT COMPARED" in res.summary()
    excluded = [r for r in csv.DictReader(_report(tmp_path, "compare.csv").open()) if r["row_type"] == "excluded"]
    assert len(excluded) == 1 and excluded[0]["comparable"] == "False" and reason in excluded[0]["issue"]
    assert json.loads(_report(tmp_path, "compare.json").read_text())["excluded"][0]["name"] == "intruder"


def test_data_option_selects_the_reference_and_refuses_unknown_roots(tmp_path, results):
    cache, data, items = results
    other = tmp_path / "other_data"
    other.mkdir()
    write_head(cache, "other_head", items, (), data_root=str(other))
    with pytest.warns(UserWarning):
        res = compare.run(_cfg(tmp_path, cache, data=str(other), figures=False))
    assert [r.label for r in res.rows] == ["other_head"]
    assert len(res.excluded) == 7
    with pytest.raises(UserError, match="no head or run result was measured on data root"):
        compare.run(_cfg(tmp_path, cache, data=str(tmp_path / "nowhere")))


def test_incomplete_and_unreadable_results_are_ignored_with_a_warning(tmp_path, results):
    cache, data, items = results
    write_run(cache, "finetune", 7, items, (), data_root=str(data), complete=False)
    (cache / "heads" / "broken.json").write_text("{not json")
    (cache / "heads" / "nometrics.json").write_text(json.dumps({"kind": "head", "name": "x"}))
    with pytest.warns(UserWarning) as record:
        res = compare.run(_cfg(tmp_path, cache, figures=False))
    messages = " ".join(str(w.message) for w in record)
    assert "not complete" in messages and "broken.json" in messages and "nometrics.json" in messages
    assert len(res.skipped) == 3
    assert next(r for r in res.rows if r.label == "finetune").seeds == 3
    assert "Files ignored" in _report(tmp_path).read_text()


def test_no_results_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no head or run results"):
        compare.run(_cfg(tmp_path, tmp_path / "empty"))


def test_alpha_out_of_range_is_a_user_error(tmp_path, results):
    with pytest.raises(UserError, match="alpha"):
        compare.run(_cfg(tmp_path, results[0], alpha=1.5))


def test_equal_accuracy_recommends_the_cheaper_one(tmp_path, tiny_data):
    cache = tmp_path / "cache"
    items = _val_items(tiny_data)
    write_run(cache, "finetune", 0, items, (1,), data_root=str(tiny_data), total_seconds=900)
    write_head(cache, "logistic", items, (2,), data_root=str(tiny_data))
    res = compare.run(_cfg(tmp_path, cache, figures=False))
    assert res.recommended.label == "logistic" and all(r.top for r in res.rows)
    assert res.pairwise.tests[0].b == res.pairwise.tests[0].c == 1


def test_same_method_on_other_weights_gets_distinct_labels(tmp_path, tiny_data):
    cache = tmp_path / "cache"
    items = _val_items(tiny_data)
    write_head(cache, "logistic", items, (), data_root=str(tiny_data))
    path = write_head(cache, "logistic", items, (1, 2), data_root=str(tiny_data), weights_id="random-seed0",
                      pretrained=False)
    path.rename(path.with_name("logistic-random.json"))
    write_head(cache, "logistic", items, (), data_root=str(tiny_data))
    res = compare.run(_cfg(tmp_path, cache, figures=False))
    assert sorted(r.label for r in res.rows) == ["logistic [imagenet]", "logistic [random-seed0 (not pretrained)]"]


# --------------------------------------------------------------------------- effect sizes and the margin


def _gap_cache(tmp_path, tiny_data, *, head_device="cpu", run_device="cpu"):
    """154 val images: finetune (600 s) gets 4 wrong; ridge (30.5 s) 12: 8 images worse, none the other way."""
    cache = tmp_path / "cache"
    items = _items(77)
    feats = write_feature_cache(cache, tiny_data)
    write_run(cache, "finetune", 0, items, range(4), data_root=str(tiny_data), device=run_device)
    write_head(cache, "ridge", items, range(12), data_root=str(tiny_data), features_path=feats)
    return cache, items


def test_eight_images_apart_the_answer_gives_the_gap_its_ci_and_the_margin_decision(tmp_path, tiny_data):
    cache, items = _gap_cache(tmp_path, tiny_data)
    res = compare.run(_cfg(tmp_path, cache, figures=False))
    by = {r.label: r for r in res.rows}
    assert res.pairwise.tests[0].p == pytest.approx(2 / 2 ** 8)  # exact McNemar, 8 vs 0
    gap = by["ridge"].gap
    assert gap.diff == pytest.approx(-8 / 154)
    assert (gap.low, gap.high) == pytest.approx(metrics.paired_difference_ci(142, 0, 8, 4))
    assert by["finetune"].best and by["finetune"].recommended and not by["ridge"].noninferior
    answer = res.decision and report.answer(res.decision)
    assert answer[0].startswith("Answer: **finetune**")
    assert f"{gap.diff:+.3f} [95% CI {gap.low:+.3f}, {gap.high:+.3f}]" in answer[0]
    assert "no cheaper method is certified within 3 points" in answer[0] or "shown worse" in answer[0]
    assert answer[1].startswith("Val size: certifying ridge within 3 points of finetune")
    n_equal = metrics.noninferior_sample_size(8 / 154, 0.03)
    assert f"needs about {n_equal} val images" in answer[1] and "this val set has 154" in answer[1]
    md = _report(tmp_path).read_text()
    assert answer[0] in md and "Δ to most accurate [95% CI]" in md
    assert "the recommendation itself, though, is a choice made on val" in md.lower()
    doc = json.loads(_report(tmp_path, "compare.json").read_text())
    assert doc["margin"] == 0.03 and doc["most_accurate"] == "finetune" and doc["recommended"] == "finetune"
    pair = doc["pairs"][0]
    assert {pair["a"], pair["b_label"]} == {"ridge", "finetune"}
    sign = 1 if pair["a"] == "finetune" else -1
    assert pair["difference"] == pytest.approx(sign * 8 / 154)
    assert pair["difference_ci95_low"] < pair["difference"] < pair["difference_ci95_high"]
    row = next(r for r in doc["rows"] if r["label"] == "ridge")
    assert (row["gap_to_best"], row["gap_ci95_low"], row["gap_ci95_high"]) == pytest.approx(
        (gap.diff, gap.low, gap.high))
    assert doc["val_size"]["images_if_equal"] == n_equal
    method = {r["label"]: r for r in csv.DictReader(_report(tmp_path, "compare.csv").open())
              if r["row_type"] == "method"}
    assert float(method["ridge"]["gap_ci95_low"]) == pytest.approx(gap.low)


@pytest.mark.parametrize("margin, expected", [(0.03, "finetune"), (0.15, "ridge")])
def test_the_cheapest_method_non_inferior_within_the_margin_is_the_answer(tmp_path, tiny_data, margin, expected):
    cache, _ = _gap_cache(tmp_path, tiny_data)
    res = compare.run(_cfg(tmp_path, cache, figures=False, margin=margin))
    assert res.recommended.label == expected
    ridge = next(r for r in res.rows if r.label == "ridge")
    assert ridge.noninferior == (ridge.gap.low > -margin) == (expected == "ridge")
    line = report.answer(res.decision)[0]
    assert f"{ridge.gap.diff:+.3f} [95% CI {ridge.gap.low:+.3f}, {ridge.gap.high:+.3f}]" in line
    if expected == "ridge":
        assert "the cheapest method non-inferior to the most accurate, finetune" in line


def test_the_answer_says_when_times_come_from_different_devices(tmp_path, tiny_data):
    cache, _ = _gap_cache(tmp_path, tiny_data, run_device="cuda:0")
    res = compare.run(_cfg(tmp_path, cache, figures=False))
    assert "different devices (cpu, cuda:0)" in report.answer(res.decision)[0]


@pytest.mark.parametrize("margin", [0.0, 1.0, -0.1])
def test_margin_out_of_range_is_a_user_error(tmp_path, results, margin, capsys):
    with pytest.raises(UserError, match="margin"):
        compare.run(_cfg(tmp_path, results[0], margin=margin))
    assert cli.main(["compare", "--cache", str(results[0]), "--margin", str(margin)]) == 2
    err = capsys.readouterr().err
    assert "--margin" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_multi_seed_row_is_tested_on_every_seed_not_the_lowest(tmp_path, tiny_data):
    # logistic: 8 of 40 wrong. finetune seed 0: those 8 + 10 more wrong (alone: beaten by logistic,
    # McNemar 10 vs 0, p = 0.002); seeds 1 and 2: 4 of logistic's wrong images right. Mean: 40 - 14.67.
    cache = tmp_path / "cache"
    items = _items()
    root = str(tiny_data)
    write_head(cache, "logistic", items, range(8), data_root=root)
    write_run(cache, "finetune", 0, items, range(18), data_root=root)
    for seed in (1, 2):
        write_run(cache, "finetune", seed, items, range(4, 8), data_root=root)
    res = compare.run(_cfg(tmp_path, cache, figures=False))
    by = {r.label: r for r in res.rows}
    from pipeline.metrics import mcnemar_exact
    assert mcnemar_exact(0, 10) < 0.05  # the lowest seed alone: logistic beats finetune
    assert by["finetune"].accuracy < by["logistic"].accuracy + 0.01
    assert by["finetune"].top and by["logistic"].top and not by["finetune"].beaten_by
    assert by["finetune"].gap is not None and len(by["finetune"].results) == 3


def test_runs_that_differ_in_a_training_setting_are_separate_rows(tmp_path, tiny_data):
    cache = tmp_path / "cache"
    items = _items()
    root = str(tiny_data)
    base = {"backbone": "resnet18", "lr": 1e-3, "batch_size": 4, "momentum": 0.9, "weight_decay": 0.0,
            "step_size": 7, "gamma": 0.1, "bn": "frozen-eval", "trainable_from": None, "precision": "fp32"}
    write_run(cache, "finetune", 0, items, (), data_root=root, settings=base, name="finetune-a")
    write_run(cache, "finetune", 1, items, (1,), data_root=root, settings=base, name="finetune-a-1")
    write_run(cache, "finetune", 0, items, (2,), data_root=root, settings=dict(base, lr=1e-2), name="finetune-b")
    res = compare.run(_cfg(tmp_path, cache, figures=False))
    assert sorted((r.label, r.seeds) for r in res.rows) == [("finetune lr=0.001", 2), ("finetune lr=0.01", 1)]


def test_the_same_setting_and_seed_twice_counts_once_with_a_warning(tmp_path, tiny_data):
    cache = tmp_path / "cache"
    items = _items()
    write_run(cache, "finetune", 0, items, (), data_root=str(tiny_data), name="finetune")
    write_run(cache, "finetune", 0, items, (), data_root=str(tiny_data), name="finetune-0a1b2c3d")
    with pytest.warns(UserWarning, match="same setting and seed 0"):
        res = compare.run(_cfg(tmp_path, cache, figures=False))
    assert [r.seeds for r in res.rows] == [1]


def test_augmented_views_are_charged_only_to_the_heads_trained_on_them(tmp_path, tiny_data):
    cache = tmp_path / "cache"
    items = _val_items(tiny_data)
    feats = write_feature_cache(cache, tiny_data, views=3)
    meta = store.read_meta(feats)["splits"]
    n_all, n_train = meta["train"]["n"] + meta["val"]["n"], meta["train"]["n"]
    write_head(cache, "logistic", items, (), data_root=str(tiny_data), features_path=feats, fit_seconds=0.0)
    path = write_head(cache, "logistic", items, (), data_root=str(tiny_data), features_path=feats,
                      fit_seconds=0.0, used_views=True)
    path.rename(path.with_name("logistic-views.json"))
    write_head(cache, "logistic", items, (), data_root=str(tiny_data), features_path=feats, fit_seconds=0.0)
    res = compare.run(_cfg(tmp_path, cache, figures=False))
    by = {r.results[0].used_views: r for r in res.rows}
    assert by[True].total_seconds == pytest.approx(30.0) and "+views" in by[True].label
    assert by[False].total_seconds == pytest.approx(30.0 * n_all / (n_all + 3 * n_train))


def test_val_passes_are_shown_apart_and_not_charged(tmp_path, tiny_data):
    cache = tmp_path / "cache"
    write_run(cache, "finetune", 0, _items(), (), data_root=str(tiny_data), total_seconds=600, eval_seconds=100)
    res = compare.run(_cfg(tmp_path, cache, figures=False))
    row = res.rows[0]
    assert (row.total_seconds, row.eval_seconds) == (500, 100)
    assert "val passes (not charged)" in res.table


# --------------------------------------------------------------------------- one set or nothing


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _quiet_run(cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # synthetic val paths: grey tiles in the prediction grid
        return compare.run(cfg)


@pytest.mark.parametrize("figures", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_a_full_disk_at_any_write_step_leaves_the_previous_report_whole(tmp_path, results, monkeypatch, figures):
    """ENOSPC at each write of the set (csv, json, md, and with figures every figure; the link;
    the switch): the command is a one-line user error and the previous report stays
    byte-identical, with no leftovers beside it. (Without figures: the same writer, 3 writes.)"""
    cache, data, items = results
    _quiet_run(_cfg(tmp_path, cache, figures=figures))
    target = tmp_path / "reports" / "compare"
    before = _snapshot(target)
    assert {"compare.md", "compare.csv", "compare.json"} | ({"figures/pairwise.png"} if figures else set()) \
        <= set(before)
    write_head(cache, "ridge", items, (0, 1, 2), data_root=str(data), features_path=store_path(cache))
    real_write, real_symlink, real_replace = files.atomic_write, os.symlink, os.replace

    def full_disk(real, nth, when=lambda *a: True):
        calls = [0]

        def fake(*args, **kwargs):
            if when(*args):
                calls[0] += 1
                if calls[0] == nth:
                    raise OSError(errno.ENOSPC, "No space left on device")
            return real(*args, **kwargs)
        return fake, calls

    def attempt() -> bool:
        try:
            _quiet_run(_cfg(tmp_path, cache, figures=figures))
            return True
        except UserError as exc:
            assert "previous report" in str(exc) and "unchanged" in str(exc) and "\n" not in str(exc)
            return False
        finally:
            monkeypatch.undo()

    def unchanged(snapshot, link) -> None:
        assert _snapshot(target) == snapshot and os.readlink(target) == link
        assert [p.name for p in (tmp_path / "reports").iterdir() if p.name.startswith(".compare-")] == [link]

    link = os.readlink(target)
    n = 1
    while True:  # the n-th write of the set fails, for n = 1, 2, ... until a run needs fewer writes
        fake, _calls = full_disk(real_write, n)
        for owner in (files, report, plots):
            monkeypatch.setattr(owner, "atomic_write", fake)
        if attempt():
            break
        unchanged(before, link)
        n += 1
    assert n - 1 == (9 if figures else 3)  # csv + json + md (+ 6 figures) each failed once
    assert "ridge" in _report(tmp_path).read_text() and _snapshot(target) != before
    before, link = _snapshot(target), os.readlink(target)
    for name, fake in (("symlink", full_disk(real_symlink, 1)[0]),
                       ("replace", full_disk(real_replace, 1, lambda src, dst: str(dst) == str(target))[0])):
        monkeypatch.setattr(os, name, fake)
        assert not attempt(), name
        unchanged(before, link)


def store_path(cache: Path) -> str:
    return str(next((cache / "features").glob("*.h5")))


# --------------------------------------------------------------------------- figures on their own


def test_prediction_grid_draws_missing_tiles_grey(tmp_path):
    y = [0, 0, 1, 1, 0, 1]
    preds = {"y_true": y, "y_pred": [1, 0, 1, 0, 0, 1], "paths": [f"val/x/{i}.jpg" for i in range(6)]}
    order = plots.grid_order(y, preds["y_pred"], None, 4, 2)
    assert order[:2] == [0, 3]  # misclassified first
    tiles = {i: (np.full((16, 16, 3), 120, np.uint8) if i else None) for i in order}
    out = plots.prediction_grid(preds, CLASSES, tiles, str(tmp_path / "grid.png"))
    assert Path(out).read_bytes().startswith(PNG)


def test_figure_functions_skip_empty_inputs(tmp_path):
    out = str(tmp_path / "x.png")
    assert plots.accuracy_vs_time([], out) is None
    assert plots.learning_curves([plots.Curve("a", "a", {"epochs": []})], out) is None
    assert plots.confusion_matrices([], CLASSES, out) is None
    assert plots.prediction_grid({"y_true": [], "y_pred": []}, CLASSES, {}, out) is None
    assert plots.feature_pca([], CLASSES, out) is None
    assert plots.pairwise_heatmap(["a"], np.full((1, 1), np.nan), np.zeros((1, 1), int), 0.05, out) is None
    assert plots.data_size_curve([], out) is None
    assert not os.path.exists(out)


# --------------------------------------------------------------------------- CLI


def test_cli_compare_prints_the_table(tmp_path, results, capsys):
    cache, data, items = results
    base = ["compare", "--cache", str(cache), "--no-figures", "--no-curve"]
    code = cli.main(base + ["--reports", str(tmp_path / "rep"), "--alpha", "0.01"])
    out = capsys.readouterr().out
    assert code == 0
    assert "| logistic" in out and "top group, recommended" in out and "not pretrained" in out
    assert "Answer: logistic" in out
    assert (tmp_path / "rep" / "compare" / "compare.md").is_file()
    assert cli.main(["compare", "--cache", str(tmp_path / "none"), "--reports", str(tmp_path / "r")]) == 2
    assert "no head or run results" in capsys.readouterr().err
    (cache / "heads" / "broken.json").write_text("{")
    assert cli.main(base + ["--reports", str(tmp_path / "rep")]) == 0
    err = capsys.readouterr().err
    assert err.startswith("warning: ignoring ") and "broken.json" in err and "Traceback" not in err


def test_cli_compare_help_lists_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["compare", "--help"])
    out = capsys.readouterr().out
    for option in ("--cache", "--reports", "--data", "--alpha", "--margin", "--no-curve", "--no-figures"):
        assert option in out


@pytest.mark.slow
def test_a_kill_at_any_write_step_leaves_the_previous_report_whole(tmp_path, results):
    """SIGKILL before each write of the set, before the link and before the switch: the previous
    report stays byte-identical; the next run cleans the leftovers and publishes a new set."""
    from tests import faults

    cache, data, items = results
    argv = ["compare", "--cache", str(cache), "--reports", str(tmp_path / "reports"), "--no-curve"]
    assert faults.start(argv).communicate(timeout=300) and True
    target = tmp_path / "reports" / "compare"
    before, link = _snapshot(target), os.readlink(target)
    points = [faults.KillPoint(f"write {n}", "pipeline.files:atomic_write", call=n) for n in range(1, 10)]
    points += [faults.KillPoint("link", "os:symlink"),
               faults.KillPoint("switch", "os:replace", match=f"{str(target)!r}"),
               faults.KillPoint("switched, old set not yet removed", "os:replace", match=f"{str(target)!r}",
                                when="after")]
    for point in points:
        with faults.case("kill points", f"compare: {point.name}"):
            faults.run_killed(argv, point)
            if point.when == "after":  # killed after the switch: the new set is whole, the old one stays
                assert os.readlink(target) != link and (target / "compare.md").is_file()
                before, link = _snapshot(target), os.readlink(target)
            else:
                assert _snapshot(target) == before and os.readlink(target) == link, point.name
    proc = faults.start(argv)
    proc.communicate(timeout=300)
    assert proc.returncode == 0
    hidden = [p.name for p in (tmp_path / "reports").iterdir() if p.name.startswith(".compare-")]
    assert hidden == [os.readlink(target)]  # the leftovers of the killed runs are gone


def test_when_the_most_accurate_is_the_cheapest_the_val_size_names_the_next_cheapest(tmp_path, tiny_data):
    cache = tmp_path / "cache"
    items = _items(77)
    write_head(cache, "ridge", items, range(4), data_root=str(tiny_data))
    write_run(cache, "finetune", 0, items, range(10), data_root=str(tiny_data))
    res = compare.run(_cfg(tmp_path, cache, figures=False))
    line, size = report.answer(res.decision)
    assert line.startswith("Answer: **ridge**") and "and also the cheapest" in line
    assert size.startswith("Val size: certifying finetune within 3 points of ridge")
    assert f"needs about {metrics.noninferior_sample_size(6 / 154, 0.03)} val images" in size
def test_make_compare_passes_margin_through(tmp_path):
    import shutil
    import subprocess

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(["make", "-n", "-C", str(root), "compare", "MARGIN=0.05", "PY=python"], capture_output=True,
                         text=True, check=True).stdout
    line = next(l for l in out.splitlines() if "pipeline compare" in l)
    assert "--margin 0.05" in line
    plain = subprocess.run(["make", "-n", "-C", str(root), "compare", "PY=python"], capture_output=True, text=True,
                           check=True).stdout
    assert "--margin" not in next(l for l in plain.splitlines() if "pipeline compare" in l)


def test_seeds_of_a_random_init_drawn_from_the_seed_form_one_row(tmp_path, tiny_data):
    cache = tmp_path / "cache"
    items = _items()
    for seed in (0, 1, 2):
        write_run(cache, "scratch", seed, items, range(seed + 10), data_root=str(tiny_data),
                  weights_id=f"random-seed{seed}", pretrained=False)
    write_run(cache, "scratch", 0, items, (), data_root=str(tiny_data), weights_id="random-seed7", pretrained=False,
              name="scratch-other-init")
    res = compare.run(_cfg(tmp_path, cache, figures=False))
    seeds = sorted(r.seeds for r in res.rows)
    assert seeds == [1, 3]
    row = next(r for r in res.rows if r.seeds == 3)
    assert row.weights_label == "random-seed0,1,2 (not pretrained)"
