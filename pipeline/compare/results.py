"""Compare, part 1: load head and run records, check they are comparable, group them into rows.

Reads ``<cache>/heads/*.json`` (:class:`~pipeline.records.HeadRecord`) and
``<cache>/runs/*/metrics.json`` (:class:`~pipeline.records.RunRecord`) into :class:`Result`s,
keeps those measured on the same data root, class list and val images as a reference, and
groups them into table :class:`Row`s (several seeds of one run setting form one row).
Unreadable or incomplete files are skipped with a warning, never half-used.

Compute time: a head's total is the *full* feature extraction of the cache it was fitted on
plus its own fit time (the extraction is shared by every head on that cache, but each head
needs all of it, so each is charged in full: the fair cost of choosing that head alone). A
run's total is its training time: ``total_seconds`` less the val passes made during training
(``eval_seconds``: diagnostics only, skipped with ``finetune --eval-every 0``), shown apart; and in
device-seconds: times the ranks that trained it together under torchrun (``world_size``, 1 without it).

Rows: several seeds of one end-to-end *setting* form one row; the setting is the mode, weights,
epochs, selection rule, images per class and every training setting of
:data:`pipeline.records.RUN_SETTING_KEYS` (backbone, lr, batch size, momentum, weight decay,
schedule, bn, trainable-from, precision). Runs that differ in any of them are separate rows.
"""
from __future__ import annotations

import glob
import json
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import UserError
from ..config import DEFAULT_BACKBONE
from ..features import store
from ..paths import RUN_HISTORY, RUN_METRICS, for_backbone, heads_dir, runs_dir
from ..records import HeadRecord, RecordError, RunRecord, read_json, run_setting

__all__ = ["NOT_PRETRAINED", "Result", "Row", "weights_label", "load_results", "choose_reference",
           "split_comparable", "views_share", "setting_key", "make_rows", "correct_matrix", "mean_std"]

NOT_PRETRAINED = "not pretrained"


class _Skip(Exception):
    """A result file that cannot be used (reason in the message)."""


# --------------------------------------------------------------------------- results


@dataclass
class Result:
    """One head sidecar or one run's ``metrics.json``, normalised to what the report needs.

    Times are seconds except ``predict_ms`` (milliseconds per image, end to end: for a head,
    the backbone's extraction time per image plus the head's own prediction time).
    """

    kind: str  # "head" | "run"
    name: str  # head file stem, or run folder name
    method: str  # what the row shows: head name, or run mode (+ its selection rule)
    source: str  # the JSON file it came from
    metrics: dict
    classes: List[str]
    data_root: str
    weights_id: str
    weights_sha256: str
    pretrained: bool
    total_seconds: float
    train_seconds: float
    predict_ms: float
    trainable_parameters: Optional[int]
    device: str
    seed: Optional[int] = None
    epochs: Optional[int] = None
    head: str = ""  # heads: the registry name (logistic, ridge, ...)
    extract_seconds: float = 0.0  # heads: the extraction of their feature cache they are charged
    extract_images: int = 0  # heads: the images that extraction covered
    features_path: str = ""  # heads: the feature cache they were fitted on
    features_key: str = ""  # heads: content key of that cache
    used_views: bool = False  # heads: also trained on cached augmented views
    selection: str = ""  # runs: "final" or "holdout:F" (never val)
    train_per_class: int = 0  # runs: K of --train-per-class (0: every train image)
    best_val_epoch: Optional[int] = None  # runs: the tutorial's epoch, chosen on val (optimistic)
    backbone: str = DEFAULT_BACKBONE  # the network the features or the run came from
    best_val_acc: Optional[float] = None
    history: Optional[dict] = None  # runs: history.json
    setting: Dict[str, object] = field(default_factory=dict)  # runs: records.run_setting of its settings
    eval_seconds: float = 0.0  # runs: val passes during training (diagnostics; not in total_seconds)
    created: str = ""
    issue: str = ""  # why it is not comparable with the reference ("" when it is)

    @property
    def accuracy(self) -> float:
        return float(self.metrics["accuracy"])

    @property
    def ci95(self) -> Tuple[float, float]:
        lo, hi = self.metrics["accuracy_ci95"]
        return float(lo), float(hi)

    @property
    def balanced_accuracy(self) -> float:
        return float(self.metrics["balanced_accuracy"])

    @property
    def n(self) -> int:
        return int(self.metrics["n"])

    @property
    def paths(self) -> Optional[List[str]]:
        return self.metrics["predictions"].get("paths")

    @property
    def weights_label(self) -> str:
        return weights_label(self.weights_id, self.pretrained)

    def correct_by_path(self) -> Dict[str, bool]:
        p = self.metrics["predictions"]
        return {path: t == y for path, t, y in zip(p["paths"], p["y_true"], p["y_pred"])}


def weights_label(weights_id: str, pretrained: bool) -> str:
    """``imagenet`` or ``random-seed0 (not pretrained)``: the label used everywhere."""
    return weights_id if pretrained else f"{weights_id} ({NOT_PRETRAINED})"


def views_share(features_path: str) -> float:
    """The share of a feature cache's extraction spent on augmented views, by forward passes:
    ``K * n_train / (n_images + K * n_train)`` for ``K`` views of each train image (each view is
    one more pass of the same network over the same image size); 0 without views or without the
    file."""
    try:
        splits = store.read_meta(features_path)["splits"]
    except Exception:  # a moved or damaged cache: charge in full, as before
        return 0.0
    plain = sum(info["n"] for info in splits.values())
    views = sum(info["n"] * info["views"] for info in splits.values())
    return views / (plain + views) if plain + views else 0.0


def _load_head(path: str, doc: dict) -> Result:
    rec = HeadRecord.from_json(doc)
    feats = rec.features
    if rec.metrics["n"] == 0:
        raise _Skip("no val images were evaluated (n=0)")
    backbone_ms = 1000.0 * feats.extract_seconds / feats.n_images if feats.n_images > 0 else 0.0
    # Augmented views are charged only to the heads trained on them.
    share = 0.0 if rec.used_views or not feats.path or not os.path.isfile(feats.path) else views_share(feats.path)
    extract = feats.extract_seconds * (1.0 - share)
    return Result(
        kind="head", name=rec.name, method=rec.name, source=path,
        metrics=rec.metrics, classes=list(rec.classes), data_root=rec.data_root,
        weights_id=feats.weights.id, weights_sha256=feats.weights.sha256, pretrained=feats.weights.pretrained,
        total_seconds=extract + rec.fit_seconds, train_seconds=rec.fit_seconds,
        predict_ms=backbone_ms + rec.predict_us_per_image / 1000.0,
        trainable_parameters=rec.trainable_parameters,
        device=feats.extract_device, head=str(rec.settings.get("head", rec.name)),
        extract_seconds=extract, extract_images=feats.n_images, features_path=feats.path,
        features_key=feats.content_key,
        used_views=rec.used_views, backbone=feats.backbone or DEFAULT_BACKBONE,
    )


def _load_run(path: str, doc: dict) -> Result:
    if doc.get("complete") is not True:
        raise _Skip("run is not complete (interrupted?); rerun `python -m pipeline finetune` to finish it")
    rec = RunRecord.from_json(doc)
    if rec.metrics["n"] == 0:
        raise _Skip("no val images were evaluated (n=0)")
    rule = rec.selection.get("rule", "final")
    selection = "final" if rule == "final" else f"holdout:{rec.selection.get('fraction', 0):g}"
    result = Result(
        kind="run", name=rec.name,
        method=for_backbone(rec.backbone, rec.mode) + ("" if rule == "final" else f" ({selection})"),
        source=path, metrics=rec.metrics, classes=list(rec.classes), data_root=rec.data_root,
        weights_id=rec.weights.id, weights_sha256=rec.weights.sha256, pretrained=rec.weights.pretrained,
        total_seconds=(rec.total_seconds - rec.eval_seconds) * rec.world_size,
        train_seconds=(rec.total_seconds - rec.eval_seconds) * rec.world_size,
        predict_ms=rec.predict_ms_per_image, trainable_parameters=rec.trainable_parameters,
        device=rec.device, seed=rec.seed, epochs=rec.epochs, selection=selection,
        train_per_class=rec.train_per_class, best_val_epoch=rec.best_val_epoch, best_val_acc=rec.best_val_acc,
        setting=run_setting(rec.settings), eval_seconds=rec.eval_seconds, created=rec.created,
        backbone=rec.backbone,
    )
    result.history = _load_history(os.path.join(os.path.dirname(path), RUN_HISTORY))
    return result


def _load_history(path: str) -> Optional[dict]:
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            history = json.load(fh)
        if not isinstance(history.get("epochs"), list):
            raise ValueError("no 'epochs' list")
        return history
    except (OSError, ValueError, AttributeError) as exc:
        warnings.warn(f"ignoring learning curve {path!r}: {exc}; rerun `python -m pipeline finetune --rebuild`")
        return None


def load_results(cache: str) -> Tuple[List[Result], List[dict]]:
    """Every usable head and run result under ``cache``, and the files skipped (with why).

    Unparseable or incomplete files are skipped with a warning, never half-used.
    """
    files = sorted(glob.glob(os.path.join(heads_dir(cache), "*.json")))
    files += sorted(glob.glob(os.path.join(runs_dir(cache), "*", RUN_METRICS)))
    results, skipped = [], []
    for path in files:
        try:
            doc = read_json(path)
            if not isinstance(doc, dict):
                raise _Skip("not a JSON object")
            kind = doc.get("kind")
            if kind == "head":
                results.append(_load_head(path, doc))
            elif kind == "run":
                results.append(_load_run(path, doc))
            else:
                raise _Skip(f"kind {kind!r}; expected 'head' or 'run'")
        except (_Skip, OSError, ValueError, TypeError, KeyError) as exc:
            reason = str(exc) if isinstance(exc, (_Skip, RecordError)) else (
                f"unreadable ({type(exc).__name__}: {exc}); delete it or rerun the stage that wrote it "
                "(make heads / make finetune)")
            warnings.warn(f"ignoring {path}: {reason}")
            skipped.append({"path": path, "reason": reason})
    return results, skipped


# --------------------------------------------------------------------------- comparability


def _norm_root(root: str) -> str:
    return os.path.normcase(os.path.realpath(root)) if root else ""


def same_root(a: str, b: str) -> bool:
    return _norm_root(a) == _norm_root(b)


def _val_signature(r: Result) -> tuple:
    paths = r.paths
    return (_norm_root(r.data_root), tuple(r.classes), tuple(sorted(paths)) if paths is not None else None)


def choose_reference(results: List[Result], data: str) -> Result:
    """The result whose (data root, classes, val images) the others are compared against.

    With ``data`` given, only results from that root qualify; otherwise the signature most
    results share wins (ties: the one with more heads, then by file name).
    """
    candidates = [r for r in results if r.paths is not None]
    if data:
        candidates = [r for r in candidates if same_root(r.data_root, data)]
        if not candidates:
            roots = sorted({r.data_root for r in results})
            raise UserError(
                f"no head or run result was measured on data root {os.path.abspath(data)!r} "
                f"(results found for: {roots}); run `make compare DATA_DIR={data}` to produce them, "
                "or leave out --data to compare the results that exist"
            )
    if not candidates:
        raise UserError("no result stores per-image val paths (metrics.predictions.paths), so none can be "
                        "checked or paired; rerun `make heads` and `make finetune` with this version")
    counts = Counter(_val_signature(r) for r in candidates)
    heads = Counter(_val_signature(r) for r in candidates if r.kind == "head")
    best_sig = max(counts, key=lambda s: (counts[s], heads[s], -min(
        i for i, r in enumerate(candidates) if _val_signature(r) == s)))
    return next(r for r in candidates if _val_signature(r) == best_sig)


def _issue(r: Result, ref: Result) -> str:
    """Why ``r`` cannot be compared with ``ref`` ("" when it can)."""
    if not same_root(r.data_root, ref.data_root):
        return f"different data root {r.data_root!r} (reference: {ref.data_root!r})"
    if list(r.classes) != list(ref.classes):
        return f"different class list {r.classes} (reference: {ref.classes})"
    if r.paths is None:
        return "no per-image val paths stored, so its val set cannot be checked or paired"
    if sorted(r.paths) != sorted(ref.paths):
        mine, theirs = set(r.paths), set(ref.paths)
        return (f"different val images ({len(mine)} vs {len(theirs)}; {len(mine - theirs)} not in the "
                f"reference, {len(theirs - mine)} missing)")
    truth = dict(zip(ref.paths, ref.metrics["predictions"]["y_true"]))
    wrong = sum(truth[p] != t for p, t in zip(r.paths, r.metrics["predictions"]["y_true"]))
    if wrong:
        return f"{wrong} val image(s) carry a different true label than in the reference"
    return ""


def split_comparable(results: List[Result], ref: Result) -> Tuple[List[Result], List[Result]]:
    """``(comparable, excluded)``; each excluded result's ``issue`` says why (also warned)."""
    comparable, excluded = [], []
    for r in results:
        r.issue = _issue(r, ref)
        (excluded if r.issue else comparable).append(r)
    for r in excluded:
        warnings.warn(f"not comparing {r.source}: {r.issue}")
    return comparable, excluded


def correct_matrix(results: Sequence[Result], paths: Sequence[str]) -> np.ndarray:
    """``(n_results, n_images)`` bool: each result right or wrong on each image of ``paths``
    (the pairing of McNemar's test; every result must hold every path)."""
    out = np.zeros((len(results), len(paths)), dtype=bool)
    for i, r in enumerate(results):
        ok = r.correct_by_path()
        out[i] = [ok[p] for p in paths]
    return out


def mean_std(values: Sequence[float]) -> Tuple[float, Optional[float]]:
    """Mean and sample std (ddof=1); std is None for a single value."""
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), (float(arr.std(ddof=1)) if arr.size > 1 else None)


# --------------------------------------------------------------------------- rows


@dataclass
class Row:
    """One table row: a head, or one end-to-end setting (several seeds aggregated).

    ``representative`` is the result the paired tests, the confusion matrix and the
    prediction grid use: for several seeds, the lowest seed (fixed in advance, never chosen
    by its val accuracy).
    """

    label: str
    kind: str
    method: str
    weights_id: str
    pretrained: bool
    results: List[Result]
    representative: Result  # the lowest seed: confusion matrix and prediction grid (tests use every seed)
    accuracy: float
    accuracy_std: Optional[float]
    balanced_accuracy: float
    balanced_accuracy_std: Optional[float]
    total_seconds: float
    train_seconds: float
    predict_ms: float
    trainable_parameters: Optional[int]
    device: str
    eval_seconds: float = 0.0  # runs: mean val passes during training (not in total_seconds)
    top: bool = False  # no other row beats it significantly (Holm-adjusted, every seed)
    recommended: bool = False  # the cheapest row non-inferior to the most accurate within the margin
    beaten_by: List[str] = field(default_factory=list)  # labels of the rows that beat it
    backbone: str = DEFAULT_BACKBONE
    best: bool = False  # the most accurate row (mean over seeds; ties: the cheapest)
    gap: Optional[object] = None  # metrics.Difference: this row minus the most accurate, every seed
    noninferior: bool = False  # gap's 95% CI lower bound > -margin

    @property
    def ci95(self) -> Optional[Tuple[float, float]]:
        return self.results[0].ci95 if len(self.results) == 1 else None

    @property
    def seeds(self) -> int:
        return len(self.results)

    @property
    def weights_label(self) -> str:
        return weights_label(self.weights_id, self.pretrained)

    @property
    def best_val(self) -> Optional[Tuple[float, List[int]]]:
        """Runs: (mean best-val accuracy over seeds, each seed's best-val epoch); chosen on val."""
        accs = [r.best_val_acc for r in self.results if r.best_val_acc is not None]
        if self.kind != "run" or not accs:
            return None
        return float(np.mean(accs)), [r.best_val_epoch for r in self.results]


def _seeded_random(r: Result) -> bool:
    """Random init drawn from the run's own seed (``--weights random``, ``scratch``): the weights
    differ with the seed by design, so they are part of the seed, not of the setting."""
    return not r.pretrained and r.seed is not None and r.weights_id == f"random-seed{r.seed}"


def setting_key(r: Result) -> tuple:
    """What makes runs one setting (one row): everything but the seed (and a random init drawn
    from the seed)."""
    weights = "random-seed<seed>" if _seeded_random(r) else r.weights_id
    return (r.kind, r.method, weights, r.epochs, r.selection, r.train_per_class,
            tuple(sorted((k, repr(v)) for k, v in r.setting.items())))


def _one_per_seed(members: List[Result]) -> List[Result]:
    """Two results of one setting and one seed (an old run folder beside a renamed one): the newest
    counts, the other is named in a warning, never averaged in as another seed."""
    by_seed: Dict[object, Result] = {}
    for r in sorted(members, key=lambda r: (r.created, r.source)):
        if r.seed in by_seed:
            warnings.warn(f"{by_seed[r.seed].source} and {r.source} hold the same setting and seed {r.seed}; "
                          f"using the newer, {r.source} (delete the other folder to silence this)")
        by_seed[r.seed] = r
    return list(by_seed.values())


def make_rows(results: List[Result]) -> List[Row]:
    """One row per head and per end-to-end setting (:func:`setting_key`, the backbone among it; seeds
    aggregated)."""
    groups: Dict[tuple, List[Result]] = {}
    for r in results:
        key = setting_key(r) if r.kind == "run" else ("head", r.source)
        groups.setdefault(key, []).append(r)
    rows = []
    for members in groups.values():
        members = _one_per_seed(members) if members[0].kind == "run" else members
        members.sort(key=lambda r: (r.seed if r.seed is not None else -1, r.name))
        first = members[0]
        acc, acc_std = mean_std([r.accuracy for r in members])
        bal, bal_std = mean_std([r.balanced_accuracy for r in members])
        params = {r.trainable_parameters for r in members}
        rows.append(Row(
            label=first.method, kind=first.kind, method=first.method,
            weights_id=(first.weights_id if len({r.weights_id for r in members}) == 1
                        else "random-seed" + ",".join(str(r.seed) for r in members)),
            pretrained=first.pretrained, results=members, representative=first,
            accuracy=acc, accuracy_std=acc_std, balanced_accuracy=bal, balanced_accuracy_std=bal_std,
            total_seconds=mean_std([r.total_seconds for r in members])[0],
            train_seconds=mean_std([r.train_seconds for r in members])[0],
            predict_ms=mean_std([r.predict_ms for r in members])[0],
            trainable_parameters=params.pop() if len(params) == 1 else None,
            device=", ".join(sorted({r.device for r in members if r.device})),
            eval_seconds=mean_std([r.eval_seconds for r in members])[0], backbone=first.backbone,
        ))
    _disambiguate(rows)
    return rows


def _disambiguate(rows: List[Row]) -> None:
    """Make labels unique: add the training settings that differ (runs), then the weights, then
    augmented views / epochs, then the file name."""
    def clashes():
        counts = Counter(r.label for r in rows)
        return [r for r in rows if counts[r.label] > 1]

    suffixes = {}
    for r in clashes():  # runs of other training settings: name the settings that differ
        if r.kind == "run":
            same = [o for o in rows if o.label == r.label]
            differ = [k for k in sorted(r.results[0].setting)
                      if len({repr(o.results[0].setting.get(k)) for o in same}) > 1]
            if differ:
                suffixes[id(r)] = " " + ", ".join(f"{k}={r.results[0].setting[k]}" for k in differ)
    for r in rows:
        r.label += suffixes.get(id(r), "")
    for r in clashes():
        r.label = r.label.replace(r.method, f"{r.method} [{r.weights_label}]", 1)
    for r in clashes():
        if r.kind == "run" and r.results[0].epochs is not None:
            r.label += f" {r.results[0].epochs} ep"
        elif r.kind == "head" and r.results[0].used_views:
            r.label += " +views"
    for r in clashes():
        r.label += f" ({os.path.basename(r.results[0].source)})"
