"""Export a head or a run as one ONNX image classifier: ``python -m pipeline export``.

``--head NAME``: a ``StandardScaler`` followed by a linear model is one affine map of the
pooled features, so it is folded (in float64, then stored as float32) into one ``nn.Linear``
that replaces the classifier layer of the backbone the head's features came from.
``--run MODE[-SEED]``: the run's trained network as it is.

The model takes float32 images of shape (N, 3, crop, crop) in [0, 1], after the resize and
crop of the feature cache (``images.eval_array``); the ImageNet normalisation is inside the
graph. Outputs: ``logits`` (N, K), whose argmax is the source's predicted class, and, where
the source has them, ``probabilities`` (N, K) by the source's own rule. Classes,
preprocessing, weights, source and library versions are in the file's metadata and in a JSON
sidecar beside it.

The written file is run with ONNX Runtime on (at most ``--sample``) val images of the source
and compared with the source itself (the head on the cached features, the run's network in
PyTorch). The file gets its final name only if the probabilities agree within
``--tolerance`` and every predicted class agrees.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.linear_model._base import LinearClassifierMixin
from sklearn.neighbors import NearestCentroid
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from .. import backbones, data, files, heads
from . import predict
from ..features import store
from ..finetune.checkpoints import save_json, verify_checkpoint
from ..backbones.registry import set_submodule
from ..config import ONNX_OPSET, ExportConfig
from ..errors import ParameterError, UserError
from ..heads.stage import REGISTRY
from .client import FORMAT, OnnxClassifier
from ..records import RunRecord, read_json
from ..paths import RUN_METRICS, export_dir, for_backbone, report_files, run_dir, runs_dir
from ..versions import TORCH_STACK, library_versions

__all__ = ["Folded", "fold_head", "exportable_heads", "ExportResult", "run", "export_dir", "FORMAT"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
PROBA_RULES = ("softmax", "ovr-sigmoid", "none")


# --------------------------------------------------------------------------- folding


@dataclass
class Folded:
    """A head as one linear layer on the 512-d backbone features.

    ``weight`` (M, 512) and ``bias`` (M,), float64. The first K outputs are the logits (their
    argmax is the head's ``predict``); when ``M == 2K`` the last K are the scores the
    probabilities are computed from (nearest centroid, whose ``predict`` and
    ``predict_proba`` use different distances). ``proba``: how probabilities follow from the
    scores (``softmax``, ``ovr-sigmoid``: sigmoid normalised to sum 1, scikit-learn's
    one-vs-rest rule, or ``none``). ``classes``: scikit-learn's ``classes_`` (label indices),
    the order of the outputs.
    """

    weight: np.ndarray
    bias: np.ndarray
    proba: str
    classes: List[int]
    logits: str  # what the logits are, in words (metadata)
    estimator: str = ""

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def linear(self) -> nn.Linear:
        layer = nn.Linear(self.weight.shape[1], self.weight.shape[0])
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(self.weight.astype(np.float32)))
            layer.bias.copy_(torch.from_numpy(self.bias.astype(np.float32)))
        return layer


def _scaler_affine(scaler) -> Tuple[np.ndarray, np.ndarray]:
    """``(shift, scale)`` of a fitted StandardScaler: ``z = (x - shift) / scale``."""
    d = int(scaler.n_features_in_)
    shift = np.zeros(d) if getattr(scaler, "mean_", None) is None or not scaler.with_mean else scaler.mean_
    scale = np.ones(d) if getattr(scaler, "scale_", None) is None or not scaler.with_std else scaler.scale_
    return np.asarray(shift, np.float64), np.asarray(scale, np.float64)


def _compose(weight: np.ndarray, bias: np.ndarray, shift: np.ndarray, scale: np.ndarray):
    """``weight @ ((x - shift) / scale) + bias`` as ``W' @ x + b'``."""
    w = weight / scale
    return w, bias - w @ shift


def _linear_rule(est) -> Optional[str]:
    """The probability rule of a linear classifier, None if it has one we do not reproduce."""
    if isinstance(est, LogisticRegression):
        return "softmax"  # binary: [1 - sigmoid(d), sigmoid(d)] == softmax([0, d])
    if isinstance(est, SGDClassifier):
        if est.loss == "log_loss":
            return "ovr-sigmoid"  # binary: the same as softmax([0, d])
        return "none" if not hasattr(est, "predict_proba") else None
    return "none" if not hasattr(est, "predict_proba") else None


def _foldable(est) -> bool:
    if isinstance(est, NearestCentroid):
        return est.metric == "euclidean"
    return isinstance(est, LinearClassifierMixin) and _linear_rule(est) is not None


def exportable_heads() -> List[str]:
    """The registry's heads that fold into a linear layer (decided on their estimators' types)."""
    names = []
    for name, spec in REGISTRY.items():
        value = spec.grid[0] if spec.grid else None
        if _foldable(spec.build(value, 0)):
            names.append(name)
    return names


def _not_exportable(what: str) -> UserError:
    return UserError(f"{what} cannot be folded into the network (it is not an affine map of the features); "
                     f"heads that can be exported: {', '.join(exportable_heads())}; or export a run (--run)")


def fold_head(model, name: str = "head") -> Folded:
    """Fold a fitted ``Pipeline(StandardScaler, estimator)`` into one affine map of the features.

    Raises
    ------
    UserError
        The estimator is not affine in the features (k-NN, nearest centroid with the
        Manhattan metric...), or the pipeline is not scaler + estimator.
    """
    steps = model.steps if isinstance(model, Pipeline) else []
    if len(steps) != 2 or not isinstance(steps[0][1], StandardScaler):
        raise _not_exportable(f"head {name!r} (not a StandardScaler + estimator pipeline)")
    shift, scale = _scaler_affine(steps[0][1])
    est = steps[1][1]
    label = type(est).__name__
    if not _foldable(est):
        raise _not_exportable(f"head {name!r} ({label}"
                              + (f", metric={est.metric!r}" if isinstance(est, NearestCentroid) else "") + ")")
    classes = [int(c) for c in est.classes_]
    if isinstance(est, NearestCentroid):
        return _fold_centroid(est, shift, scale, classes)
    coef = np.atleast_2d(np.asarray(est.coef_, np.float64))
    intercept = np.broadcast_to(np.asarray(est.intercept_, np.float64), (coef.shape[0],))
    w, b = _compose(coef, intercept, shift, scale)
    if len(classes) == 2:  # scikit-learn's one decision value d: class 1 iff d > 0; logits [0, d]
        w = np.vstack([np.zeros_like(w), w])
        b = np.concatenate([[0.0], b])
        rule = _linear_rule(est)
        rule = "softmax" if rule == "ovr-sigmoid" else rule
        what = f"[0, decision_function] of {label} (column 1 minus column 0 is its decision value)"
    else:
        rule = _linear_rule(est)
        what = f"decision_function of {label}, one column per class"
    return Folded(w, b, rule, classes, what, label)


def _fold_centroid(est, shift, scale, classes) -> Folded:
    """Nearest centroid (Euclidean) in the scaler's space.

    ``predict`` (uniform priors) is the nearest centroid ``c``: argmax of ``2 c·z - |c|²``.
    ``predict_proba`` is the softmax of ``-|z' - c'|² + 2 log prior`` with ``z'``, ``c'``
    divided by the within-class standard deviation; ``|z'|²`` is the same for every class, so
    the softmax of ``2 c'·z' - |c'|² + 2 log prior`` is the same.
    """
    c = np.asarray(est.centroids_, np.float64)
    logit_w, logit_b = _compose(2 * c, -np.sum(c * c, axis=1), shift, scale)
    sd = np.asarray(est.within_class_std_dev_, np.float64)
    sd = np.where(sd != 0, sd, 1.0)
    cn = c / sd
    prior = np.asarray(est.class_prior_, np.float64)
    with np.errstate(divide="ignore"):
        log_prior = np.log(prior)
    proba_w, proba_b = _compose(2 * cn, -np.sum(cn * cn, axis=1) + 2 * log_prior, shift, scale * sd)
    if not np.isclose(prior, 1 / len(classes)).all():  # then predict is the argmax of these scores too
        logit_w, logit_b = proba_w, proba_b
    return Folded(np.vstack([logit_w, proba_w]), np.concatenate([logit_b, proba_b]), "softmax", classes,
                  "2 c·z - |c|² per class centroid c, z the standardised features "
                  "(minus the squared distance, up to a per-image constant)", type(est).__name__)


# --------------------------------------------------------------------------- the network


class ImageClassifier(nn.Module):
    """Normalisation, the backbone (its classifier layer the head) and the probability rule, in one module."""

    def __init__(self, net: nn.Module, n_classes: int, proba: str, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if proba not in PROBA_RULES:
            raise ValueError(f"unknown probability rule {proba!r}")
        self.net = net
        self.n_classes = n_classes
        self.proba = proba
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, image: torch.Tensor):
        out = self.net((image - self.mean) / self.std)
        logits = out[:, :self.n_classes]
        if self.proba == "none":
            return logits
        scores = out[:, self.n_classes:] if out.shape[1] > self.n_classes else logits
        if self.proba == "softmax":
            return logits, torch.softmax(scores, dim=1)
        p = torch.sigmoid(scores)  # scikit-learn's one-vs-rest rule: normalise; all zero -> uniform
        total = p.sum(dim=1, keepdim=True)
        p = torch.where(total > 0, p / total.clamp_min(torch.finfo(p.dtype).tiny), 1.0 / self.n_classes)
        return logits, p


def output_names(proba: str) -> List[str]:
    return ["logits"] if proba == "none" else ["logits", "probabilities"]


def _to_onnx(module: nn.Module, crop: int, names: List[str]):
    """The module as an ``onnx.ModelProto`` (torch's dynamo exporter, batch size dynamic)."""
    example = torch.rand(2, 3, crop, crop)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    log.info("exporting to ONNX opset %d", ONNX_OPSET)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(module.eval(), (example,), dynamo=True, opset_version=ONNX_OPSET,
                                        input_names=["image"], output_names=names,
                                        dynamic_shapes=({0: batch},), verbose=False)
        except ModuleNotFoundError as exc:
            raise UserError(f"export needs {exc.name} (torch's ONNX exporter): "
                            "pip install 'pipeline[onnx]' (onnx, onnxscript, onnxruntime)") from None
    return program.model_proto


# --------------------------------------------------------------------------- sources


@dataclass
class Source:
    """What is exported: the network, its classes, and how to check it against the original."""

    kind: str  # head | run
    name: str
    doc: dict  # metadata describing the source
    module: ImageClassifier
    classes: List[str]
    weights: dict  # {id, sha256, pretrained}
    draft: Optional[int]  # JPEG draft decoding of the images the source saw
    logits: str
    proba: str
    check: "Check"
    preprocess: dict  # the backbone's resize, crop, interpolation, mean and std
    proba_text: str = ""


@dataclass
class Check:
    """Val images and the source's own answers for them."""

    against: str
    paths: List[str]
    predicted: np.ndarray  # class index (column of the outputs) per path
    logits: Optional[np.ndarray] = None  # (n, K), where the source gives them
    proba: Optional[np.ndarray] = None
    notes: List[str] = field(default_factory=list)


def _sample(n: int, k: int) -> np.ndarray:
    """``k`` of ``n`` rows spread evenly (val is stored class by class, so every class is drawn)."""
    if n <= k:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, k).round().astype(int))


def _head_source(cfg: ExportConfig) -> Source:
    sidecar = predict.resolve_head(cfg.head, cfg.cache, cfg.backbone)
    head = heads.load_head(sidecar)
    rec = head.record
    feats = rec.features
    folded = fold_head(head.model, head.name)
    weights = backbones.resolve_weights(cfg.weights or feats.weights.spec, feats.weights.seed or 0,
                                        feats.backbone or None)
    if weights.sha256 != feats.weights.sha256:
        raise UserError(f"weights {weights.spec!r} ({weights.id}) are not the weights head {head.name!r} was fitted "
                        f"on ({feats.weights.id}); pass --weights with the same weights")
    net = backbones.build_model(weights)
    classifier = backbones.classifier_path(weights.backbone)
    set_submodule(net, classifier, folded.linear())  # scaler and head folded into the network's classifier
    classes = [head.classes[c] for c in folded.classes]
    pp = weights.backbone.preprocess()
    module = ImageClassifier(net, folded.n_classes, folded.proba, pp["mean"], pp["std"]).eval()
    draft = pp["resize"] if feats.draft else None
    check = _head_check(head, feats, folded, cfg.sample, net, draft, classifier, pp)
    doc = {"kind": "head", "name": head.name, "sidecar": os.path.abspath(os.path.splitext(sidecar)[0] + ".json"),
           "model_sha256": rec.sha256, "method": rec.method, "estimator": folded.estimator,
           "hyperparameters": rec.hyperparameters,
           "features": {"path": feats.path, "precision": feats.precision, "draft": feats.draft}}
    proba_text = ("softmax of -|z' - c'|² + 2 log prior, z' and c' divided by the within-class standard "
                  "deviation (NearestCentroid.predict_proba)") if folded.weight.shape[0] > folded.n_classes else ""
    return Source("head", head.name, doc, module, classes, feats.weights.to_json(), draft, folded.logits,
                  folded.proba, check, pp, proba_text)


def _head_check(head, feats, folded: Folded, sample: int, net: nn.Module, draft, classifier: str,
                preprocess: dict) -> Check:
    """The head's answers on cached val features (recomputed in fp32 if the cache is not fp32)."""
    path = feats.path
    if not path or not os.path.isfile(path):
        raise UserError(f"the feature cache head {head.name!r} was fitted on ({path!r}) is gone; export checks "
                        "the model on its val images: rerun `make features` with the head's settings")
    meta = store.read_meta(path)
    X, _y, relpaths, _ = store.read_split(path, "val")
    rows = _sample(len(relpaths), sample)
    root = meta.get("data_root", "")
    paths = [os.path.join(root, relpaths[i]) for i in rows]
    X = X[rows]
    notes = []
    against = f"the joblib head on the cached val features ({path})"
    if meta.get("precision", "fp32") != "fp32":  # bf16/fp16 features differ from fp32 by more than 1e-4
        X = _torch_features(net, paths, draft, classifier, preprocess)
        against = f"the joblib head on fp32 PyTorch features of the same val images (the cache holds {meta['precision']})"
    model = head.model
    predicted = _columns(model.predict(X), folded.classes)
    proba = model.predict_proba(X) if head.has_proba else None
    logits = None if folded.weight.shape[0] > folded.n_classes else _decision(model, X)
    return Check(against, paths, predicted, logits, proba, notes)


def _columns(labels: np.ndarray, classes: List[int]) -> np.ndarray:
    where = {c: i for i, c in enumerate(classes)}
    return np.array([where[int(c)] for c in labels], np.int64)


def _decision(model, X: np.ndarray) -> np.ndarray:
    d = model.decision_function(X)
    return np.stack([np.zeros_like(d), d], axis=1) if d.ndim == 1 else d


def _torch_features(net: nn.Module, paths: List[str], draft, classifier: str, preprocess: dict) -> np.ndarray:
    """fp32 features of ``paths`` with the backbone (its classifier bypassed)."""
    head = net.get_submodule(classifier)
    set_submodule(net, classifier, nn.Identity())
    try:
        batch = torch.stack([data.eval_transform(preprocess)(data.load_image(p, draft)) for p in paths])
        with torch.inference_mode():
            return net.eval()(batch).numpy()
    finally:
        set_submodule(net, classifier, head)


def _run_source(cfg: ExportConfig) -> Source:
    name = for_backbone(cfg.backbone.strip(), cfg.run)
    directory = run_dir(cfg.cache, name)
    metrics_path = os.path.join(directory, RUN_METRICS)
    if not os.path.isfile(metrics_path):
        runs = runs_dir(cfg.cache)
        done = sorted(d for d in os.listdir(runs) if os.path.isfile(os.path.join(runs, d, RUN_METRICS))) \
            if os.path.isdir(runs) else []
        raise UserError(f"no finished run {name!r} under {runs!r}; "
                        + (f"finished: {', '.join(done)}" if done else "run `make finetune` first"))
    try:
        rec = RunRecord.from_json(read_json(metrics_path))
    except (OSError, ValueError) as exc:  # RecordError is a ValueError
        raise UserError(f"{metrics_path!r} is unreadable ({exc}); rerun "
                        f"`python -m pipeline finetune --mode MODE --rebuild` for run {name!r}") from None
    checkpoint = os.path.join(directory, rec.checkpoint)
    if rec.checkpoint in rec.checkpoints:  # the bytes the run recorded, before they are loaded
        verify_checkpoint(checkpoint, rec.checkpoints[rec.checkpoint])
    try:
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
        state = ckpt["model"]
    except Exception as exc:
        raise UserError(f"checkpoint {checkpoint!r} is missing or damaged ({type(exc).__name__}); rerun "
                        f"`python -m pipeline finetune --mode {rec.mode} --rebuild`") from None
    classes = list(rec.classes)
    net = backbones.build_model(None, num_classes=len(classes), backbone=rec.backbone)
    net.load_state_dict(state)
    pp = backbones.get_backbone(rec.backbone).preprocess()
    module = ImageClassifier(net, len(classes), "softmax", pp["mean"], pp["std"]).eval()
    check = _run_check(module, rec, cfg.sample, pp)
    source_doc = {"kind": "run", "name": name, "mode": rec.mode, "seed": rec.seed,
                  "checkpoint": os.path.abspath(checkpoint), "checkpoint_sha256": files.file_digest(checkpoint, "sha256"),
                  "state_dict_sha256": backbones.state_dict_sha256(state), "epoch": ckpt.get("epoch"),
                  "metrics": os.path.abspath(metrics_path)}
    weights = dict(rec.weights.to_json(),
                   note="the initial weights the run trained from; the trained weights are the checkpoint's")
    return Source("run", name, source_doc, module, classes, weights, None, "the network's classifier output",
                  "softmax", check, pp)


def _run_check(module: ImageClassifier, rec: RunRecord, sample: int, preprocess: dict) -> Check:
    """The run's network in PyTorch on its val images, decoded and transformed as training did."""
    root = rec.data_root
    relpaths = rec.metrics["predictions"].get("paths") or []
    if not relpaths:
        if not os.path.isdir(root):
            raise UserError(f"the run's data folder {root!r} is gone; export checks the model on its val images")
        relpaths = [i.relpath for i in data.discover(root).splits["val"]]
    paths = [os.path.join(root, relpaths[i]) for i in _sample(len(relpaths), sample)]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise UserError(f"val image {missing[0]!r} of the run is missing; export checks the model on the run's val "
                        "images: restore the data folder")
    batch = torch.stack([data.eval_transform(preprocess)(data.load_image(p)) for p in paths])  # normalised here
    with torch.inference_mode():
        logits = module.net(batch)
    return Check("the run's network in PyTorch on the same val images", paths, logits.argmax(1).numpy(),
                 logits.numpy(), logits.softmax(1).numpy())


# --------------------------------------------------------------------------- writing


@dataclass
class ExportResult:
    path: str
    sidecar: str
    doc: dict

    def summary(self) -> str:
        d, v = self.doc, self.doc["verification"]
        label = "" if d["weights"]["pretrained"] else " (not pretrained: random backbone weights)"
        chosen = " (what compare recommends)" if d["source"].get("recommended_by") else ""
        lines = [f"exported {d['source']['kind']} {d['source']['name']}{chosen}{label} -> {self.path}",
                 f"  {d['size_bytes'] / 1e6:.1f} MB, ONNX opset {d['opset']}, outputs {', '.join(d['outputs'])}, "
                 f"{len(d['classes'])} classes, input {d['input']['shape']} in [0, 1]; {d['export_seconds']:.1f} s",
                 f"  checked on {v['images']} val images against {v['against']}: max |Δ probability| "
                 + ("-" if v["max_abs_diff_probabilities"] is None else f"{v['max_abs_diff_probabilities']:.2e}")
                 + ", max |Δ logit| " + ("-" if v["max_abs_diff_logits"] is None else f"{v['max_abs_diff_logits']:.2e}")
                 + f", predicted classes agree on {v['classes_agree']}/{v['images']}",
                 f"  sidecar {self.sidecar}; classify with: python -m pipeline predict --model {self.path} IMAGES"]
        return "\n".join(lines)


def _target(cfg: ExportConfig, kind: str, name: str) -> str:
    default = f"{kind}-{name}.onnx"
    out = cfg.out or export_dir(cfg.cache)
    if out.endswith(os.sep) or os.path.isdir(out) or not cfg.out:
        return os.path.join(out, default)
    return out


def _sidecar(path: str) -> str:
    root, ext = os.path.splitext(path)
    return (root if ext == ".onnx" else path) + ".json"


def _versions() -> Dict[str, str]:
    return library_versions(*TORCH_STACK, "onnx", "onnxruntime", "pipeline", "onnxscript")  # onnxscript: optional


def _verify(path: str, source: Source, tolerance: float) -> dict:
    """Run the written file with ONNX Runtime on the check's images and compare with the source."""
    client = OnnxClassifier(path, device="cpu")
    ok, logits, proba, errors = client.classify(source.check.paths)
    if errors:
        i, error = errors[0]
        raise UserError(f"val image {source.check.paths[i]!r} could not be decoded ({error}); it decoded when the "
                        "source was made: did the data change? Rerun `make features` / the run")
    check = source.check
    agree = int((logits.argmax(1) == check.predicted).sum())
    d_proba = None if proba is None or check.proba is None else float(np.abs(proba - check.proba).max())
    d_logits = None if check.logits is None else float(np.abs(logits - check.logits).max())
    scale = 1.0 if check.logits is None else max(1.0, float(np.abs(check.logits).max()))
    result = {"images": len(ok), "against": check.against, "tolerance": tolerance,
              "max_abs_diff_probabilities": d_proba, "max_abs_diff_logits": d_logits,
              "classes_agree": agree, "notes": check.notes}
    bad = agree != len(ok) or (d_proba is not None and d_proba > tolerance) \
        or (d_proba is None and d_logits is not None and d_logits > tolerance * scale)
    if bad:
        raise UserError(
            f"the exported model disagrees with {check.against}: predicted class differs on {len(ok) - agree} of "
            f"{len(ok)} val images, max |Δ probability| {d_proba if d_proba is None else f'{d_proba:.2e}'}, "
            f"max |Δ logit| {d_logits if d_logits is None else f'{d_logits:.2e}'} (tolerance {tolerance:g}); "
            "no file written. If the images changed since the source was made, remake it; otherwise report this")
    return result


def recommended(cfg: ExportConfig) -> Tuple[ExportConfig, str]:
    """``cfg`` naming the head or run that the last ``compare`` recommends, and the compare.json
    that says so; for several seeds of a mode, the seed its tests used."""
    path = report_files(cfg.reports)["json"]
    try:
        doc = read_json(path)
        row = next(r for r in doc["rows"] if r.get("recommended"))
        results = row["per_seed"]
        result = next((r for r in results if r.get("seed") == row.get("tested_seed")), results[0])
        kind, name, source = result["kind"], result["name"], result["source"]
    except FileNotFoundError:
        raise UserError(f"no comparison report at {path!r}; run `make compare` first (or pass --reports DIR), "
                        "or name the source with --head NAME / --run MODE[-SEED]") from None
    except (OSError, ValueError, KeyError, TypeError, StopIteration, IndexError) as exc:
        raise UserError(f"{path!r} names no recommended method ({type(exc).__name__}: {exc}); rerun `make compare`, "
                        "or name the source with --head NAME / --run MODE[-SEED]") from None
    if kind == "head":
        return dataclasses.replace(cfg, recommended=False, head=source), path
    cache = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(source))))  # <cache>/runs/<name>/...
    return dataclasses.replace(cfg, recommended=False, run=name, cache=cache), path


def run(cfg: ExportConfig) -> ExportResult:
    """Build, write and verify the ONNX file for ``cfg.head`` or ``cfg.run``; see the module doc."""
    started = time.perf_counter()
    if bool(cfg.head) + bool(cfg.run) + bool(cfg.recommended) != 1:  # here: ExportConfig's defaults name none
        raise ParameterError("name one source: {head} NAME (a saved head), {run} MODE[-SEED] (a finished run) or "
                             "{recommended} (what `compare` recommends)", "head", "run", "recommended")
    chosen_by = ""
    if cfg.recommended:
        cfg, chosen_by = recommended(cfg)
    try:
        import onnx
    except ImportError:
        raise UserError("export needs onnx, onnxscript and onnxruntime: pip install 'pipeline[onnx]'") from None
    source = _head_source(cfg) if cfg.head else _run_source(cfg)
    path = _target(cfg, source.kind, source.name)
    pp = source.preprocess
    crop = pp["crop"]
    names = output_names(source.proba)
    info = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "source": dict(source.doc, **({"recommended_by": os.path.abspath(chosen_by)} if chosen_by else {})),
        "classes": source.classes,
        "input": {"name": "image", "shape": ["N", 3, crop, crop], "dtype": "float32", "range": [0, 1],
                  "layout": "NCHW, RGB"},
        "outputs": {"logits": source.logits, **({"probabilities": source.proba_text or _PROBA_TEXT[source.proba]}
                                                 if source.proba != "none" else {})},
        "preprocessing": {
            "decode": "RGB; EXIF orientation applied; palette and alpha composited on white; 16-bit rescaled",
            "draft_jpeg_min_side": source.draft, "resize": pp["resize"], "crop": crop,
            "interpolation": pp["interpolation"], "antialias": True,
            "mean": list(pp["mean"]), "std": list(pp["std"]),
            "normalization": "inside the graph: feed pixels / 255 after resize and center crop",
        },
        "weights": source.weights,
        "pretrained": source.weights["pretrained"],
        "opset": ONNX_OPSET,
        "versions": _versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    proto = _to_onnx(source.module, crop, names)
    onnx.helper.set_model_props(proto, {k: json.dumps(v) for k, v in info.items()})
    proto.doc_string = (f"{source.kind} {source.name}: image classifier exported by `python -m pipeline export`; "
                        "metadata_props hold the classes and preprocessing (JSON)")
    payload = proto.SerializeToString()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sidecar = _sidecar(path)

    def write_verified(fh):
        fh.write(payload)
        fh.flush()
        info["verification"] = _verify(fh.name, source, cfg.tolerance)  # before the file gets its name
        if os.path.exists(sidecar):
            os.remove(sidecar)  # an old sidecar must never describe the new file

    files.atomic_write(path, write_verified)
    info.update({"file": os.path.basename(path), "sha256": files.file_digest(path, "sha256"),
                 "size_bytes": os.path.getsize(path), "export_seconds": time.perf_counter() - started})
    save_json(info, sidecar)
    return ExportResult(path, sidecar, info)


_PROBA_TEXT = {
    "softmax": "softmax of the logits (scikit-learn's predict_proba for logistic regression; a run's softmax)",
    "ovr-sigmoid": "sigmoid of each logit, normalised to sum 1 (scikit-learn's one-vs-rest predict_proba)",
}
