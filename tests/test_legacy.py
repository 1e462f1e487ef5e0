"""Artifacts written before the package move (flat ``pipeline/*.py``, commit 58b6c64) still load.

``tests/fixtures/legacy/`` was made by that commit's code: a saved logistic head with its
sidecar, its val features and decisions, and a pickled ``ResNet18Features`` (whose pickle
names the old module ``pipeline.sklearn_api``).
"""
import json
from pathlib import Path

import joblib
import numpy as np

from pipeline import ResNet18Features, load_head

LEGACY = Path(__file__).parent / "fixtures" / "legacy"


def test_head_saved_by_the_flat_layout_loads_and_predicts_the_same():
    expected = json.loads((LEGACY / "expected.json").read_text())
    head = load_head(str(LEGACY / "logistic.joblib"))
    X = np.asarray(expected["X"], dtype=np.float32)
    np.testing.assert_allclose(head.model.decision_function(X), expected["decision"], rtol=1e-6, atol=1e-6)
    assert head.model.predict(X).tolist() == expected["predict"]


def test_transformer_pickled_under_the_old_module_path_loads():
    transformer = joblib.load(LEGACY / "resnet18_features.joblib")
    assert isinstance(transformer, ResNet18Features)
    assert transformer.get_params()["weights"] == "random"
