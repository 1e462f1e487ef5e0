"""export: heads folded exactly, runs as they are, checked with ONNX Runtime; predict --model without torch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pipeline import cli, config
from pipeline.export import stage as export, predict
from pipeline.features import stage as features
from pipeline.finetune import stage as finetune
from pipeline.heads import stage as heads
from pipeline.config import ExportConfig, FeaturesConfig, FinetuneConfig, HeadsConfig, PredictConfig
from pipeline.errors import UserError

from .conftest import SMALL_PREPROCESS, make_dataset

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

pytestmark = [pytest.mark.usefixtures("small_images"),
              pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")]
TOL = 1e-4


# --------------------------------------------------------------------------- folding (no images)


def _softmax(s):
    e = np.exp(s - s.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _rule(name, scores):
    if name == "softmax":
        return _softmax(scores)
    p = 1 / (1 + np.exp(-scores))
    return p / p.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("name", ["logistic", "sgd_log", "sgd_hinge", "linear_svm", "ridge", "nearest_centroid"])
def test_folded_head_reproduces_scikit_learn(name, n_classes):
    """The folded affine map gives the head's classes, decision values and probabilities."""
    rng = np.random.default_rng(n_classes)
    y = np.repeat(np.arange(n_classes), 30)
    X = rng.normal(size=(len(y), 512)) * rng.uniform(0.1, 5, 512) + rng.normal(size=512) * 3
    X[:, :8] += y[:, None] * 1.5  # informative, on a non-standard scale: the scaler matters
    spec = heads.REGISTRY[name]
    model = make_pipeline(StandardScaler(), spec.build(spec.grid[len(spec.grid) // 2] if spec.grid else None, 0))
    model.fit(X, y)
    folded = export.fold_head(model, name)
    out = X @ folded.weight.T + folded.bias
    logits, scores = out[:, :n_classes], out[:, n_classes:] if out.shape[1] > n_classes else out
    assert folded.classes == list(range(n_classes))
    np.testing.assert_array_equal(logits.argmax(1), model.predict(X))
    if hasattr(model, "predict_proba"):
        np.testing.assert_allclose(_rule(folded.proba, scores), model.predict_proba(X), atol=1e-9)
    else:
        assert folded.proba == "none"
    if name != "nearest_centroid":
        d = model.decision_function(X)
        np.testing.assert_allclose(logits[:, 1] - logits[:, 0] if d.ndim == 1 else logits, d, rtol=1e-9, atol=1e-9)


def test_heads_that_are_not_affine_are_refused_naming_the_exportable_ones():
    from sklearn.neighbors import KNeighborsClassifier, NearestCentroid

    X, y = np.random.default_rng(0).normal(size=(20, 512)), np.repeat([0, 1], 10)
    for est in (KNeighborsClassifier(3), NearestCentroid(metric="manhattan")):
        model = make_pipeline(StandardScaler(), est).fit(X, y)
        with pytest.raises(UserError) as err:
            export.fold_head(model, "h")
        assert "logistic" in str(err.value) and "ridge" in str(err.value) and "\n" not in str(err.value)
    assert "knn" not in export.exportable_heads() and "nearest_centroid" in export.exportable_heads()


# --------------------------------------------------------------------------- end to end (tiny images)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Two data sets (2 and 3 classes) with random-weight caches and heads, and a 1-epoch run."""
    base = tmp_path_factory.mktemp("export")
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in SMALL_PREPROCESS.items():
            mp.setitem(config.PREPROCESS, key, value)
        # sgd_log's early stopping holds out 10% of a CV fold, at least one image per class
        for name, classes, n_train, head_names in (("two", ("ants", "bees"), 6, ("logistic", "knn")),
                                                   ("three", ("a", "b", "c"), 20, ("ridge", "sgd_log"))):
            root = make_dataset(base / name / "data", n_train=n_train, n_val=3, classes=classes)
            cache = str(base / name / "cache")
            path = features.run(FeaturesConfig(data=str(root), cache=cache, weights="random", device="cpu",
                                               progress=False)).path
            heads.run(HeadsConfig(features=path, cache=cache, heads=head_names, cv_folds=2))
            out[name] = (root, cache)
        root, cache = out["two"]
        finetune.run(FinetuneConfig(data=str(root), cache=cache, weights="random", device="cpu", epochs=1,
                                    workers=0, threads=1, progress=False))
    return out


def _metadata(path):
    return {p.key: json.loads(p.value) for p in onnx.load(path, load_external_data=False).metadata_props}


def _check(result, n_val, outputs):
    doc = result.doc
    v = doc["verification"]
    assert v["images"] == n_val and v["classes_agree"] == n_val
    assert (v["max_abs_diff_probabilities"] or 0.0) <= TOL and v["max_abs_diff_logits"] <= 1e-3
    assert list(doc["outputs"]) == outputs
    assert os.path.isfile(result.path) and json.load(open(result.sidecar))["sha256"] == doc["sha256"]
    meta = _metadata(result.path)
    assert meta["classes"] == doc["classes"] and meta["pretrained"] is False
    assert meta["preprocessing"]["resize"] == SMALL_PREPROCESS["resize"] and meta["preprocessing"]["crop"] == 32
    assert meta["preprocessing"]["mean"] == list(config.PREPROCESS["mean"])
    assert meta["weights"]["id"] == "random-seed0" and len(meta["weights"]["sha256"]) == 64
    assert {"torch", "sklearn", "onnx", "onnxruntime"} <= set(meta["versions"])
    assert meta["opset"] == config.ONNX_OPSET
    assert [o.name for o in onnx.load(result.path).graph.output] == outputs
    return meta


def _predictions(args, capsys):
    assert cli.main(["predict", *args, "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)["predictions"]


def _same(a, b):
    assert [p["path"] for p in a] == [p["path"] for p in b]
    assert [p["class"] for p in a] == [p["class"] for p in b]
    for p, q in zip(a, b):
        assert (p["probability"] is None) == (q["probability"] is None)
        assert p["probability"] is None or abs(p["probability"] - q["probability"]) <= TOL


def test_logistic_head_exports_and_predict_model_matches_predict_head(project, tmp_path, capsys):
    root, cache = project["two"]
    result = export.run(ExportConfig(head="logistic", cache=cache))
    assert result.path == os.path.join(cache, "export", "head-logistic.onnx")
    meta = _check(result, 6, ["logits", "probabilities"])
    assert meta["source"]["kind"] == "head" and meta["source"]["name"] == "logistic"
    val = str(root / "val")
    by_head = _predictions(["--head", "logistic", "--cache", cache, "--device", "cpu", val], capsys)
    by_model = _predictions(["--model", result.path, val], capsys)
    _same(by_model, by_head)
    assert all(p["probability"] is not None for p in by_model)


def test_multiclass_ridge_head_has_logits_only_and_matches_predict_head(project, tmp_path, capsys):
    root, cache = project["three"]
    out = tmp_path / "models" / "r.onnx"
    assert cli.main(["export", "--head", "ridge", "--cache", cache, "--out", str(out)]) == 0
    assert "max |Δ" in capsys.readouterr().out
    meta = _check(export.ExportResult(str(out), str(out.with_suffix(".json")), json.load(open(out.with_suffix(".json")))),
                  9, ["logits"])
    assert meta["classes"] == ["a", "b", "c"]
    val = str(root / "val")
    _same(_predictions(["--model", str(out), val], capsys),
          _predictions(["--head", "ridge", "--cache", cache, "--device", "cpu", val], capsys))


def test_multiclass_sgd_log_head_has_one_vs_rest_probabilities(project, tmp_path):
    _, cache = project["three"]
    result = export.run(ExportConfig(head="sgd_log", cache=cache, out=str(tmp_path / "s.onnx")))
    _check(result, 9, ["logits", "probabilities"])  # ONNX Runtime within 1e-4 of SGDClassifier.predict_proba
    assert "normalised" in result.doc["outputs"]["probabilities"]


def test_finetuned_run_exports_and_runs_without_torch(project, tmp_path):
    root, cache = project["two"]
    result = export.run(ExportConfig(run="finetune", cache=cache, out=str(tmp_path) + os.sep))
    assert result.path == str(tmp_path / "run-finetune.onnx")
    meta = _check(result, 6, ["logits", "probabilities"])
    assert meta["source"]["kind"] == "run" and len(meta["source"]["checkpoint_sha256"]) == 64
    # a Python where torch cannot be imported: the client must not need it
    blocker = ("import runpy, sys; sys.modules['torch'] = None; sys.modules['torchvision'] = None; "
               "sys.argv = ['pipeline'] + sys.argv[1:]; runpy.run_module('pipeline', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", blocker, "predict", "--model", result.path, str(root / "val"),
                           "--format", "json"], capture_output=True, text=True, cwd=Path(__file__).parents[1],
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)["predictions"]
    assert len(got) == 6 and all(0 <= p["probability"] <= 1 for p in got)
    assert got == predict.run(PredictConfig(model=result.path, inputs=(str(root / "val"),))).predictions
    blocked = subprocess.run([sys.executable, "-c", "import sys; sys.modules['torch'] = None; import torch"],
                             capture_output=True, text=True)
    assert blocked.returncode != 0  # the blocker itself works


def test_not_exportable_head_is_a_one_line_user_error(project, capsys):
    _, cache = project["two"]
    assert cli.main(["export", "--head", "knn", "--cache", cache]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "knn" in err and "logistic" in err
    assert not os.path.exists(os.path.join(cache, "export", "head-knn.onnx"))


def test_a_model_that_disagrees_with_its_source_is_not_written(project, tmp_path):
    """An image changed since the cache was made: the check fails, and nothing gets the final name."""
    root, cache = project["two"]
    target = root / "val" / "ants" / "img_000.jpg"
    original = target.read_bytes()
    try:
        target.write_bytes((root / "val" / "bees" / "img_000.jpg").read_bytes())
        out = tmp_path / "m.onnx"
        with pytest.raises(UserError, match="disagrees"):
            export.run(ExportConfig(head="logistic", cache=cache, out=str(out)))
        assert os.listdir(tmp_path) == []
    finally:
        target.write_bytes(original)


def test_a_run_checkpoint_changed_after_training_is_refused(project, tmp_path):
    _, cache = project["two"]
    checkpoint = Path(cache) / "runs" / "finetune" / "model.pt"
    original = checkpoint.read_bytes()
    try:
        checkpoint.write_bytes(original + b"\0")
        with pytest.raises(UserError, match="does not match"):
            export.run(ExportConfig(run="finetune", cache=cache, out=str(tmp_path / "m.onnx")))
        assert os.listdir(tmp_path) == []
    finally:
        checkpoint.write_bytes(original)


def test_recommended_names_what_compare_recommends(project, tmp_path):
    from pipeline.compare import stage as compare
    from pipeline.config import CompareConfig

    _, cache = project["three"]
    reports = str(tmp_path / "reports")
    with pytest.raises(UserError, match="make compare"):
        export.recommended(ExportConfig(recommended=True, reports=reports, cache=cache))
    result = compare.run(CompareConfig(cache=cache, reports=reports, curve=False, figures=False))
    cfg, by = export.recommended(ExportConfig(recommended=True, reports=reports, cache=cache))
    assert os.path.isfile(by) and not cfg.recommended and not cfg.run
    assert json.load(open(cfg.head))["name"] == result.recommended.label  # the head's sidecar
    with pytest.raises(UserError, match="name one source"):
        export.run(ExportConfig(cache=cache))
