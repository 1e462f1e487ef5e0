"""Stage 4: which transfer strategy wins on this data, and what it costs.

``run(cfg)`` reads every head and end-to-end result under ``cfg.cache``
(:mod:`pipeline.compare.results`: loading, comparability, rows), decides which wins with a test
that is valid after selection (:mod:`pipeline.metrics`: all-pairs exact paired tests over every
seed with the Holm correction; the top group), measures each row's paired gap to the most
accurate row with Newcombe's 95% interval and answers with the cheapest row non-inferior within
``cfg.margin``, measures the data-size axis (:mod:`pipeline.compare.curve`), and writes the
report as one set
(:mod:`pipeline.compare.report`): ``<reports>/compare/compare.md`` (table + figures),
``compare.csv`` and ``compare.json``.

No model is chosen on val: heads chose their hyper-parameters by CV on train, runs report
their final (or held-out-selected) epoch, and the tests compare every pair instead of testing
a maximum picked on val. The recommendation is the one choice made on val (the most accurate
row is a maximum over the rows), and the report says so. The tutorial's best-val-epoch numbers appear only in their own,
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
                      mean_std, setting_key, split_comparable)
from ..data.splits import CURVE_SEED
from ..records import setting_digest

__all__ = ["NOT_PRETRAINED", "Result", "Row", "CurveReport", "CompareResult", "load_results", "run"]


# --------------------------------------------------------------------------- the data-size curve


def _curve_report(rows: List[Row], runs_k: List[Result], alpha: float, margin: float,
                  seed: int = CURVE_SEED) -> Optional[CurveReport]:
    """The curve of the heads on every feature cache they were fitted on (one per backbone, say);
    None without heads. The cache most head rows share is the reference: its k and val images.

    One series per head row (two rows of one head on one cache stay two series) and per
    end-to-end setting of ``--train-per-class`` runs; every k those runs used is a point of the
    heads too, and the runs trained on the heads' subsets of the same number (their seed)."""
    heads = [r for r in rows if r.kind == "head" and r.representative.features_path
             and r.representative.head in REGISTRY and os.path.isfile(r.representative.features_path)]
    if not heads:
        return None
    caches = [p for p, _ in Counter(r.representative.features_path for r in heads).most_common()]
    path = caches[0]
    y_tr = store.read_split(path, "train")[1]
    _, _, va_paths, _ = store.read_split(path, "val")
    if len(y_tr) == 0 or np.bincount(y_tr).min() < 1 or len(np.unique(y_tr)) < 2:
        return None
    smallest = int(np.bincount(y_tr).min())
    ks = sorted(set(curve_mod.sizes(y_tr)) | {r.train_per_class for r in runs_k if r.train_per_class <= smallest})
    points, results = [], {}  # points: (series, correct at each k or None, cost at each k)
    for cache in caches:
        curve = _heads_on_cache([r for r in heads if r.representative.features_path == cache], cache, ks, seed,
                                va_paths)
        if curve is not None:
            results[cache] = curve[0]
            points += curve[1]
    if path not in results:
        return None
    result = results.pop(path)
    # End-to-end points: runs trained on K images per class, one series per setting; every seed counts.
    groups: Dict[tuple, List[Result]] = {}
    for r in runs_k:
        if r.train_per_class in ks:
            groups.setdefault(setting_key(r), []).append(r)
    methods = Counter(members[0].method for members in groups.values())
    for key, members in sorted(groups.items(), key=lambda kv: repr(kv[0])):
        label = members[0].method + (f" s{setting_digest(members[0].setting)}" if methods[members[0].method] > 1
                                     else "")
        at = {k: [r for r in members if r.train_per_class == k] for k in ks}
        got = [k for k in ks if at[k]]
        stats = [mean_std([r.accuracy for r in at[k]]) for k in got]
        s = plots.Series(label, got, [m for m, _ in stats], [sd or 0.0 for _, sd in stats], kind="run")
        s.n = [len(at[k]) for k in got]
        points.append((s, [correct_matrix(at[k], va_paths) if at[k] else None for k in ks],
                       [float(np.mean([r.total_seconds for r in at[k]])) if at[k] else 0.0 for k in ks]))
    cheapest = _cheapest_by_k(ks, points, alpha, margin)
    sentence = _change_sentence(cheapest, margin)
    note = (f"{result.n_subsets} seeded subsets of train per k; hyper-parameters by CV inside each subset "
            "(k=1: defaults); val only scores")
    return CurveReport(result, path, [p[0] for p in points], cheapest, sentence, note, others=results)


def _heads_on_cache(head_rows: List[Row], path: str, ks: List[int], seed: int, va_paths: Sequence[str]):
    """(the curve, its points) of the heads fitted on one feature cache; None where the cache's
    train labels or val images are not the reference's (then its ks or tests would not line up)."""
    X_tr, y_tr, tr_paths, _ = store.read_split(path, "train")
    X_va, y_va, paths, _ = store.read_split(path, "val")
    if list(paths) != list(va_paths) or ks[-1] > int(np.bincount(y_tr).min()):
        return None
    names = list(dict.fromkeys(r.representative.head for r in head_rows))
    result = curve_mod.heads_curve(X_tr, y_tr, X_va, y_va, names, seed=seed, ks=ks, keys=list(tr_paths))
    mean, std = result.mean_std()
    n_sub = np.sum(~np.isnan(result.accuracy), axis=2)
    points = []
    for row in head_rows:
        i = names.index(row.representative.head)
        r = row.representative
        per_image = r.extract_seconds / r.extract_images if r.extract_images else 0.0
        s = plots.Series(row.label, result.ks, mean[i].tolist(), std[i].tolist())
        s.n = n_sub[i].tolist()
        points.append((s, [result.subsets(i, j) for j in range(len(ks))],
                       [per_image * result.n_images[j] + result.fit_seconds[i, j] for j in range(len(ks))]))
    return result, points


def _cheapest_by_k(ks: List[int], points, alpha: float, margin: float) -> List[dict]:
    """At each k, its own test family: every method with a point at k, every subset (heads) or
    seed (runs) counted; the top group (all pairs, Holm at this k) and the answer at this k (the
    cheapest method non-inferior to the most accurate within ``margin``). Costs are each point's
    own at k: a head's extraction of the k-per-class train images plus its fit on them, a run's
    training on them."""
    out = []
    for j, k in enumerate(ks):
        labels, correct, costs = [], [], []
        for s, corr, cost in points:
            if corr[j] is not None and len(corr[j]):
                labels.append(s.label + (" (end-to-end)" if s.kind == "run" else ""))
                correct.append(corr[j])
                costs.append(cost[j])
        pw = metrics.pairwise_seeds(correct, labels, alpha)
        acc = [float(np.mean(c)) for c in correct]
        best = min(range(len(labels)), key=lambda i: (-acc[i], costs[i], labels[i]))
        gaps = [metrics.difference(c, correct[best]) if i != best else None for i, c in enumerate(correct)]
        ok = [i for i in range(len(labels)) if i == best or gaps[i].low > -margin]
        rec = metrics.cheapest(ok, costs, labels)
        gap = gaps[rec]
        out.append({"k": k, "top_group": [labels[i] for i in pw.top_group], "most_accurate": labels[best],
                    "cheapest": labels[rec], "cost_seconds": costs[rec],
                    "gap": gap.diff if gap else 0.0, "gap_ci95": [gap.low, gap.high] if gap else [0.0, 0.0],
                    "costs": dict(zip(labels, costs))})
    return out


def _change_sentence(cheapest: List[dict], margin: float) -> str:
    if not cheapest:
        return ""
    rule = (f"the cheapest method non-inferior to the most accurate within {100 * margin:g} points (tested "
            "separately at each k: its own family of tests, its own costs)")
    spans, start = [], 0
    for j in range(1, len(cheapest) + 1):
        if j == len(cheapest) or cheapest[j]["cheapest"] != cheapest[start]["cheapest"]:
            ks = [c["k"] for c in cheapest[start:j]]
            spans.append((cheapest[start]["cheapest"], ks[0], ks[-1]))
            start = j
    if len(spans) == 1:
        return (f"Data-size curve: {rule} is {spans[0][0]} at every size tried "
                f"(k = {spans[0][1]}–{spans[0][2]} labelled images per class); on this data it never changes.")
    parts = [f"{name} for k = {a}" + (f"–{b}" if b != a else "") for name, a, b in spans]
    return (f"Data-size curve: {rule} changes with the labelled images per class: " + "; ".join(parts) + ".")


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
    decision.cheaper = rows[cheaper] if cheaper is not None else None
    # The val-size sentence is about the cheaper row in question; with none cheaper than the most
    # accurate, about the next cheapest row (what certifying it as an alternative would take).
    runner_up = metrics.cheapest([i for i in range(len(rows)) if i != best], costs, labels)
    candidate = (rows[not_worse] if not_worse != best and costs[not_worse] < costs[rec]
                 else rows[rec] if rec != best else rows[cheaper] if cheaper is not None
                 else rows[runner_up] if runner_up is not None else None)
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
    if cfg.backbones:  # --backbone a,b: only those (names as the records carry them)
        wanted = set(cfg.backbones)
        results = [r for r in results if r.backbone in wanted]
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
        res.curve = _curve_report(rows, runs_k, cfg.alpha, cfg.margin)
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
