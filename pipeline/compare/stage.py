"""Stage 4: which transfer strategy wins on this data, and what it costs.

``run(cfg)`` reads every head and end-to-end result under ``cfg.cache``
(:mod:`pipeline.compare.results`: loading, comparability, rows), decides which wins with a test
that is valid after selection (:mod:`pipeline.metrics`: all-pairs exact McNemar with the
Holm correction; the top group; its cheapest member is the answer), measures the data-size
axis (:mod:`pipeline.compare.curve`), and writes the report as one set
(:mod:`pipeline.compare.report`): ``<reports>/compare/compare.md`` (table + figures),
``compare.csv`` and ``compare.json``.

Nothing here is chosen on val: heads chose their hyper-parameters by CV on train, runs report
their final (or held-out-selected) epoch, and the tests compare every pair instead of testing
a maximum picked on val. The tutorial's best-val-epoch numbers appear only in their own,
labelled column.
"""
from __future__ import annotations

import os
from collections import Counter
from typing import Dict, List, Optional, Sequence

import numpy as np
from filelock import FileLock

from .. import metrics
from ..config import CompareConfig
from ..errors import UserError
from ..features import store
from ..heads.stage import REGISTRY
from ..paths import heads_dir, report_dir, runs_dir
from . import curve as curve_mod, plots, report
from .report import CompareResult, CurveReport, Decision
from .results import (NOT_PRETRAINED, Result, Row, choose_reference, correct_matrix, load_results, make_rows,
                      mean_std, split_comparable)

__all__ = ["NOT_PRETRAINED", "Result", "Row", "CurveReport", "CompareResult", "load_results", "run"]


# --------------------------------------------------------------------------- the data-size curve


def _curve_report(rows: List[Row], runs_k: List[Result], alpha: float,
                  seed: int) -> Optional[CurveReport]:
    """The curve on the feature cache most head rows were fitted on; None without heads."""
    heads = [r for r in rows if r.kind == "head" and r.representative.features_path]
    if not heads:
        return None
    path = Counter(r.representative.features_path for r in heads).most_common(1)[0][0]
    names = list(dict.fromkeys(r.representative.head for r in heads
                               if r.representative.features_path == path and r.representative.head in REGISTRY))
    if not names or not os.path.isfile(path):
        return None
    X_tr, y_tr, _, _ = store.read_split(path, "train")
    X_va, y_va, va_paths, _ = store.read_split(path, "val")
    if len(y_tr) == 0 or np.bincount(y_tr).min() < 1 or len(np.unique(y_tr)) < 2:
        return None
    result = curve_mod.heads_curve(X_tr, y_tr, X_va, y_va, names, seed=seed)
    mean, std = result.mean_std()
    n_sub = np.sum(~np.isnan(result.accuracy), axis=2)
    series = [plots.Series(name, result.ks, mean[i].tolist(), std[i].tolist()) for i, name in enumerate(names)]
    for s, i in zip(series, range(len(names))):
        s.n = n_sub[i].tolist()
    # End-to-end points: runs trained on K images per class, grouped by setting; mean ± std over seeds.
    groups: Dict[tuple, List[Result]] = {}
    for r in runs_k:
        groups.setdefault((r.method, r.weights_id), []).append(r)
    e2e = []
    for (method, _w), members in sorted(groups.items()):
        ks = sorted({r.train_per_class for r in members})
        stats = [mean_std([r.accuracy for r in members if r.train_per_class == k]) for k in ks]
        s = plots.Series(method, ks, [m for m, _ in stats], [sd or 0.0 for _, sd in stats], kind="run")
        s.n = [sum(r.train_per_class == k for r in members) for k in ks]
        e2e.append((s, members))
    series += [s for s, _ in e2e]
    cheapest = _cheapest_by_k(result, names, heads, path, e2e, va_paths, alpha)
    sentence = _change_sentence(cheapest)
    note = (f"{result.n_subsets} seeded subsets of train per k; hyper-parameters by CV inside each subset "
            "(k=1: defaults); val only scores")
    return CurveReport(result, path, series, cheapest, sentence, note)


def _cheapest_by_k(result, names, heads: List[Row], path: str, e2e, va_paths, alpha: float) -> List[dict]:
    """At each k: the top group (all-pairs McNemar + Holm on subset 0 / the lowest seed) and its
    cheapest member. Costs: a head's total time in the table (its extraction dominates; the fit
    on k images per class differs by milliseconds, below the noise), a run's own total time."""
    total = {r.representative.head: r.total_seconds for r in heads if r.representative.features_path == path}
    out = []
    for j, k in enumerate(result.ks):
        labels = list(names)
        correct = [result.correct[i, j] for i in range(len(names))]
        costs = [total.get(n, 0.0) for n in names]
        for s, members in e2e:
            at_k = sorted((r for r in members if r.train_per_class == k), key=lambda r: r.seed or 0)
            if at_k:
                labels.append(f"{s.label} (end-to-end)")
                correct.append(correct_matrix([at_k[0]], va_paths)[0])
                costs.append(float(np.mean([r.total_seconds for r in at_k])))
        pw = metrics.pairwise_mcnemar(np.array(correct), labels, alpha)
        best = metrics.cheapest(pw.top_group, costs, labels)
        out.append({"k": k, "top_group": [labels[i] for i in pw.top_group], "cheapest": labels[best],
                    "cost_seconds": costs[best]})
    return out


def _change_sentence(cheapest: List[dict]) -> str:
    if not cheapest:
        return ""
    spans, start = [], 0
    for j in range(1, len(cheapest) + 1):
        if j == len(cheapest) or cheapest[j]["cheapest"] != cheapest[start]["cheapest"]:
            ks = [c["k"] for c in cheapest[start:j]]
            spans.append((cheapest[start]["cheapest"], ks[0], ks[-1]))
            start = j
    if len(spans) == 1:
        return (f"Data-size curve: the cheapest method of the top group is {spans[0][0]} at every size tried "
                f"(k = {spans[0][1]}–{spans[0][2]} labelled images per class); on this data it never changes.")
    parts = [f"{name} for k = {a}" + (f"–{b}" if b != a else "") for name, a, b in spans]
    return ("Data-size curve: the cheapest method of the top group changes with the labelled images per class: "
            + "; ".join(parts) + ".")


def _decide(rows: List[Row], paths: Sequence[str], alpha: float, margin: float) -> Optional[Decision]:
    """Which wins (all pairs, every seed, Holm), each row's gap to the most accurate with its CI,
    and the answer: the cheapest row non-inferior to the most accurate within ``margin``.
    Orders ``rows`` (top group first, cheapest first, then by accuracy)."""
    if not rows:
        return None
    corrects = {id(r): correct_matrix(r.results, paths) for r in rows}
    costs = [r.total_seconds for r in rows]
    labels = [r.label for r in rows]
    pw = metrics.pairwise_seeds([corrects[id(r)] for r in rows], labels, alpha)
    for i, row in enumerate(rows):
        row.top = i in pw.top_group
        row.beaten_by = [rows[j].label for j in pw.beaten_by[i]]
    best = min(range(len(rows)), key=lambda i: (-rows[i].accuracy, costs[i], labels[i]))
    for i, row in enumerate(rows):
        row.best = i == best
        row.gap = (metrics.difference(corrects[id(row)], corrects[id(rows[best])]) if i != best
                   else metrics.Difference(0.0, 0.0, 0.0, (0.0, 0.0, 0.0, 0.0), 0.0, 1.0))
        row.noninferior = row.best or row.gap.low > -margin
    rec = metrics.cheapest([i for i, r in enumerate(rows) if r.noninferior], costs, labels)
    not_worse = metrics.cheapest([i for i, r in enumerate(rows) if r.best or r.gap.high >= 0], costs, labels)
    rows[rec].recommended = True
    decision = Decision(margin=margin, best=rows[best], recommended=rows[rec], not_shown_worse=rows[not_worse],
                        n_val=len(paths))
    cheaper = metrics.cheapest([i for i in range(len(rows)) if costs[i] < costs[best]], costs, labels)
    candidate = (rows[not_worse] if not_worse != best and costs[not_worse] < costs[rec]
                 else rows[rec] if rec != best else rows[cheaper] if cheaper is not None else None)
    if candidate is not None:
        decision.candidate = candidate
        decision.sample_size = metrics.noninferior_sample_size(candidate.gap.discordance, margin)
        decision.sample_size_at_gap = metrics.noninferior_sample_size(candidate.gap.discordance, margin,
                                                                      gap=candidate.gap.diff)
    shown = {r.device for r in (rows[best], rows[rec], rows[not_worse], candidate) if r is not None}
    decision.devices = sorted(d for d in shown if d)
    order = sorted(range(len(rows)), key=lambda i: (not rows[i].top, rows[i].total_seconds if rows[i].top else 0,
                                                    -rows[i].accuracy, rows[i].label))
    rows[:] = [rows[i] for i in order]
    # Keep the test object's names and indices in the new row order.
    decision.pairwise = metrics.pairwise_seeds([corrects[id(r)] for r in rows], [r.label for r in rows], alpha)
    decision.differences = [metrics.difference(corrects[id(rows[t.i])], corrects[id(rows[t.j])])
                            for t in decision.pairwise.tests]
    return decision


def _pca_panels(rows: List[Row]) -> List[plots.PcaPanel]:
    panels, seen = [], set()
    for row in rows:
        r = row.representative
        if r.kind == "head" and r.features_path and r.features_path not in seen and os.path.isfile(r.features_path):
            seen.add(r.features_path)
            X_tr, y_tr, _, _ = store.read_split(r.features_path, "train")
            X_va, y_va, _, _ = store.read_split(r.features_path, "val")
            title = f"features: {r.weights_label}\n{os.path.basename(r.features_path)}"
            panels.append(plots.PcaPanel(title, X_tr, y_tr, X_va, y_va))
    return panels


# --------------------------------------------------------------------------- run


def run(cfg: CompareConfig) -> CompareResult:
    """Compare every head and run under ``cfg.cache``; publish the report at ``<cfg.reports>/compare``."""
    results, skipped = load_results(cfg.cache)
    if not results:
        raise UserError(
            f"no head or run results under {heads_dir(cfg.cache)!r} or "
            f"{runs_dir(cfg.cache)!r}; run `make heads` and `make finetune` first "
            "(or point --cache at the folder that holds them)")
    ref = choose_reference(results, cfg.data)
    comparable, excluded = split_comparable(results, ref)
    # Runs on K images per class are points of the data-size curve, not rows of the table.
    runs_k = [r for r in comparable if r.kind == "run" and r.train_per_class]
    rows = make_rows([r for r in comparable if not (r.kind == "run" and r.train_per_class)])
    paths = sorted(ref.paths)
    decision = _decide(rows, paths, cfg.alpha, cfg.margin)
    res = CompareResult(rows=rows, excluded=excluded, skipped=skipped, alpha=cfg.alpha,
                        pairwise=decision.pairwise if decision else None,
                        recommended=decision.recommended if decision else None, decision=decision,
                        reference={"data_root": ref.data_root, "classes": list(ref.classes), "n_val": ref.n})
    if cfg.curve:
        res.curve = _curve_report(rows, runs_k, cfg.alpha, seed=0)
    if cfg.figures:
        res.pca = _pca_panels(rows)
    res.table = report.table(rows)
    target = report_dir(cfg.reports)
    try:
        os.makedirs(cfg.reports, exist_ok=True)
        with FileLock(os.path.join(cfg.reports, ".compare.lock")):
            report.write(res, target, cfg.data, figures=cfg.figures)
    except OSError as exc:
        why = os.strerror(exc.errno).lower() if exc.errno else str(exc)
        raise UserError(f"{why} while writing the report under {cfg.reports!r}; the previous report in "
                        f"{target!r} is unchanged; free some space or pass --reports DIR pointing at a writable "
                        "folder, then rerun") from None
    return res
