"""Compare, part 3: the report — table, notes, ``compare.md``/``.csv``/``.json`` and figures.

Everything here formats a :class:`CompareResult` that is already decided
(rows, pairwise tests, top group, curve); nothing is chosen here. :func:`write` writes the
whole set into a fresh folder and publishes it with one rename
(:func:`pipeline.files.publish_folder`): readers of ``<reports>/compare/`` see the previous
complete report or the new complete one, never a mix.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from .. import metrics
from . import curve as curve_mod, plots
from .results import NOT_PRETRAINED, Result, Row, same_root
from ..errors import DamagedCacheError, UserError
from ..files import atomic_write, publish_folder
from ..paths import report_files
from ..text import format_duration, format_table

__all__ = ["CompareResult", "CurveReport", "BEST_VAL_HEADER", "markdown_table", "table", "notes", "seed_table",
           "csv_text", "json_doc", "markdown", "write"]

log = logging.getLogger(__name__)

BEST_VAL_HEADER = "best epoch on val: chosen on val, optimistic"


# --------------------------------------------------------------------------- what compare decided


@dataclass
class CurveReport:
    """The data-size curve of the heads (and any ``--train-per-class`` runs) and what it says.

    ``series``: one :class:`pipeline.compare.plots.Series` per head / end-to-end setting, with ``n``
    (subsets or seeds per point); ``cheapest``: per ``k``, the cheapest member of that ``k``'s
    top group; ``sentence``: where that changes. ``curve`` is on the feature cache most head rows
    share (``features_path``); ``others`` the heads' curves on every other cache (backbone).
    """

    curve: curve_mod.CurveResult
    features_path: str
    series: List[plots.Series]
    cheapest: List[dict]
    sentence: str
    figure_note: str
    others: Dict[str, curve_mod.CurveResult] = field(default_factory=dict)  # other caches (backbones): path -> curve

    def to_json(self) -> dict:
        doc = curve_mod.to_json(self.curve)
        doc.update(features_path=self.features_path, answer_by_k=self.cheapest, sentence=self.sentence,
                   other_feature_caches={p: curve_mod.to_json(c) for p, c in self.others.items()},
                   end_to_end={s.label: [{"k": k, "mean": m, "std": sd, "seeds": n}
                                         for k, m, sd, n in zip(s.k, s.mean, s.std, s.n)]
                               for s in self.series if s.kind == "run"})
        return doc

    def markdown(self) -> str:
        c = self.curve
        mean, std = c.mean_std()
        header = ["method"] + [f"k={k}" for k in c.ks]
        lines = []
        for s in self.series:
            if s.kind == "head":
                lines.append([s.label] + [f"{m:.3f} ± {sd:.3f}" for m, sd in zip(s.mean, s.std)])
            else:
                cells = {k: f"{m:.3f} ± {sd:.3f} ({n} seed{'s' if n != 1 else ''})"
                         for k, m, sd, n in zip(s.k, s.mean, s.std, s.n)}
                lines.append([f"{s.label} (end-to-end)"] + [cells.get(k, "") for k in c.ks])
        text = [markdown_table(header, lines), "",
                f"Val accuracy, mean ± sample std over {c.n_subsets} seeded stratified subsets of train with k "
                f"labelled images per class (k={c.ks[-1]}: the smallest class whole; where k covers every "
                f"class whole there is one subset). Hyper-parameters: {c.rule[-1].split(':')[0]} inside each "
                f"subset only; {curve_mod.FALLBACK}. Never val. Feature cache `{self.features_path}`"
                + "".join(f", `{p}`" for p in self.others)
                + f"; {c.seconds + sum(o.seconds for o in self.others.values()):.1f} s of process time.", ""]
        if self.sentence:
            text.append(self.sentence)
        return "\n".join(text)



@dataclass
class Decision:
    """The answer and the numbers it rests on (made by ``compare.stage``; formatted here).

    Attributes
    ----------
    margin : float
        Non-inferiority margin in accuracy (``--margin``).
    best : Row
        The most accurate row (mean over seeds; ties: the cheapest). Picked on val: the gaps to
        it are measured against a maximum, which favours it.
    recommended : Row
        The cheapest row whose gap to ``best`` has a 95% CI lower bound above ``-margin``
        (``best`` itself when no cheaper row is certified).
    not_shown_worse : Row
        The cheapest row whose gap CI reaches 0 (not shown worse than ``best``).
    candidate : Row or None
        The row the val-size sentence is about: the cheaper row in question, or with nothing
        cheaper than ``best`` the next cheapest row (None: a single row).
    cheaper : Row or None
        The cheapest row cheaper than ``best`` (None: ``best`` is the cheapest).
    sample_size, sample_size_at_gap : int or None
        Val images that would certify ``candidate`` within ``margin`` at its observed disagreement
        rate with ``best`` (80% power, one-sided 2.5%), if the true gap were 0 / the observed
        gap (None: the observed gap is beyond the margin, no size would).
    devices : list of str
        The devices the times of best, recommended and not-shown-worse were measured on.
    pairwise : metrics.Pairwise
        Every pair, in the row order of the table; ``differences`` aligned with its tests.
    """

    margin: float
    best: Row
    recommended: Row
    not_shown_worse: Row
    n_val: int
    candidate: Optional[Row] = None
    cheaper: Optional[Row] = None
    sample_size: Optional[int] = None
    sample_size_at_gap: Optional[int] = None
    devices: List[str] = field(default_factory=list)
    pairwise: Optional[metrics.Pairwise] = None
    differences: List[metrics.Difference] = field(default_factory=list)


@dataclass
class CompareResult:
    """What ``run`` decided and wrote.

    ``rows`` are ordered top group first (cheapest first), then by val accuracy; ``pairwise``
    holds every pair's test (names: the row labels); ``recommended`` is the cheapest row
    non-inferior to the most accurate within the margin, and ``decision`` the numbers behind it.
    ``outputs``/``figures`` name the files of the published set.
    """

    rows: List[Row]
    excluded: List[Result]
    skipped: List[dict]
    reference: dict
    alpha: float
    pairwise: Optional[metrics.Pairwise] = None
    recommended: Optional[Row] = None
    decision: Optional[Decision] = None
    curve: Optional[CurveReport] = None
    pca: List[plots.PcaPanel] = field(default_factory=list)
    outputs: Dict[str, str] = field(default_factory=dict)
    figures: Dict[str, str] = field(default_factory=dict)
    left_out: Dict[str, str] = field(default_factory=dict)
    table: str = ""

    def summary(self) -> str:
        lines = [self.table, ""]
        if any(row.seeds > 1 for row in self.rows):
            lines += ["Per seed:", seed_table(self), ""]
        lines.extend(n.replace("**", "") for n in notes(self))
        if self.excluded:
            lines.append("")
            lines.append(f"NOT COMPARED ({len(self.excluded)} result(s) measured on other data; see compare.md):")
            lines.extend(f"  {r.source}: {r.issue}" for r in self.excluded)
        lines.append("")
        lines.append("report: " + ", ".join(self.outputs.values()))
        return "\n".join(lines)




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


def _fmt_group(row: Row) -> str:
    group = "top group" if row.top else "below " + ", ".join(row.beaten_by)
    return f"**{group}, recommended**" if row.recommended else group


def _fmt_ci(low: float, high: float) -> str:
    return f"[{low:+.3f}, {high:+.3f}]"


def _fmt_gap(row: Row) -> str:
    """The row's paired difference to the most accurate row with its 95% CI, and the margin mark."""
    if row.gap is None:
        return "—"
    if row.best:
        return "most accurate"
    mark = " ✓ within margin" if row.noninferior else ""
    return f"{row.gap.diff:+.3f} {_fmt_ci(row.gap.low, row.gap.high)}{mark}"


def _fmt_best_val(row: Row) -> str:
    best = row.best_val
    if best is None:
        return "—"
    acc, epochs = best
    return f"{acc:.3f} (epoch {', '.join(str(e) for e in epochs)})"


GAP_HEADER = "Δ to most accurate [95% CI]"
_HEADER = ("method", "kind", "val acc", "95% CI", GAP_HEADER, "balanced acc", "total time", "training time",
           "val passes (not charged)", "inference/img", "trainable params", "backbone", "weights", "device",
           "which wins", BEST_VAL_HEADER)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """An aligned Markdown table (:func:`pipeline.text.format_table`)."""
    return format_table(header, rows, markdown=True)


def table(rows: Sequence[Row]) -> str:
    """The main table: one line per row, in the order given."""
    lines = []
    for row in rows:
        ci = row.ci95
        lines.append([
            row.label, "head" if row.kind == "head" else "end-to-end",
            _fmt_acc(row.accuracy, row.accuracy_std, row.seeds),
            f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "per seed ↓", _fmt_gap(row),
            _fmt_acc(row.balanced_accuracy, row.balanced_accuracy_std, row.seeds).split(" (")[0],
            format_duration(row.total_seconds) + (" ¹" if row.kind == "head" else ""),
            format_duration(row.train_seconds),
            format_duration(row.eval_seconds) if row.kind == "run" and row.eval_seconds else "—",
            f"{row.predict_ms:.1f} ms", _fmt_params(row.trainable_parameters),
            row.backbone, row.weights_label, row.device or "?", _fmt_group(row), _fmt_best_val(row),
        ])
    return markdown_table(_HEADER, lines)


def seed_table(res: CompareResult) -> str:
    """One line per seed of every row that aggregates several seeds."""
    lines = []
    for row in res.rows:
        if row.seeds < 2:
            continue
        for r in row.results:
            lo, hi = r.ci95
            lines.append([row.label, str(r.seed), f"{r.accuracy:.3f}", f"[{lo:.3f}, {hi:.3f}]",
                          f"{r.balanced_accuracy:.3f}", format_duration(r.total_seconds), r.weights_label,
                          "figures" if r is row.representative else "",
                          "—" if r.best_val_acc is None else f"{r.best_val_acc:.3f} (epoch {r.best_val_epoch})"])
    return markdown_table(("method", "seed", "val acc", "95% CI", "balanced acc", "total time", "weights",
                           "confusion / prediction figures", BEST_VAL_HEADER), lines)


def _pts(x: float) -> str:
    return f"{100 * x:g} points"


def answer(d: Decision) -> List[str]:
    """The answer line (always with the recommended row's gap to the most accurate and its CI) and
    the val-size sentence."""
    rec, best, nsw = d.recommended, d.best, d.not_shown_worse
    m = _pts(d.margin)

    def gap(row: Row) -> str:
        return f"{row.gap.diff:+.3f} {_fmt_ci(row.gap.low, row.gap.high).replace('[', '[95% CI ')}"

    head = f"Answer: **{rec.label}** (weights {rec.weights_label})"
    if not rec.best:
        line = (f"{head}, the cheapest method non-inferior to the most accurate, {best.label} "
                f"({best.accuracy:.3f}), within {m}: gap {gap(rec)}, whose lower end lies above -{d.margin:g}; "
                f"{format_duration(rec.total_seconds)} total compute against {format_duration(best.total_seconds)}.")
    elif not nsw.best:
        line = (f"{head}, the most accurate method ({rec.accuracy:.3f}, gap +0.000), is recommended because "
                f"no cheaper method is certified within {m} on these {d.n_val} val images: the cheapest not "
                f"shown worse, {nsw.label}, is {gap(nsw)} behind it, so it may be up to {-nsw.gap.low:.3f} worse.")
    elif d.cheaper is not None:
        line = (f"{head}, the most accurate method ({rec.accuracy:.3f}, gap +0.000), is recommended because every "
                f"cheaper method is shown worse and none is certified within {m}: the cheapest, "
                f"{d.cheaper.label}, is {gap(d.cheaper)} behind it.")
    else:
        line = (f"{head}, the most accurate method ({rec.accuracy:.3f}, gap +0.000) and also the cheapest, is "
                "recommended.")
    if len(d.devices) > 1:
        line += (f" Its times were measured on different devices ({', '.join(d.devices)}): the cost ranking is "
                 "not like for like.")
    out = [line]
    c = d.candidate
    if c is not None:
        at_gap = ("" if abs(c.gap.diff) < 1e-12 else
                  f"{d.sample_size_at_gap} if the true gap is the observed {c.gap.diff:+.3f}; "
                  if d.sample_size_at_gap is not None else
                  f"none would if the true gap is the observed {c.gap.diff:+.3f}, beyond the margin; ")
        out.append(f"Val size: certifying {c.label} within {m} of {best.label} at their observed disagreement "
                   f"rate ({c.gap.discordance:.1%} of val images) needs about {d.sample_size} val images if the "
                   f"two are truly equally accurate ({at_gap}80% power, one-sided 2.5%); this val set has "
                   f"{d.n_val}" + (", and it certified it." if c.noninferior else "."))
    return out


def notes(res: CompareResult) -> List[str]:
    ref = res.reference
    out = []
    top = [r for r in res.rows if r.top]
    if res.decision is not None:
        out.extend(answer(res.decision))
        out.append(f"Top group (no other method is significantly better; all-pairs exact paired tests over every "
                   f"seed, Holm-corrected, alpha {res.alpha:g}): " + ", ".join(r.label for r in top) + ".")
    if res.curve is not None and res.curve.sentence:
        out.append(res.curve.sentence)
    out.append(f"Val set: {ref['n_val']} images of {len(ref['classes'])} classes "
               f"({', '.join(ref['classes'])}) under {ref['data_root']}.")
    if any(not r.pretrained for r in res.rows):
        ids = sorted({r.weights_id for r in res.rows if not r.pretrained})
        out.append(f"Results with weights {', '.join(ids)} are {NOT_PRETRAINED} (random init): "
                   "not transfer-learning results.")
    if any(r.kind == "head" for r in res.rows):
        out.append("¹ A head's total time = the feature extraction of its cache (shared by all heads on "
                   "that cache, charged to each in full; augmented views only to heads trained on them) + its "
                   "fit time; its inference time = backbone extraction per image + head prediction.")
    if any(r.kind == "run" for r in res.rows):
        out.append("An end-to-end run's total time is its training; the val passes it made during training "
                   "(learning curves and the best-val column only; `finetune --eval-every 0` skips them) are "
                   "shown apart and not charged.")
    return out


_PROTOCOL = [
    "What each number was selected on and scored on: heads choose their hyper-parameter by "
    "cross-validation on train; end-to-end runs report their final epoch (or, with `--select holdout:F`, "
    "the epoch best on a held-out part of train). Every `val acc` is then scored once on val, and no "
    "model was chosen on val. The recommendation itself, though, is a choice made on val: the most accurate "
    "row is a maximum over the rows on these val images, so its accuracy is optimistic and the gaps to it "
    "are measured against a row that was picked for being high; confirm the recommended method on new "
    "images before relying on its number.",
    "95% CI: Wilson interval of the val accuracy. `Δ to most accurate`: the row's accuracy minus the most "
    "accurate row's, paired on the same val images, with Newcombe's hybrid score 95% interval for paired "
    "proportions (method 10 of Newcombe 1998, Statistics in Medicine 17:873–890), computed on the 2x2 table "
    "averaged over every pair of seeds; `✓ within margin`: its lower end lies above -margin (non-inferior). "
    "The answer is the cheapest non-inferior row by total compute time. Val size: n = (z_0.975 + z_0.8)² "
    "(ψ − Δ²)/(Δ + margin)², ψ the share of val images the two disagree on (Connor 1987).",
    "`which wins`: every pair of rows is tested on the same val images with an exact paired sign-flip test of "
    "the per-image mean correctness over every seed of each row (for one seed against one seed this is the "
    "exact McNemar test), Holm–Bonferroni-corrected over all pairs; the top group is every row that no other "
    "row beats significantly; `below X` names the rows that do. Every pair (b, c, raw and adjusted p, the "
    "difference with its CI) is in `compare.json` and `compare.csv`.",
    f"`{BEST_VAL_HEADER}`: the tutorial's number, the highest val accuracy over the epochs of a run. It was "
    "chosen by looking at val, so it overstates what the run would score on new images; it is shown for "
    "reference only and is never ranked, tested or plotted.",
    "Several seeds: mean ± sample std over seeds; the paired tests and intervals use every seed (per-image "
    "mean correctness); the confusion matrix and prediction grid show the lowest seed. Per-seed rows are in "
    "`compare.csv` and `compare.json`.",
]


# --------------------------------------------------------------------------- csv / json


def _result_record(r) -> dict:
    lo, hi = r.ci95
    return {
        "name": r.name, "kind": r.kind, "method": r.method, "backbone": r.backbone, "seed": r.seed, "epochs": r.epochs,
        "accuracy": r.accuracy, "accuracy_ci95_low": lo, "accuracy_ci95_high": hi,
        "balanced_accuracy": r.balanced_accuracy, "n_val": r.n, "correct": int(r.metrics["correct"]),
        "total_seconds": r.total_seconds, "train_seconds": r.train_seconds,
        "extract_seconds": r.extract_seconds, "predict_ms_per_image": r.predict_ms,
        "trainable_parameters": r.trainable_parameters, "weights_id": r.weights_id,
        "weights_sha256": r.weights_sha256, "pretrained": r.pretrained, "weights": r.weights_label,
        "device": r.device, "data_root": r.data_root, "features_path": r.features_path, "source": r.source,
        "selection": r.selection or ("cv on train" if r.kind == "head" else ""),
        "train_per_class": r.train_per_class,
        "best_val_epoch_chosen_on_val": r.best_val_epoch, "best_val_acc_chosen_on_val": r.best_val_acc,
    }


def _row_record(row: Row) -> dict:
    ci = row.ci95
    best = row.best_val
    return {
        "label": row.label, "kind": row.kind, "method": row.method, "backbone": row.backbone, "seeds": row.seeds,
        "accuracy": row.accuracy, "accuracy_std": row.accuracy_std,
        "accuracy_ci95_low": ci[0] if ci else None, "accuracy_ci95_high": ci[1] if ci else None,
        "balanced_accuracy": row.balanced_accuracy, "balanced_accuracy_std": row.balanced_accuracy_std,
        "total_seconds": row.total_seconds, "train_seconds": row.train_seconds,
        "predict_ms_per_image": row.predict_ms, "trainable_parameters": row.trainable_parameters,
        "weights_id": row.weights_id, "pretrained": row.pretrained, "weights": row.weights_label,
        "device": row.device, "top_group": row.top, "recommended": row.recommended,
        "beaten_by": ";".join(row.beaten_by),
        "tested_seeds": ";".join(str(r.seed) for r in row.results) if row.kind == "run" else None,
        "most_accurate": row.best, "gap_to_best": row.gap.diff if row.gap else None,
        "gap_ci95_low": row.gap.low if row.gap else None, "gap_ci95_high": row.gap.high if row.gap else None,
        "noninferior": row.noninferior, "eval_seconds": row.eval_seconds,
        "best_val_acc_chosen_on_val": best[0] if best else None,
    }


def _pair_records(res: CompareResult) -> List[dict]:
    if res.pairwise is None:
        return []
    names = res.pairwise.names
    diffs = res.decision.differences if res.decision is not None else [None] * len(res.pairwise.tests)
    return [{"a": names[t.i], "b_label": names[t.j], "b": t.b, "c": t.c, "p_raw": t.p, "p_adjusted": t.p_adjusted,
             "winner": names[t.winner] if t.winner is not None else None,
             "difference": d.diff if d else None, "difference_ci95_low": d.low if d else None,
             "difference_ci95_high": d.high if d else None, "discordance": d.discordance if d else None}
            for t, d in zip(res.pairwise.tests, diffs)]


_CSV_FIELDS = [
    "row_type", "label", "name", "kind", "method", "backbone", "seed", "seeds", "epochs", "accuracy", "accuracy_std",
    "accuracy_ci95_low", "accuracy_ci95_high", "balanced_accuracy", "balanced_accuracy_std", "n_val",
    "correct", "total_seconds", "train_seconds", "extract_seconds", "predict_ms_per_image",
    "trainable_parameters", "weights", "weights_id", "weights_sha256", "pretrained", "device", "selection",
    "train_per_class", "top_group", "recommended", "beaten_by", "tested_seeds", "most_accurate", "gap_to_best",
    "gap_ci95_low", "gap_ci95_high", "noninferior", "eval_seconds", "other", "b", "c", "p_raw",
    "p_adjusted", "winner", "difference", "difference_ci95_low", "difference_ci95_high", "discordance", "k", "n_subsets", "best_val_acc_chosen_on_val", "best_val_epoch_chosen_on_val",
    "comparable", "issue", "data_root", "features_path", "source",
]


def csv_text(res: CompareResult) -> str:
    """Row types: ``method`` (one per table row) then ``result`` (its seeds); ``pair`` (every pair:
    a = ``label``, b = ``other``; ``b``/``c`` images only a / only b gets right); ``curve`` (one
    per head or end-to-end setting and ``k``); ``excluded`` last."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for row in res.rows:
        writer.writerow(dict(_row_record(row), row_type="method", comparable=True))
        for r in row.results:
            writer.writerow(dict(_result_record(r), row_type="result", label=row.label, comparable=True))
    for p in _pair_records(res):
        writer.writerow({"row_type": "pair", "label": p["a"], "other": p["b_label"], "b": p["b"], "c": p["c"],
                         "p_raw": p["p_raw"], "p_adjusted": p["p_adjusted"], "winner": p["winner"] or "",
                         "difference": p["difference"], "difference_ci95_low": p["difference_ci95_low"],
                         "difference_ci95_high": p["difference_ci95_high"], "discordance": p["discordance"]})
    if res.curve is not None:
        for series in res.curve.series:
            for k, m, s, n in zip(series.k, series.mean, series.std, series.n):
                writer.writerow({"row_type": "curve", "label": series.label, "kind": series.kind, "k": k,
                                 "accuracy": m, "accuracy_std": s, "n_subsets": n})
    for r in res.excluded:
        writer.writerow(dict(_result_record(r), row_type="excluded", label=r.method, comparable=False,
                             issue=r.issue))
    return buf.getvalue()


def json_doc(res: CompareResult) -> dict:
    rec = res.recommended
    return {
        "kind": "compare",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "alpha": res.alpha,
        "test": ("exact two-sided paired sign-flip test of the per-image mean correctness over every seed (exact "
                 "McNemar for one seed against one seed) for every pair of rows on the same val images, "
                 "Holm-Bonferroni over all pairs; top group: rows no other row beats at alpha"),
        "effect_size": ("accuracy difference (a minus b; a row minus the most accurate), paired on the same val "
                        "images, 95% CI: Newcombe 1998 hybrid score interval for paired proportions (method 10) on "
                        "the 2x2 table averaged over every pair of seeds"),
        "margin": res.decision.margin if res.decision else None,
        "decision_rule": ("the cheapest row (total compute time) whose gap to the most accurate row has a 95% CI "
                          "lower bound above -margin; the most accurate row is itself chosen on val"),
        "most_accurate": res.decision.best.label if res.decision else None,
        "not_shown_worse": res.decision.not_shown_worse.label if res.decision else None,
        "val_size": ({"candidate": res.decision.candidate.label, "images_if_equal": res.decision.sample_size,
                      "images_at_observed_gap": res.decision.sample_size_at_gap,
                      "discordance": res.decision.candidate.gap.discordance, "power": 0.8,
                      "one_sided_alpha": 0.025,
                      "formula": "n = (z_0.975 + z_0.8)^2 (psi - gap^2) / (gap + margin)^2"}
                     if res.decision and res.decision.candidate is not None else None),
        "answer": answer(res.decision) if res.decision else [],
        "selection_rule": ("heads: hyper-parameter by CV on train; runs: final epoch or --select holdout:F on "
                           "held-out train images; every accuracy scored once on val"),
        "compute_time_rule": ("head: extraction of its feature cache (shared, charged to each head in full; "
                              "augmented views only to heads trained on them) + fit_seconds; run: total_seconds "
                              "less the val passes made during training (eval_seconds, shown apart)"),
        "seeds_rule": "several seeds: mean ± sample std; the tests and intervals use every seed",
        "reference": res.reference,
        "top_group": [r.label for r in res.rows if r.top],
        "recommended": rec.label if rec else None,
        "pairs": _pair_records(res),
        "rows": [dict(_row_record(row), per_seed=[_result_record(r) for r in row.results]) for row in res.rows],
        "data_size_curve": res.curve.to_json() if res.curve is not None else None,
        "excluded": [dict(_result_record(r), issue=r.issue) for r in res.excluded],
        "skipped_files": res.skipped,
        "figures": {k: f"figures/{k}.png" for k in res.figures},
    }


# --------------------------------------------------------------------------- markdown


_FIGURE_CAPTIONS = {
    "accuracy_vs_time": "Val accuracy (95% CI; mean ± std for several seeds) against total compute time. "
                        "Star: recommended; filled: top group; hollow: beaten significantly.",
    "pairwise": "Every pair of methods (row vs column): Holm-adjusted exact McNemar p and the images only the "
                "row gets right minus those only the column gets right.",
    "data_size": "Val accuracy vs labelled images per class: every head on seeded subsets of train "
                 "(mean ± std), and any end-to-end runs trained with --train-per-class.",
    "learning_curves": "Learning curves of the end-to-end runs (solid: val, dashed: train; dot: the reported "
                       "epoch).",
    "confusion": "Confusion matrices on the val set (rows: true class, columns: predicted).",
    "predictions": "Val images with the recommended method's predictions, misclassified first.",
    "pca": "The cached features in 2-D (PCA fitted on train), coloured by class.",
}


def markdown(res: CompareResult) -> str:
    ref = res.reference
    out = ["# Which transfer strategy wins on this data", "",
           f"Data root `{ref['data_root']}`: {ref['n_val']} val images, classes {', '.join(ref['classes'])}. "
           f"Generated {time.strftime('%Y-%m-%d %H:%M')}.", ""]
    out += [res.table, ""]
    out += [f"- {n}" for n in notes(res)]
    out += [f"- {n}" for n in _PROTOCOL] + [""]
    if "pairwise" in res.figures:
        out += ["![" + _FIGURE_CAPTIONS["pairwise"] + "](figures/pairwise.png)", ""]
    if any(row.seeds > 1 for row in res.rows):
        out += ["## Per-seed results", "", seed_table(res), ""]
    if res.curve is not None:
        out += ["## Data-size curve", "", res.curve.markdown(), ""]
    if res.excluded:
        out += ["## ⚠ Not compared: measured on other data", "",
                "These results are not in the table above because they were measured on a different data "
                "root, class list or val set than the reference; mixing them would compare different exams.", ""]
        out += [markdown_table(("file", "method", "val acc", "weights", "why excluded"),
                               [[r.source, r.method, f"{r.accuracy:.3f}", r.weights_label, r.issue]
                                for r in res.excluded]), ""]
    if res.skipped:
        out += ["## Files ignored", ""] + [f"- `{s['path']}`: {s['reason']}" for s in res.skipped] + [""]
    if res.figures:
        out += ["## Figures", ""]
        for name in res.figures:
            if name == "pairwise":
                continue
            out += [f"![{_FIGURE_CAPTIONS.get(name, name)}](figures/{name}.png)", "",
                    f"*{_FIGURE_CAPTIONS.get(name, name)}*", ""]
    if res.left_out:
        out += ["Figures left out: " + "; ".join(f"{k} ({v})" for k, v in res.left_out.items()), ""]
    return "\n".join(out)


# --------------------------------------------------------------------------- figures


def figure_jobs(res: CompareResult, data: str) -> Dict[str, Callable[[str], Optional[str]]]:
    """name -> job(path) for every figure; each takes arrays made here and returns its path or None."""
    rows, rec = res.rows, res.recommended
    mixed = len({r.weights_label for r in rows}) > 1
    title_note = "" if mixed else f" — weights {rows[0].weights_label}"

    def point_label(row: Row) -> str:
        return row.label + (f" ({NOT_PRETRAINED})" if mixed and not row.pretrained and
                            NOT_PRETRAINED not in row.label else "")

    classes = res.reference["classes"]
    jobs: Dict[str, Callable[[str], Optional[str]]] = {
        "accuracy_vs_time": lambda p: plots.accuracy_vs_time([
            plots.Point(label=point_label(r), seconds=r.total_seconds, accuracy=r.accuracy,
                        low=r.ci95[0] if r.ci95 else r.accuracy - (r.accuracy_std or 0.0),
                        high=r.ci95[1] if r.ci95 else r.accuracy + (r.accuracy_std or 0.0),
                        kind=r.kind, recommended=r.recommended, top=r.top,
                        seed_accuracies=[x.accuracy for x in r.results] if r.seeds > 1 else [])
            for r in rows], p, title_note=title_note),
    }
    if res.pairwise is not None:
        pw = res.pairwise
        jobs["pairwise"] = lambda p: plots.pairwise_heatmap(
            [point_label(r) for r in rows], pw.adjusted_matrix(), pw.advantage_matrix(), pw.alpha, p,
            top=pw.top_group, title_note=title_note)
    if res.curve is not None:
        jobs["data_size"] = lambda p: plots.data_size_curve(res.curve.series, p, title_note=title_note,
                                                            note=res.curve.figure_note)
    jobs["learning_curves"] = lambda p: plots.learning_curves([
        plots.Curve(label=point_label(row) + (f" seed {r.seed}" if row.seeds > 1 else ""),
                    group=point_label(row), history=r.history,
                    selected_epoch=_selected_epoch(r))
        for row in rows if row.kind == "run" for r in row.results if r.history], p, title_note=title_note)
    jobs["confusion"] = lambda p: plots.confusion_matrices([
        (f"{point_label(r)}\nacc {r.representative.accuracy:.3f}"
         + (f" (seed {r.representative.seed})" if r.seeds > 1 else ""),
         r.representative.metrics["confusion_matrix"]) for r in rows], classes, p, title_note=title_note)
    if rec is not None:
        jobs["predictions"] = lambda p: _prediction_grid(res, rec, classes, data, p,
                                                         f"{point_label(rec)} (recommended)", title_note)
    if res.pca:
        jobs["pca"] = lambda p: plots.feature_pca(res.pca, classes, p)
    return jobs


def _selected_epoch(r) -> Optional[int]:
    epochs = (r.history or {}).get("epochs") or []
    if r.selection == "final" or not r.selection:
        return len(epochs) or None
    return None  # held-out selection: the chosen epoch is in the run's record, not needed here


def _thumbnail(path: str, size: int = 160) -> np.ndarray:
    from ..data.images import load_image

    image = load_image(path, draft_size=size)
    w, h = image.size
    s = min(w, h)
    image = image.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return np.asarray(image.resize((size, size)))


def _prediction_grid(res, row: Row, classes, data: str, path: str, title: str, title_note: str):
    r = row.representative
    preds = r.metrics["predictions"]
    if not preds.get("paths"):
        return None
    roots = [r.data_root] + ([data] if data and not same_root(data, r.data_root) else [])
    order = plots.grid_order(preds["y_true"], preds["y_pred"], preds.get("confidence"), 24, len(classes))
    tiles, missing = {}, 0
    for i in order:
        tiles[i] = None
        for root in roots:
            full = os.path.join(root, preds["paths"][i])
            if os.path.isfile(full):
                try:
                    tiles[i] = _thumbnail(full)
                    break
                except Exception:  # an unreadable image is a grey tile, not a failed report
                    continue
        missing += tiles[i] is None
    if missing:
        warnings.warn(f"{missing} val image(s) not found under {roots}; shown as grey tiles "
                      "(pass --data DIR if the data set moved)")
    seed = f" (seed {r.seed})" if row.seeds > 1 else ""
    return plots.prediction_grid(preds, classes, tiles, path,
                                 title=f"{title}{seed} — val acc {r.accuracy:.3f}{title_note}")


def _figures(res: CompareResult, folder: str, data: str) -> None:
    """Draw every figure into ``folder/figures``; a figure that fails for any reason but the disk
    is left out with a warning (and named in the report), never a failed report."""
    fig_dir = os.path.join(folder, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    for name, job in figure_jobs(res, data).items():
        path = os.path.join(fig_dir, f"{name}.png")
        try:
            if job(path):
                res.figures[name] = path
        except (DamagedCacheError, OSError):
            raise  # a damaged cache or a full disk stops the report; the previous one stays
        except UserError as exc:
            res.left_out[name] = str(exc)
            warnings.warn(f"figure {name} left out: {exc}")
        except Exception as exc:  # a figure must never cost the user the table
            log.debug("figure %s failed", name, exc_info=True)
            res.left_out[name] = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"figure {name} left out: {type(exc).__name__}: {exc}")


# --------------------------------------------------------------------------- writing the set


def _write_text(path: str, text: str) -> None:
    atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def write(res: CompareResult, target: str, data: str, figures: bool = True) -> None:
    """Write figures, ``compare.csv``, ``compare.json`` and ``compare.md`` as one set at ``target``
    (a folder published by one rename). Sets ``res.figures`` and ``res.outputs``."""
    def fill(folder: str) -> None:
        res.figures.clear()
        res.left_out.clear()
        if figures:
            _figures(res, folder, data)
        _write_text(os.path.join(folder, "compare.csv"), csv_text(res))
        _write_text(os.path.join(folder, "compare.json"), json.dumps(json_doc(res), indent=2) + "\n")
        _write_text(os.path.join(folder, "compare.md"), markdown(res))

    publish_folder(target, fill)
    res.outputs = report_files(os.path.dirname(target))
    res.figures = {k: os.path.join(target, "figures", f"{k}.png") for k in res.figures}
