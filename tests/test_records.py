"""The written contract between stages (pipeline/records.py): round trips, type checks, and a
clear error for a record written under another schema version."""
from __future__ import annotations

import json

import pytest

from pipeline.compare import stage as compare
from pipeline import records
from pipeline.records import FeaturesRef, HeadRecord, RecordError, RunRecord, SchemaError, WeightsRef
from tests.test_compare import _val_items, write_feature_cache, write_head, write_run


def test_weights_ref_is_structured_and_labels_derive_from_it(tmp_path):
    r = WeightsRef("random", "ab" * 32, seed=3)
    assert (r.id, r.pretrained, r.spec) == ("random-seed3", False, "random")
    f = WeightsRef.from_spec(str(tmp_path / "w.pt"), "cd" * 32)
    assert (f.kind, f.id, f.pretrained, f.spec) == ("file", "file:w.pt", True, str(tmp_path / "w.pt"))
    assert WeightsRef.from_json(json.loads(json.dumps(f.to_json()))) == f
    for bad in (dict(kind="hub", sha256="x"), dict(kind="random", sha256="x"), dict(kind="file", sha256="x")):
        with pytest.raises(RecordError):
            WeightsRef.from_json(bad)


def test_head_and_run_records_round_trip(tmp_path, tiny_data):
    cache = tmp_path / "cache"
    items = _val_items(tiny_data)
    head = HeadRecord.from_json(json.loads(write_head(cache, "logistic", items, (0,), data_root="/d").read_text()))
    assert head.schema_version == records.SCHEMA_VERSION and head.weights.kind == "imagenet"
    assert HeadRecord.from_json(json.loads(head.dumps())) == head
    run = RunRecord.from_json(json.loads(write_run(cache, "scratch", 1, items, data_root="/d",
                                                   weights_id="random-seed1", pretrained=False).read_text()))
    assert run.weights == WeightsRef("random", "ab" * 32, seed=1)
    doc = run.to_json()
    assert doc["weights_id"] == "random-seed1" and doc["pretrained"] is False  # labels for readers without code
    assert RunRecord.from_json(json.loads(run.dumps())) == run


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("fit_seconds"), "missing key 'fit_seconds'"),
    (lambda d: d.update(fit_seconds="fast"), "fit_seconds is str, expected a number"),
    (lambda d: d["features"].update(n_images=2.5), "features.n_images is float, expected an integer"),
    (lambda d: d["metrics"].pop("accuracy"), "metrics.accuracy"),
    (lambda d: d["features"]["weights"].update(kind="hub"), "weights kind 'hub'"),
])
def test_head_record_names_the_bad_field(tmp_path, tiny_data, change, message):
    doc = json.loads(write_head(tmp_path, "x", _val_items(tiny_data), data_root="/d").read_text())
    change(doc)
    with pytest.raises(RecordError, match=message.replace(".", r"\.")):
        HeadRecord.from_json(doc)


def test_another_schema_version_names_the_fix_everywhere(tmp_path, tiny_data, capsys):
    from pipeline.heads import stage as heads

    cache = tmp_path / "cache"
    items = _val_items(tiny_data)
    feats = write_feature_cache(cache, tiny_data)
    sidecar = write_head(cache, "logistic", items, data_root=str(tiny_data), features_path=feats)
    old = json.loads(sidecar.read_text())
    del old["schema_version"]  # what every file written before records.py looks like
    sidecar.write_text(json.dumps(old))
    with pytest.raises(SchemaError, match=f"version 1.*versions {records.OLDEST_READABLE} to {records.SCHEMA_VERSION}"
                                          ".*heads --rebuild"):
        HeadRecord.from_json(old)
    with pytest.raises(heads.UserError, match=r"schema version 1.*python -m pipeline heads --rebuild"):
        heads.load_head(str(sidecar))
    metrics = write_run(cache, "finetune", 0, items, data_root=str(tiny_data))
    doc = json.loads(metrics.read_text())
    doc["schema_version"] = 99
    metrics.write_text(json.dumps(doc))
    with pytest.warns(UserWarning, match="version 99.*finetune --rebuild"):
        results, skipped = compare.load_results(str(cache))
    assert not results and {s["path"] for s in skipped} == {str(sidecar), str(metrics)}


def test_version_3_run_records_read_as_resnet18_runs(tiny_data, tmp_path):
    """Version 4 only added fields whose defaults describe version 3 exactly: such runs still compare."""
    items = _val_items(tiny_data)
    metrics = write_run(tmp_path / "cache", "finetune", 0, items, data_root=str(tiny_data))
    doc = json.loads(metrics.read_text())
    doc["schema_version"] = 3
    doc.pop("backbone", None)
    rec = RunRecord.from_json(doc)
    assert rec.backbone == "resnet18" and rec.schema_version == 3
