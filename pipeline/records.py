"""The written contract between stages: the JSON records one stage writes for another to read.

Every file a stage writes for another stage goes through a dataclass here, and every reader
parses it back through the same dataclass:

========================  ===============================  ======================================
record                    written by                       read by
========================  ===============================  ======================================
:class:`HeadRecord`       ``heads`` (``cache/heads/*.json``)  ``compare``, ``predict``, ``load_head``, ``export``
:class:`RunRecord`        ``finetune`` (``runs/*/metrics.json``)  ``compare``, ``export``
:class:`WeightsRef`       inside both: which backbone weights, structured
========================  ===============================  ======================================

Each record carries ``schema`` (what it is) and ``schema_version``. A reader meeting another
version raises :class:`SchemaError`, whose message names the command that rewrites the file;
files from before this module (no ``schema_version``) count as version 1.

The JSON keys are the dataclass field names; :meth:`to_json` also writes a few derived keys
(``weights_id``, ``pretrained``) so that a reader without this project (``jq``) sees the
labels the reports use. ``from_json`` checks every field's type and ignores derived keys.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

__all__ = [
    "SCHEMA_VERSION",
    "RecordError",
    "SchemaError",
    "WeightsRef",
    "FeaturesRef",
    "HeadRecord",
    "RunRecord",
    "check_metrics",
    "read_json",
    "RUN_SETTING_KEYS",
    "run_setting",
    "setting_digest",
]

#: Version of every record schema in this module. 1: the untyped dicts written before it.
#: 3: a run's metrics are those of its final epoch (or one chosen on held-out train images),
#: no longer of the epoch with the best val accuracy. 4: backbones beyond ResNet18 (a run's
#: ``backbone``; heads already named theirs in ``features.backbone``).
SCHEMA_VERSION = 4
#: The oldest version still read as is: 4 only added fields whose defaults describe version-3
#: records exactly (every version-3 run was ResNet18's).
OLDEST_READABLE = 3

WEIGHT_KINDS = ("imagenet", "random", "file")
METRIC_KEYS = ("n", "correct", "accuracy", "accuracy_ci95", "balanced_accuracy", "confusion_matrix", "predictions")


class RecordError(ValueError):
    """A record that does not follow its schema (the message says which field and why)."""


class SchemaError(RecordError):
    """A record written under another schema version; the message names the fix."""


# --------------------------------------------------------------------------- (de)serialisation


def _check(value: Any, hint: Any, where: str) -> Any:
    """``value`` converted to the annotated type ``hint``, or RecordError naming ``where``."""
    origin = typing.get_origin(hint)
    if origin is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _check(value, args[0], where)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise RecordError(f"{where} is {type(value).__name__}, expected an object")
        return hint.from_json(value, where=where)
    if origin in (list, List):
        if not isinstance(value, list):
            raise RecordError(f"{where} is {type(value).__name__}, expected a list")
        (item,) = typing.get_args(hint) or (Any,)
        return [_check(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise RecordError(f"{where} is {type(value).__name__}, expected an object")
        return value
    if hint is Any:
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecordError(f"{where} is {type(value).__name__}, expected a number")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecordError(f"{where} is {type(value).__name__}, expected an integer")
        return value
    if not isinstance(value, hint):
        raise RecordError(f"{where} is {type(value).__name__}, expected {hint.__name__}")
    return value


class _Record:
    """Typed JSON (de)serialisation from the dataclass fields: one place for every record."""

    def to_json(self) -> Dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to_json() if isinstance(value, _Record) else value
        return out

    @classmethod
    def from_json(cls, doc: Dict[str, Any], where: str = ""):
        if not isinstance(doc, dict):
            raise RecordError(f"{where or cls.__name__} is not a JSON object")
        hints = typing.get_type_hints(cls)
        values = {}
        for f in dataclasses.fields(cls):
            name = f"{where}.{f.name}" if where else f.name
            if f.name not in doc:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise RecordError(f"missing key {name!r}")
                continue
            values[f.name] = _check(doc[f.name], hints[f.name], name)
        try:
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise RecordError(f"{where or cls.__name__}: {exc}") from None

    def dumps(self) -> str:
        """The record as the JSON text a stage writes (NaN and infinity are refused)."""
        return json.dumps(self.to_json(), indent=2, allow_nan=False) + "\n"


def _versioned(doc: Dict[str, Any], schema: str, fix: str) -> None:
    """Refuse a record of another kind or schema version, naming ``fix``."""
    if not isinstance(doc, dict):
        raise RecordError("not a JSON object")
    if doc.get("schema", schema) != schema:
        raise RecordError(f"schema {doc.get('schema')!r}, expected {schema!r}")
    version = doc.get("schema_version", 1)
    if not (isinstance(version, int) and OLDEST_READABLE <= version <= SCHEMA_VERSION):
        raise SchemaError(f"written with record schema version {version}, this version of pipeline reads "
                          f"versions {OLDEST_READABLE} to {SCHEMA_VERSION}; {fix}")


def read_json(path: str) -> Any:
    """The parsed JSON of ``path`` (OSError/ValueError propagate for the caller to word)."""
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def check_metrics(m: Dict[str, Any]) -> Dict[str, Any]:
    """Validate a :func:`pipeline.metrics.evaluate` dict: every key, and predictions of length n."""
    for key in METRIC_KEYS:
        if key not in m:
            raise RecordError(f"missing key 'metrics.{key}'")
    p = m["predictions"]
    if not isinstance(p, dict) or "y_true" not in p or "y_pred" not in p:
        raise RecordError("metrics.predictions lacks y_true/y_pred")
    lengths = {len(p["y_true"]), len(p["y_pred"])} | ({len(p["paths"])} if "paths" in p else set())
    if lengths != {int(m["n"])}:
        raise RecordError(f"metrics.predictions has lengths {sorted(lengths)}, expected n={m['n']}")
    return m


# --------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class WeightsRef(_Record):
    """Which backbone weights, structured: enough to rebuild and to check them.

    Attributes
    ----------
    kind : {"imagenet", "random", "file"}
    seed : int or None
        The init seed, for ``random``.
    path : str or None
        Absolute path of the state_dict file, for ``file``.
    sha256 : str
        Content hash of the state_dict (:func:`pipeline.backbones.network.state_dict_sha256`).
    """

    kind: str
    sha256: str
    seed: Optional[int] = None
    path: Optional[str] = None

    def __post_init__(self):
        if self.kind not in WEIGHT_KINDS:
            raise ValueError(f"weights kind {self.kind!r}, expected one of {', '.join(WEIGHT_KINDS)}")
        if self.kind == "random" and self.seed is None:
            raise ValueError("random weights need a seed")
        if self.kind == "file" and not self.path:
            raise ValueError("file weights need a path")

    @property
    def id(self) -> str:
        """The label reports use: ``imagenet``, ``random-seed0``, ``file:best.pt``."""
        if self.kind == "random":
            return f"random-seed{self.seed}"
        if self.kind == "file":
            return f"file:{os.path.basename(self.path)}"
        return "imagenet"

    @property
    def pretrained(self) -> bool:
        """False for random init: such results are labelled "not pretrained" everywhere."""
        return self.kind != "random"

    @property
    def spec(self) -> str:
        """The ``--weights`` value that rebuilds these weights (with ``seed`` for random)."""
        return self.path if self.kind == "file" else self.kind

    def to_json(self) -> Dict[str, Any]:
        return dict(super().to_json(), id=self.id, pretrained=self.pretrained)

    @classmethod
    def from_spec(cls, spec: str, sha256: str, seed: int = 0) -> "WeightsRef":
        """From a ``--weights`` value: ``imagenet``, ``random`` or a file path."""
        if spec in ("imagenet", "random"):
            return cls(spec, sha256, seed=seed if spec == "random" else None)
        return cls("file", sha256, path=os.path.abspath(spec))


# --------------------------------------------------------------------------- heads


@dataclass(frozen=True)
class FeaturesRef(_Record):
    """The feature cache a head was fitted on, and what it cost to make."""

    path: str
    content_key: str
    settings_key: str
    weights: WeightsRef
    backbone: str
    precision: str
    n_images: int
    extract_seconds: float = 0.0
    extract_device: str = ""
    draft: bool = True

    def to_json(self) -> Dict[str, Any]:
        # Flat copies of the labels, for readers without this project.
        return dict(super().to_json(), weights_id=self.weights.id, weights_sha256=self.weights.sha256,
                    pretrained=self.weights.pretrained)


@dataclass(frozen=True)
class HeadRecord(_Record):
    """The sidecar ``cache/heads/<name>.json`` of a fitted head.

    Attributes
    ----------
    name, method : str
        File stem (``logistic``, ``logistic-views``) and the row label in reports.
    metrics : dict
        :func:`pipeline.metrics.evaluate` on val, computed once after every choice.
    cv : dict
        The cross-validation on train that chose the hyper-parameter: ``param``, ``grid``,
        ``best``, ``mean_accuracy`` per grid value, ``splitter``.
    hyperparameters : dict
        ``get_params()`` of the fitted estimator (JSON-able values).
    features : FeaturesRef
        The cache the head was fitted on, with its weights.
    settings : dict
        Everything that determines the fitted head; equal settings mean "up to date".
    model_file, format, sha256, size_bytes
        The model file beside the sidecar, its serialisation and content hash, checked
        before it is unpickled.
    """

    name: str
    method: str
    metrics: Dict[str, Any]
    fit_seconds: float
    predict_us_per_image: float
    cv: Dict[str, Any]
    hyperparameters: Dict[str, Any]
    trainable_parameters: int
    features: FeaturesRef
    classes: List[str]
    data_root: str
    versions: Dict[str, str]
    created: str
    used_views: bool
    has_proba: bool
    settings: Dict[str, Any]
    model_file: str
    format: str
    sha256: str
    size_bytes: int
    warnings: List[str] = field(default_factory=list)
    kind: str = "head"
    schema: str = "pipeline.head"
    schema_version: int = SCHEMA_VERSION

    @property
    def weights(self) -> WeightsRef:
        return self.features.weights

    @classmethod
    def from_json(cls, doc: Dict[str, Any], where: str = "") -> "HeadRecord":
        _versioned(doc, "pipeline.head", "refit it with `python -m pipeline heads --rebuild`")
        rec = super().from_json(doc, where)
        check_metrics(rec.metrics)
        return rec


# --------------------------------------------------------------------------- runs

#: The settings that make two end-to-end runs "one setting" (their seeds may differ): one table
#: row in ``compare`` and one hash in the run folder name. Keys of ``RunRecord.settings``.
RUN_SETTING_KEYS = ("backbone", "lr", "batch_size", "momentum", "weight_decay", "step_size", "gamma", "bn",
                    "trainable_from", "precision")


def run_setting(settings: Dict[str, Any]) -> Dict[str, Any]:
    """The :data:`RUN_SETTING_KEYS` of a run's settings (None where a record lacks one)."""
    return {k: settings.get(k) for k in RUN_SETTING_KEYS}


def setting_digest(settings: Dict[str, Any]) -> str:
    """8 hex digits of sha256 over :func:`run_setting`: the short hash in a run folder's name."""
    text = json.dumps(run_setting(settings), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]



@dataclass(frozen=True)
class RunRecord(_Record):
    """``cache/runs/<run name>/metrics.json``: one finished end-to-end run.

    Written last: a run folder without it is unfinished. ``metrics`` are on val, of the
    model saved as ``model.pt`` (``size_bytes``); ``config`` is the resolved configuration
    (batch size, threads, workers…); ``key`` the digest of ``settings``, the inputs that make
    a run "the same run".

    Attributes
    ----------
    selection : dict
        How that model was chosen, never on val: ``rule`` (``final``: the fixed schedule's last
        epoch; ``holdout``: the best epoch on held-out train images, with ``fraction``,
        ``holdout_n``, ``holdout`` (their paths) and ``holdout_acc``), ``selected_epoch``,
        ``selected_on``, ``scored_on`` (``val``).
    best_val_epoch, best_val_acc : int, float
        The tutorial's number: the epoch with the best val accuracy. Chosen on val, hence
        optimistic; shown apart and labelled, never the result.
    eval_seconds : float
        The part of ``total_seconds`` spent on val passes during training (``--eval-every``).
    train_per_class : int
        ``K`` of ``--train-per-class`` (0: every train image); ``train_subset`` lists the
        images then used (without the held-out ones), ``train_images`` counts them with them.
    world_size : int
        Processes that trained the run together under ``torchrun`` (1 without it);
        ``total_seconds`` is wall-clock time, so the run cost ``total_seconds * world_size``
        device-seconds (what compare charges it).
    sync_batchnorm : bool
        Whether BatchNorm layers that train synchronised their statistics over the ranks.
    """

    name: str
    mode: str
    seed: int
    metrics: Dict[str, Any]
    selection: Dict[str, Any]
    best_val_epoch: int
    best_val_acc: float
    epochs: int
    total_seconds: float
    epoch_seconds: List[float]
    images_per_s: float
    predict_ms_per_image: float
    trainable_parameters: int
    total_parameters: int
    device: str
    precision: str
    weights: WeightsRef
    classes: List[str]
    data_root: str
    config: Dict[str, Any]
    versions: Dict[str, str]
    size_bytes: int
    key: str
    settings: Dict[str, Any]
    created: str
    skipped: List[Dict[str, Any]] = field(default_factory=list)
    train_per_class: int = 0
    train_images: int = 0
    train_subset: Optional[List[str]] = None
    backbone: str = "resnet18"  # the --backbone value (canonical); runs of older schemas were all ResNet18
    # Of total_seconds: the val passes made during training (diagnostics only: the learning curves
    # and the best-val column; finetune --eval-every sets how often). 0 in records from before.
    eval_seconds: float = 0.0
    best_val_note: str = "best epoch on val: chosen on val, optimistic"
    complete: bool = True
    checkpoint: str = "model.pt"  # the file in the run folder holding the model ``metrics`` describe
    # sha256 of each checkpoint file in the run folder ({"model.pt": ..., "last.pt": ...}), checked
    # before a checkpoint is used (checkpoints.verify_checkpoint); a mismatch names --rebuild.
    checkpoints: Dict[str, str] = field(default_factory=dict)
    # Processes that trained the run together (torchrun, DistributedDataParallel); its cost in
    # device-seconds is total_seconds * world_size.
    world_size: int = 1
    sync_batchnorm: bool = False  # BatchNorm statistics synchronised over the ranks (SyncBatchNorm)
    kind: str = "run"
    schema: str = "pipeline.run"
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> Dict[str, Any]:
        return dict(super().to_json(), weights_id=self.weights.id, weights_sha256=self.weights.sha256,
                    pretrained=self.weights.pretrained)

    @classmethod
    def from_json(cls, doc: Dict[str, Any], where: str = "") -> "RunRecord":
        _versioned(doc, "pipeline.run", "rerun it with `python -m pipeline finetune --rebuild`")
        rec = super().from_json(doc, where)
        check_metrics(rec.metrics)
        return rec
