"""Stage 4: every head and end-to-end run side by side, with honest uncertainty.

Reads ``<cache>/heads/*.json`` (head sidecars) and ``<cache>/runs/*/metrics.json`` (end-to-end
runs), checks that they were measured on the same data root, class list and val images,
and writes ``<reports>/compare.md`` (table + figures), ``compare.csv`` and ``compare.json``.

Statistics
----------
- Val accuracy carries the 95% Wilson interval computed by :func:`pipeline.metrics.evaluate`.
- The best method (highest val accuracy; ties go to the cheaper one) is tested against every
  other with an exact McNemar test on paired per-image predictions (two-sided binomial test
  on the discordant pairs). Methods with ``p >= alpha`` are marked "not significantly
  different" from the best. No multiple-comparison correction is applied.
- Several seeds of one run mode form one row: mean ± sample std; the paired test of such a
  row uses its median-accuracy seed; per-seed rows are in the CSV and JSON.

Compute time
------------
A head's total compute time is the *full* feature extraction of the cache it was fitted
on plus its own fit time: the extraction is shared by every head on that cache, but each
head needs all of it, so each is charged in full (the fair cost of choosing that head
alone). A run's total is its ``total_seconds``.
"""
from __future__ import annotations

import csv
import glob
import io
import json
import logging
import math
import os
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .config import CompareConfig
from .files import atomic_write
from .errors import DamagedCacheError, UserError
from .paths import heads_dir, report_files, runs_dir
from .records import HeadRecord, RecordError, RunRecord, read_json
from .text import format_duration, format_table

__all__ = [
    "NOT_PRETRAINED",
    "Result",
    "Row",
    "CompareResult",
    "mcnemar_exact",
    "load_results",
    "run",
]

log = logging.getLogger(__name__)

NOT_PRETRAINED = "not pretrained"


class _Skip(Exception):
    """A result file that cannot be used (reason in the message)."""


# --------------------------------------------------------------------------- results


@dataclass
class Result:
    """One head sidecar or one run's ``metrics.json``, normalised to what the table needs.

    Times are seconds except ``predict_ms`` (milliseconds per image, end to end: for a head,
    the backbone's extraction time per image plus the head's own prediction time).
    """

    kind: str  # "head" | "run"
    name: str  # head name, or run folder name (mode[-seed])
    method: str  # what the row shows: head name, or run mode
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
    extract_seconds: float = 0.0  # heads: the whole extraction of their feature cache
    features_path: str = ""  # heads: the feature cache they were fitted on
    features_key: str = ""  # heads: content key of that cache
    used_views: bool = False  # heads: also trained on cached augmented views
    history: Optional[dict] = None  # runs: history.json
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


def _load_head(path: str, doc: dict) -> Result:
    rec = HeadRecord.from_json(doc)
    feats = rec.features
    if rec.metrics["n"] == 0:
        raise _Skip("no val images were evaluated (n=0)")
    backbone_ms = 1000.0 * feats.extract_seconds / feats.n_images if feats.n_images > 0 else 0.0
    return Result(
        kind="head", name=rec.name, method=rec.name, source=path,
        metrics=rec.metrics, classes=list(rec.classes), data_root=rec.data_root,
        weights_id=feats.weights.id, weights_sha256=feats.weights.sha256, pretrained=feats.weights.pretrained,
        total_seconds=feats.extract_seconds + rec.fit_seconds, train_seconds=rec.fit_seconds,
        predict_ms=backbone_ms + rec.predict_us_per_image / 1000.0,
        trainable_parameters=rec.trainable_parameters,
        device=feats.extract_device, extract_seconds=feats.extract_seconds,
        features_path=feats.path, features_key=feats.content_key, used_views=rec.used_views,
    )


def _load_run(path: str, doc: dict) -> Result:
    if doc.get("complete") is not True:
        raise _Skip("run is not complete (interrupted?); rerun `python -m pipeline finetune` to finish it")
    rec = RunRecord.from_json(doc)
    if rec.metrics["n"] == 0:
        raise _Skip("no val images were evaluated (n=0)")
    result = Result(
        kind="run", name=rec.name, method=rec.mode, source=path,
        metrics=rec.metrics, classes=list(rec.classes), data_root=rec.data_root,
        weights_id=rec.weights.id, weights_sha256=rec.weights.sha256, pretrained=rec.weights.pretrained,
        total_seconds=rec.total_seconds, train_seconds=rec.total_seconds,
        predict_ms=rec.predict_ms_per_image, trainable_parameters=rec.trainable_parameters,
        device=rec.device, seed=rec.seed, epochs=rec.epochs,
    )
    result.history = _load_history(os.path.join(os.path.dirname(path), "history.json"))
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
    files += sorted(glob.glob(os.path.join(runs_dir(cache), "*", "metrics.json")))
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


def _val_signature(r: Result) -> tuple:
    paths = r.paths
    return (_norm_root(r.data_root), tuple(r.classes), tuple(sorted(paths)) if paths is not None else None)


def _choose_reference(results: List[Result], data: str) -> Result:
    """The result whose (data root, classes, val images) the others are compared against.

    With ``data`` given, only results from that root qualify; otherwise the signature most
    results share wins (ties: the one with more heads, then by file name).
    """
    candidates = [r for r in results if r.paths is not None]
    if data:
        want = _norm_root(data)
        candidates = [r for r in candidates if _norm_root(r.data_root) == want]
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
    if _norm_root(r.data_root) != _norm_root(ref.data_root):
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


# --------------------------------------------------------------------------- statistics


def mcnemar_exact(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value from the discordant-pair counts.

    Under the null hypothesis each of the ``n = b + c`` discordant images is equally likely
    to favour either method, so ``b ~ Binomial(n, 1/2)`` and
    ``p = min(1, 2 * sum_{k <= min(b, c)} C(n, k) / 2**n)`` (computed exactly).

    Parameters
    ----------
    b : int
        Images the first method gets right and the second gets wrong.
    c : int
        Images the first method gets wrong and the second gets right.
    """
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b!r}, c={c!r}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
    return float(min(Fraction(1), Fraction(2 * tail, 2 ** n)))


def _discordant(a: Result, other: Result) -> Tuple[int, int]:
    """(a right & other wrong, a wrong & other right), paired by image path."""
    ca, co = a.correct_by_path(), other.correct_by_path()
    b = sum(1 for p, ok in ca.items() if ok and not co[p])
    c = sum(1 for p, ok in ca.items() if not ok and co[p])
    return b, c


def _mean_std(values: Sequence[float]) -> Tuple[float, Optional[float]]:
    """Mean and sample std (ddof=1); std is None for a single value."""
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), (float(arr.std(ddof=1)) if arr.size > 1 else None)


# --------------------------------------------------------------------------- rows


@dataclass
class Row:
    """One table row: a head, or one run mode (several seeds aggregated)."""

    label: str
    kind: str
    method: str
    weights_id: str
    pretrained: bool
    results: List[Result]
    representative: Result  # the result used for paired tests, grids and confusion matrices
    accuracy: float
    accuracy_std: Optional[float]
    balanced_accuracy: float
    balanced_accuracy_std: Optional[float]
    total_seconds: float
    train_seconds: float
    predict_ms: float
    trainable_parameters: Optional[int]
    device: str
    p_value: Optional[float] = None
    discordant: Optional[Tuple[int, int]] = None
    mark: str = ""  # "best" | "not significantly different" | "worse"

    @property
    def ci95(self) -> Optional[Tuple[float, float]]:
        return self.results[0].ci95 if len(self.results) == 1 else None

    @property
    def seeds(self) -> int:
        return len(self.results)

    @property
    def weights_label(self) -> str:
        return weights_label(self.weights_id, self.pretrained)


def _make_rows(results: List[Result]) -> List[Row]:
    groups: Dict[tuple, List[Result]] = {}
    for r in results:
        key = (r.kind, r.method, r.weights_id, r.epochs) if r.kind == "run" else ("head", r.source)
        groups.setdefault(key, []).append(r)
    rows = []
    for members in groups.values():
        members.sort(key=lambda r: (r.seed if r.seed is not None else -1, r.name))
        first = members[0]
        acc, acc_std = _mean_std([r.accuracy for r in members])
        bal, bal_std = _mean_std([r.balanced_accuracy for r in members])
        # Median-accuracy seed (lower median on even counts) stands for the row in paired tests.
        ranked = sorted(members, key=lambda r: (r.accuracy, r.seed if r.seed is not None else -1))
        params = {r.trainable_parameters for r in members}
        rows.append(Row(
            label=first.method, kind=first.kind, method=first.method, weights_id=first.weights_id,
            pretrained=first.pretrained, results=members, representative=ranked[(len(ranked) - 1) // 2],
            accuracy=acc, accuracy_std=acc_std, balanced_accuracy=bal, balanced_accuracy_std=bal_std,
            total_seconds=_mean_std([r.total_seconds for r in members])[0],
            train_seconds=_mean_std([r.train_seconds for r in members])[0],
            predict_ms=_mean_std([r.predict_ms for r in members])[0],
            trainable_parameters=params.pop() if len(params) == 1 else None,
            device=", ".join(sorted({r.device for r in members if r.device})),
        ))
    _disambiguate(rows)
    return rows


def _disambiguate(rows: List[Row]) -> None:
    """Make labels unique: add the weights, then augmented views / epochs, then the file name."""
    def clashes():
        counts = Counter(r.label for r in rows)
        return [r for r in rows if counts[r.label] > 1]

    for r in clashes():
        r.label = f"{r.method} [{r.weights_label}]"
    for r in clashes():
        if r.kind == "run" and r.results[0].epochs is not None:
            r.label += f" {r.results[0].epochs} ep"
        elif r.kind == "head" and r.results[0].used_views:
            r.label += " +views"
    for r in clashes():
        r.label += f" ({os.path.basename(r.results[0].source)})"


def _rank_and_test(rows: List[Row], alpha: float) -> Optional[Row]:
    """Order rows best first, then test the best against every other (exact McNemar)."""
    rows.sort(key=lambda r: (-r.accuracy, r.total_seconds, r.label))
    if not rows:
        return None
    best = rows[0]
    best.mark = "best"
    for row in rows[1:]:
        b, c = _discordant(best.representative, row.representative)
        row.discordant = (b, c)
        row.p_value = mcnemar_exact(b, c)
        row.mark = "not significantly different" if row.p_value >= alpha else "worse"
    return best


# --------------------------------------------------------------------------- formatting


def _fmt_params(n: Optional[int]) -> str:
    if n is None:
        return "?"
    n = int(n)
    if n >= 1_000_000:
        return f"{n / 1e6:.1f} M"
    if n >= 10_000:
        return f"{n / 1e3:.0f} k"
    return f"{n:,}"


def _fmt_acc(mean: float, std: Optional[float], seeds: int) -> str:
    return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f} ({seeds} seeds)"


def _fmt_mark(row: Row) -> str:
    if row.mark == "best":
        return "**best**"
    b, c = row.discordant or (0, 0)
    sign = "≈ best" if row.mark == "not significantly different" else "worse"
    return f"{sign} (p={row.p_value:.2g}; {b}/{c})"


_HEADER = ("method", "kind", "val acc", "95% CI", "balanced acc", "total time", "training time",
           "inference/img", "trainable params", "weights", "device", "vs best")


def _table_cells(row: Row) -> List[str]:
    ci = row.ci95
    return [
        row.label,
        "head" if row.kind == "head" else "end-to-end",
        _fmt_acc(row.accuracy, row.accuracy_std, row.seeds),
        f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "per seed ↓",
        _fmt_acc(row.balanced_accuracy, row.balanced_accuracy_std, row.seeds).split(" (")[0],
        format_duration(row.total_seconds) + (" ¹" if row.kind == "head" else ""),
        format_duration(row.train_seconds),
        f"{row.predict_ms:.1f} ms",
        _fmt_params(row.trainable_parameters),
        row.weights_label,
        row.device or "?",
        _fmt_mark(row),
    ]


# --------------------------------------------------------------------------- result object


@dataclass
class CompareResult:
    """What ``run`` produced: rows best first, excluded results, output files."""

    rows: List[Row]
    excluded: List[Result]
    skipped: List[dict]
    best: Optional[Row]
    reference: dict
    alpha: float
    outputs: Dict[str, str] = field(default_factory=dict)  # name -> path
    figures: Dict[str, str] = field(default_factory=dict)  # name -> path
    table: str = ""

    def summary(self) -> str:
        lines = [self.table, ""]
        if any(row.seeds > 1 for row in self.rows):
            lines += ["Per seed:", _seed_table(self), ""]
        lines.extend(_notes(self))
        if self.excluded:
            lines.append("")
            lines.append(f"NOT COMPARED ({len(self.excluded)} result(s) measured on other data; see compare.md):")
            lines.extend(f"  {r.source}: {r.issue}" for r in self.excluded)
        lines.append("")
        lines.append("report: " + ", ".join(self.outputs.values()))
        return "\n".join(lines)


def _seed_table(res: CompareResult) -> str:
    """One line per seed of every row that aggregates several seeds."""
    lines = []
    for row in res.rows:
        if row.seeds < 2:
            continue
        for r in row.results:
            lo, hi = r.ci95
            if row is res.best:
                vs = "tested" if r is row.representative else ""
            else:
                b, c = _discordant(res.best.representative, r)
                vs = f"p={mcnemar_exact(b, c):.2g}; {b}/{c}"
            lines.append([row.label, str(r.seed), f"{r.accuracy:.3f}", f"[{lo:.3f}, {hi:.3f}]",
                          f"{r.balanced_accuracy:.3f}", format_duration(r.total_seconds), r.weights_label, vs])
    return format_table(("method", "seed", "val acc", "95% CI", "balanced acc", "total time", "weights",
                         "vs best"), lines, markdown=True)


def _notes(res: CompareResult) -> List[str]:
    ref = res.reference
    notes = []
    if res.best is not None:
        best = res.best
        ci = best.ci95
        ci_txt = f" [95% CI {ci[0]:.3f}, {ci[1]:.3f}]" if ci else f" (mean of {best.seeds} seeds)"
        tied = [r.label for r in res.rows if r.mark == "not significantly different"]
        notes.append(f"Best: {best.label} (weights {best.weights_label}), val accuracy {best.accuracy:.3f}{ci_txt}.")
        notes.append(
            f"Not significantly different from it (exact McNemar, alpha {res.alpha:g}): "
            + (", ".join(tied) if tied else "none") + ".")
    notes.append(f"Val set: {ref['n_val']} images of {len(ref['classes'])} classes "
                 f"({', '.join(ref['classes'])}) under {ref['data_root']}.")
    if any(not r.pretrained for r in res.rows):
        ids = sorted({r.weights_id for r in res.rows if not r.pretrained})
        notes.append(f"Results with weights {', '.join(ids)} are {NOT_PRETRAINED} (random init): "
                     "not transfer-learning results.")
    if any(r.kind == "head" for r in res.rows):
        notes.append("¹ A head's total time = the full feature extraction of its cache (shared by all heads on "
                     "that cache, charged to each in full) + its fit time; its inference time = backbone "
                     "extraction per image + head prediction.")
    return notes


# --------------------------------------------------------------------------- outputs


def _write_text(path: str, text: str) -> None:
    atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def _result_record(r: Result) -> dict:
    lo, hi = r.ci95
    return {
        "name": r.name, "kind": r.kind, "method": r.method, "seed": r.seed, "epochs": r.epochs,
        "accuracy": r.accuracy, "accuracy_ci95_low": lo, "accuracy_ci95_high": hi,
        "balanced_accuracy": r.balanced_accuracy, "n_val": r.n, "correct": int(r.metrics["correct"]),
        "total_seconds": r.total_seconds, "train_seconds": r.train_seconds,
        "extract_seconds": r.extract_seconds, "predict_ms_per_image": r.predict_ms,
        "trainable_parameters": r.trainable_parameters, "weights_id": r.weights_id,
        "weights_sha256": r.weights_sha256, "pretrained": r.pretrained, "weights": r.weights_label,
        "device": r.device, "data_root": r.data_root, "features_path": r.features_path, "source": r.source,
    }


def _row_record(row: Row) -> dict:
    ci = row.ci95
    return {
        "label": row.label, "kind": row.kind, "method": row.method, "seeds": row.seeds,
        "accuracy": row.accuracy, "accuracy_std": row.accuracy_std,
        "accuracy_ci95_low": ci[0] if ci else None, "accuracy_ci95_high": ci[1] if ci else None,
        "balanced_accuracy": row.balanced_accuracy, "balanced_accuracy_std": row.balanced_accuracy_std,
        "total_seconds": row.total_seconds, "train_seconds": row.train_seconds,
        "predict_ms_per_image": row.predict_ms, "trainable_parameters": row.trainable_parameters,
        "weights_id": row.weights_id, "pretrained": row.pretrained, "weights": row.weights_label,
        "device": row.device, "vs_best": row.mark, "mcnemar_p": row.p_value,
        "discordant_best_right": row.discordant[0] if row.discordant else None,
        "discordant_best_wrong": row.discordant[1] if row.discordant else None,
        "tested_seed": row.representative.seed if row.kind == "run" else None,
    }


_CSV_FIELDS = [
    "row_type", "label", "name", "kind", "method", "seed", "seeds", "epochs", "accuracy", "accuracy_std",
    "accuracy_ci95_low", "accuracy_ci95_high", "balanced_accuracy", "balanced_accuracy_std", "n_val",
    "correct", "total_seconds", "train_seconds", "extract_seconds", "predict_ms_per_image",
    "trainable_parameters", "weights", "weights_id", "weights_sha256", "pretrained", "device", "vs_best",
    "mcnemar_p", "discordant_best_right", "discordant_best_wrong", "tested_seed", "comparable", "issue",
    "data_root", "features_path", "source",
]


def _csv_text(res: CompareResult) -> str:
    """One ``method`` row per table row, then one ``result`` row per file (seed) of it; ``excluded`` rows last."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for row in res.rows:
        writer.writerow(dict(_row_record(row), row_type="method", comparable=True))
        for r in row.results:
            rec = _result_record(r)
            if row.kind == "run" and row.seeds > 1 and res.best is not None and row is not res.best:
                b, c = _discordant(res.best.representative, r)
                rec.update(mcnemar_p=mcnemar_exact(b, c), discordant_best_right=b, discordant_best_wrong=c)
            writer.writerow(dict(rec, row_type="result", label=row.label, comparable=True))
    for r in res.excluded:
        writer.writerow(dict(_result_record(r), row_type="excluded", label=r.method, comparable=False,
                             issue=r.issue))
    return buf.getvalue()


def _json_doc(res: CompareResult) -> dict:
    return {
        "kind": "compare",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "alpha": res.alpha,
        "test": "exact two-sided McNemar (binomial on discordant pairs), best vs each, no multiplicity correction",
        "compute_time_rule": ("head: full extraction of its feature cache (shared, charged to each head in full) "
                              "+ fit_seconds; run: total_seconds"),
        "reference": res.reference,
        "best": res.best.label if res.best else None,
        "rows": [dict(_row_record(row), per_seed=[_result_record(r) for r in row.results]) for row in res.rows],
        "excluded": [dict(_result_record(r), issue=r.issue) for r in res.excluded],
        "skipped_files": res.skipped,
        "figures": {k: os.path.relpath(v, os.path.dirname(res.outputs["json"])) for k, v in res.figures.items()},
    }


_FIGURE_CAPTIONS = {
    "accuracy_vs_time": "Val accuracy (95% CI; mean ± std for several seeds) against total compute time.",
    "learning_curves": "Learning curves of the end-to-end runs (solid: val, dashed: train).",
    "confusion": "Confusion matrices on the val set (rows: true class, columns: predicted).",
    "predictions": "Val images with the best method's predictions, misclassified first.",
    "pca": "The cached features in 2-D (PCA fitted on train), coloured by class.",
}


def _markdown(res: CompareResult, report_dir: str) -> str:
    ref = res.reference
    out = ["# Which transfer strategy wins on this data", "",
           f"Data root `{ref['data_root']}`: {ref['n_val']} val images, classes {', '.join(ref['classes'])}. "
           f"Generated {time.strftime('%Y-%m-%d %H:%M')}.", ""]
    out += [res.table, ""]
    out += [f"- {n}" for n in _notes(res)]
    out += ["- 95% CI: Wilson interval of the val accuracy. `vs best`: exact McNemar test of the best method "
            f"against each row on the same val images (alpha {res.alpha:g}, no multiplicity correction); "
            "`b/c` = images only the best gets right / only this row gets right. `≈ best` means the data "
            "cannot tell the two apart.",
            "- Several seeds: mean ± sample std over seeds; the test uses the median-accuracy seed. "
            "Per-seed rows are in `compare.csv` and `compare.json`.", ""]
    if any(row.seeds > 1 for row in res.rows):
        out += ["## Per-seed results", "", _seed_table(res), ""]
    if res.excluded:
        out += ["## ⚠ Not compared: measured on other data", "",
                "These results are not in the table above because they were measured on a different data "
                "root, class list or val set than the reference; mixing them would compare different exams.", ""]
        out += [format_table(("file", "method", "val acc", "weights", "why excluded"),
                             [[r.source, r.method, f"{r.accuracy:.3f}", r.weights_label, r.issue]
                              for r in res.excluded], markdown=True), ""]
    if res.skipped:
        out += ["## Files ignored", ""] + [f"- `{s['path']}`: {s['reason']}" for s in res.skipped] + [""]
    if res.figures:
        out += ["## Figures", ""]
        for name, path in res.figures.items():
            rel = os.path.relpath(path, report_dir).replace(os.sep, "/")
            out += [f"![{_FIGURE_CAPTIONS.get(name, name)}]({rel})", "",
                    f"*{_FIGURE_CAPTIONS.get(name, name)}*", ""]
    return "\n".join(out)


# --------------------------------------------------------------------------- figures


def _figures(res: CompareResult, report_dir: str, data: str) -> Dict[str, str]:
    """Every figure that has something to show; a failing figure is a warning, not a failed report."""
    from . import plots

    fig_dir = os.path.join(report_dir, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    rows, best = res.rows, res.best
    mixed = len({r.weights_label for r in rows}) > 1
    title_note = "" if mixed else f" — weights {rows[0].weights_label}"

    def point_label(row: Row) -> str:
        return row.label + (f" ({NOT_PRETRAINED})" if mixed and not row.pretrained and
                            NOT_PRETRAINED not in row.label else "")

    classes = res.reference["classes"]
    jobs = {
        "accuracy_vs_time": lambda p: plots.accuracy_vs_time([
            plots.Point(label=point_label(r), seconds=r.total_seconds, accuracy=r.accuracy,
                        low=r.ci95[0] if r.ci95 else r.accuracy - (r.accuracy_std or 0.0),
                        high=r.ci95[1] if r.ci95 else r.accuracy + (r.accuracy_std or 0.0),
                        kind=r.kind, best=r is best, tied=r.mark == "not significantly different",
                        seed_accuracies=[x.accuracy for x in r.results] if r.seeds > 1 else [])
            for r in rows], p, title_note=title_note),
        "learning_curves": lambda p: plots.learning_curves([
            plots.Curve(label=point_label(row) + (f" seed {r.seed}" if row.seeds > 1 else ""),
                        group=point_label(row), history=r.history)
            for row in rows if row.kind == "run" for r in row.results if r.history], p, title_note=title_note),
        "confusion": lambda p: plots.confusion_matrices([
            (f"{point_label(r)}\nacc {r.representative.accuracy:.3f}"
             + (f" (seed {r.representative.seed})" if r.seeds > 1 else ""),
             r.representative.metrics["confusion_matrix"]) for r in rows], classes, p, title_note=title_note),
        "predictions": lambda p: plots.prediction_grid(
            best.representative.metrics["predictions"], classes,
            _image_roots(best.representative.data_root, data), p,
            title=f"{point_label(best)}{f' (seed {best.representative.seed})' if best.seeds > 1 else ''} — "
                  f"val acc {best.representative.accuracy:.3f}{title_note}"),
        "pca": lambda p: plots.feature_pca(_feature_caches(rows, res), classes, p),
    }
    figures = {}
    for name, job in jobs.items():
        path = os.path.join(fig_dir, f"{name}.png")
        try:
            if job(path):
                figures[name] = path
        except DamagedCacheError:
            raise  # a damaged feature cache stops the report, naming the file and --rebuild
        except UserError as exc:
            warnings.warn(f"figure {name} left out: {exc}")
        except Exception as exc:  # a figure must never cost the user the table
            log.debug("figure %s failed", name, exc_info=True)
            warnings.warn(f"figure {name} left out: {type(exc).__name__}: {exc}")
    return figures


def _image_roots(data_root: str, data: str) -> List[str]:
    roots = [data_root]
    if data and _norm_root(data) != _norm_root(data_root):
        roots.append(data)
    return roots


def _feature_caches(rows: List[Row], res: CompareResult) -> List[Tuple[str, str]]:
    """(title, path) of each distinct feature cache the heads in the table were fitted on."""
    seen: Dict[str, str] = {}
    for row in rows:
        r = row.representative
        if r.kind == "head" and r.features_path and r.features_path not in seen:
            seen[r.features_path] = f"features: {r.weights_label}"
    return [(title, path) for path, title in seen.items()]


# --------------------------------------------------------------------------- run


def run(cfg: CompareConfig) -> CompareResult:
    """Compare every head and run under ``cfg.cache``; write the report under ``cfg.reports``."""
    results, skipped = load_results(cfg.cache)
    if not results:
        raise UserError(
            f"no head or run results under {heads_dir(cfg.cache)!r} or "
            f"{runs_dir(cfg.cache)!r}; run `make heads` and `make finetune` first "
            "(or point --cache at the folder that holds them)")
    ref = _choose_reference(results, cfg.data)
    comparable, excluded = [], []
    for r in results:
        r.issue = _issue(r, ref)
        (excluded if r.issue else comparable).append(r)
    for r in excluded:
        warnings.warn(f"not comparing {r.source}: {r.issue}")
    rows = _make_rows(comparable)
    best = _rank_and_test(rows, cfg.alpha)
    reference = {"data_root": ref.data_root, "classes": list(ref.classes), "n_val": ref.n}
    res = CompareResult(rows=rows, excluded=excluded, skipped=skipped, best=best, reference=reference,
                        alpha=cfg.alpha)
    res.table = format_table(_HEADER, [_table_cells(r) for r in rows], markdown=True)

    try:
        os.makedirs(cfg.reports, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the reports folder {cfg.reports!r} ({exc.strerror}); "
                        "pass --reports DIR pointing at a writable folder") from None
    res.outputs = report_files(cfg.reports)
    res.figures = _figures(res, cfg.reports, cfg.data)
    _write_text(res.outputs["csv"], _csv_text(res))
    _write_text(res.outputs["json"], json.dumps(_json_doc(res), indent=2) + "\n")
    _write_text(res.outputs["md"], _markdown(res, cfg.reports))
    return res
