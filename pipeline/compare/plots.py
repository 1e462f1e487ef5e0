"""Figures of the compare report (PNG files only; matplotlib's Agg canvas, never a window).

Each function takes plain data (numbers, arrays, already-loaded thumbnails: it opens no
cache and no image file), writes one PNG atomically and returns its path, or ``None`` when
there is nothing to draw (for example no end-to-end run has a learning curve).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator
from sklearn.decomposition import PCA

from ..files import atomic_write
from ..text import format_duration

__all__ = [
    "Point",
    "Curve",
    "PcaPanel",
    "Series",
    "accuracy_vs_time",
    "learning_curves",
    "confusion_matrices",
    "grid_order",
    "prediction_grid",
    "feature_pca",
    "pairwise_heatmap",
    "data_size_curve",
]

_DPI = 130
_KIND_STYLE = {"head": ("o", "#1f77b4", "head on cached features"),
               "run": ("s", "#d62728", "end-to-end run")}
_WRONG, _RIGHT = "#c0392b", "#1e8449"


@dataclass
class Point:
    """One method on the accuracy-vs-time plot."""

    label: str
    seconds: float
    accuracy: float
    low: float  # lower end of the error bar (CI, or mean - std for several seeds)
    high: float
    kind: str = "head"  # head | run
    recommended: bool = False  # the cheapest row non-inferior to the most accurate (compare.stage)
    top: bool = False  # in the top group: no other method beats it significantly
    seed_accuracies: List[float] = field(default_factory=list)


@dataclass
class Curve:
    """One end-to-end run's history (``history.json``) for the learning-curve figure."""

    label: str
    group: str  # runs of one group (the seeds of one mode) share a colour
    history: dict
    selected_epoch: Optional[int] = None  # the epoch whose model is the reported result


@dataclass
class PcaPanel:
    """One feature cache's arrays for the PCA figure (``X`` of shape (n, n_features))."""

    title: str
    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray


@dataclass
class Series:
    """One method on the data-size curve: val accuracy mean ± std at each ``k``."""

    label: str
    k: Sequence[float]
    mean: Sequence[float]
    std: Sequence[float]
    kind: str = "head"  # head | run
    n: Sequence[int] = ()  # subsets (heads) or seeds (runs) behind each point

def _figure(width: float, height: float, dpi: int = _DPI) -> Figure:
    fig = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str) -> str:
    """Write the PNG under a temporary name, then rename: a file under ``path`` is complete."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=fig.dpi, facecolor="white"))
    return path


def _fmt_time(s: float, _pos=None) -> str:
    return format_duration(s, compact=True)


# Round clock times for the log time axis (seconds).
_TIME_TICKS = ([m / 1000 for m in (1, 2, 5, 10, 20, 50, 100, 200, 500)] + [1, 2, 5, 10, 20, 30]
               + [60 * m for m in (1, 2, 5, 10, 20, 30)] + [3600 * h for h in (1, 2, 5, 10, 24)]
               + [86400 * d for d in (2, 5, 10, 30)])


def _time_ticks(lo: float, hi: float, most: int = 9) -> List[float]:
    ticks = [t for t in _TIME_TICKS if lo <= t <= hi]
    step = max(1, math.ceil(len(ticks) / most))
    return ticks[::step]


def _dodge(secs: np.ndarray, width: float = 0.018) -> np.ndarray:
    """Spread points whose times are within ~4% of each other sideways (a few % in time),
    so their error bars stay apart; the shift is far below the resolution that matters here."""
    logs = np.log10(secs)
    out = logs.copy()
    order = np.argsort(logs)
    clusters, current = [], [order[0]]
    for i in order[1:]:
        if logs[i] - logs[current[-1]] < width:
            current.append(i)
        else:
            clusters.append(current)
            current = [i]
    clusters.append(current)
    for members in clusters:
        centre = logs[members].mean()
        for k, i in enumerate(members):
            out[i] = centre + (k - (len(members) - 1) / 2) * width
    return 10 ** out


# --------------------------------------------------------------------------- accuracy vs time


def accuracy_vs_time(points: Sequence[Point], path: str, title_note: str = "") -> Optional[str]:
    """Val accuracy (error bars) against total compute time (log axis), one labelled point per method.

    Filled markers: the top group (no other method beats them significantly, Holm-adjusted
    McNemar); hollow: beaten significantly by some method; star: the recommendation (the
    cheapest row non-inferior to the most accurate), whose interval is the shaded band.
    """
    if not points:
        return None
    fig = _figure(10.5, 5.8)
    ax = fig.add_subplot()
    secs = _dodge(np.array([max(p.seconds, 1e-3) for p in points]))
    best = next((p for p in points if p.recommended), None)
    if best is not None:
        ax.axhspan(best.low, best.high, color="#f1c40f", alpha=0.18, lw=0, zorder=0)
    for p, x in zip(points, secs):
        marker, colour, _ = _KIND_STYLE.get(p.kind, _KIND_STYLE["head"])
        filled = p.recommended or p.top
        ax.errorbar(x, p.accuracy, yerr=[[p.accuracy - p.low], [p.high - p.accuracy]], fmt="none",
                    ecolor=colour, elinewidth=1.4, capsize=4, alpha=0.8, zorder=2)
        if p.seed_accuracies:
            ax.scatter([x] * len(p.seed_accuracies), p.seed_accuracies, s=22, color=colour, alpha=0.9,
                       marker="D", edgecolor="white", linewidth=0.6, zorder=6)
        ax.scatter([x], [p.accuracy], s=260 if p.recommended else 70, marker="*" if p.recommended else marker,
                   facecolor=colour if filled else "white", edgecolor=colour, linewidth=1.6, zorder=5)

    lo = min(p.low for p in points)
    hi = max(p.high for p in points)
    pad = max(0.02, 0.08 * (hi - lo))
    ax.set_ylim(max(0.0, lo - pad), min(1.04, hi + pad))  # room above 1.0 for a perfect score's marker
    ax.yaxis.set_major_locator(FixedLocator([t for t in ax.get_yticks() if t <= 1.0 + 1e-9]))
    xmin, xmax = secs.min(), secs.max()
    span = math.log10(xmax / xmin)
    grow = max(0.0, (1.0 - span) / 2)  # at least one decade, so the axis shows what log means
    ax.set_xscale("log")
    ax.set_xlim(xmin / 10 ** (grow + 0.15), xmax * 10 ** (grow + 0.45))
    ax.xaxis.set_major_locator(FixedLocator(_time_ticks(*ax.get_xlim())))
    ax.xaxis.set_major_formatter(FuncFormatter(_fmt_time))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.grid(True, which="major", alpha=0.3)
    ax.set_xlabel("total compute time (log scale)", fontsize=11)
    ax.set_ylabel("val accuracy", fontsize=11)
    ax.set_title("Val accuracy vs total compute time" + title_note, fontsize=12)
    _place_labels(fig, ax, points, secs)

    handles = [Line2D([], [], marker=m, ls="", color=c, markersize=8, label=lab)
               for kind, (m, c, lab) in _KIND_STYLE.items() if any(p.kind == kind for p in points)]
    handles += [Patch(color="#f1c40f", alpha=0.3, label="recommended's interval"),
                Line2D([], [], marker="*", ls="", color="0.3", markersize=14,
                       label="recommended: cheapest non-inferior to the most accurate"),
                Line2D([], [], marker="o", ls="", color="0.3", markersize=8,
                       label="top group: beaten by none\n(all-pairs McNemar, Holm)"),
                Line2D([], [], marker="o", ls="", markerfacecolor="white", markeredgecolor="0.3",
                       markersize=8, label="beaten significantly")]
    if any(p.seed_accuracies for p in points):
        handles.append(Line2D([], [], marker="D", ls="", color="0.3", markersize=5,
                              label="one seed (bar: mean ± std of seeds)"))
    # Outside the axes, so the legend can never hide a point.
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8.5, frameon=False)
    return _save(fig, path)


def _place_labels(fig: Figure, ax, points: Sequence[Point], secs: np.ndarray) -> None:
    """Label each point beside it, at the nearest spot (right or left, then stepping up or down)
    that overlaps no other label and no marker; a label moved off its point gets a leader line."""
    fig.draw_without_rendering()  # settle the layout so data -> pixel transforms are final
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    xy = ax.transData.transform(np.column_stack([secs, [p.accuracy for p in points]]))
    # Boxes (x0, y0, x1, y1) in pixels that a label must not cover: every marker.
    taken = [(x - 9, y - 9, x + 9, y + 9) for x, y in xy]

    def free(box) -> bool:
        inside = box[0] >= frame.x0 and box[2] <= frame.x1 and box[1] >= frame.y0 and box[3] <= frame.y1
        return inside and not any(box[0] < t[2] and box[2] > t[0] and box[1] < t[3] and box[3] > t[1]
                                  for t in taken)

    order = sorted(range(len(points)), key=lambda i: (not points[i].recommended, -points[i].accuracy))
    for i in order:
        p = points[i]
        weight = "bold" if p.recommended else "normal"
        probe = ax.text(0, 0, p.label, fontsize=9, fontweight=weight)
        box = probe.get_window_extent(renderer)
        probe.remove()
        w, h = box.width + 4, box.height + 2
        x_px, y_px = xy[i]
        candidates = [(left, y_px + dy) for step in range(16) for dy in ({step * h, -step * h})
                      for left in (x_px + 12, x_px - 12 - w)]
        left, y = next((c for c in candidates if free((c[0], c[1] - h / 2, c[0] + w, c[1] + h / 2))),
                       candidates[0])
        taken.append((left, y - h / 2, left + w, y + h / 2))
        leader = None
        if abs(y - y_px) > h * 0.6:
            leader = dict(arrowstyle="-", color="0.5", lw=0.7, shrinkA=0, shrinkB=5,
                          relpos=(0.0 if left > x_px else 1.0, 0.5))
        ax.annotate(p.label, (secs[i], p.accuracy), xytext=(left + 2 - x_px, y - y_px), textcoords="offset pixels",
                    ha="left", va="center", fontsize=9, fontweight=weight, zorder=4, arrowprops=leader,
                    bbox=dict(boxstyle="round,pad=0.1", fc="white", ec="none", alpha=0.8))


# --------------------------------------------------------------------------- learning curves


def learning_curves(curves: Sequence[Curve], path: str, title_note: str = "") -> Optional[str]:
    """Loss and accuracy per epoch of each end-to-end run (val solid, train dashed)."""
    curves = [c for c in curves if c.history and c.history.get("epochs")]
    if not curves:
        return None
    fig = _figure(12, 4.8)
    ax_loss, ax_acc = fig.subplots(1, 2)
    groups = list(dict.fromkeys(c.group for c in curves))
    palette = [f"C{i}" for i in range(10)]
    colour = {g: palette[i % len(palette)] for i, g in enumerate(groups)}
    several = {g: sum(c.group == g for c in curves) > 1 for g in groups}
    for c in curves:
        epochs = c.history["epochs"]
        x = [e.get("epoch", i + 1) for i, e in enumerate(epochs)]
        kw = dict(color=colour[c.group], lw=1.2 if several[c.group] else 1.8,
                  alpha=0.7 if several[c.group] else 1.0)
        for ax, key in ((ax_loss, "loss"), (ax_acc, "acc")):
            for split, ls in (("val", "-"), ("train", "--")):
                y = [e.get(f"{split}_{key}") for e in epochs]
                if any(v is not None for v in y):
                    ax.plot(x, [np.nan if v is None else v for v in y], ls=ls, **kw)
        val_acc = [e.get("val_acc") for e in epochs]
        if c.selected_epoch in x and val_acc[x.index(c.selected_epoch)] is not None:
            j = x.index(c.selected_epoch)
            ax_acc.scatter([x[j]], [val_acc[j]], color=colour[c.group], s=40, zorder=3, edgecolor="black",
                           linewidth=0.6)
    for ax, name in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_xlabel("epoch", fontsize=11)
        ax.set_ylabel(name, fontsize=11)
        ax.grid(True, alpha=0.3)
    ax_loss.set_title("Loss per epoch", fontsize=12)
    ax_acc.set_title("Accuracy per epoch (dot: the reported epoch)", fontsize=12)
    handles = [Line2D([], [], color=colour[g], lw=2, label=g + (" (each seed)" if several[g] else ""))
               for g in groups]
    handles += [Line2D([], [], color="0.3", ls="-", label="val"),
                Line2D([], [], color="0.3", ls="--", label="train")]
    ax_acc.legend(handles=handles, fontsize=9, loc="lower right", framealpha=0.9)
    fig.suptitle("Learning curves of the end-to-end runs" + title_note, fontsize=13)
    return _save(fig, path)


# --------------------------------------------------------------------------- confusion matrices


def confusion_matrices(items: Sequence[Tuple[str, Sequence[Sequence[int]]]], classes: Sequence[str],
                       path: str, title_note: str = "") -> Optional[str]:
    """One panel per method: colour = share of the true class (row), text = count and share."""
    items = [(t, np.asarray(m, dtype=float)) for t, m in items]
    if not items:
        return None
    k = len(classes)
    ncols = min(len(items), 4)
    nrows = math.ceil(len(items) / ncols)
    side = max(3.0, min(0.45 * k + 1.6, 9.0))
    fig = _figure(side * ncols, side * nrows + 0.6)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    names = list(classes) if k <= 30 else [str(i) for i in range(k)]
    for ax, (title, m) in zip(axes, items):
        share = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        if k <= 12:
            for i in range(k):
                for j in range(k):
                    colour = "white" if share[i, j] > 0.6 else "black"
                    ax.text(j, i, f"{int(m[i, j])}\n{share[i, j]:.0%}", ha="center", va="center",
                            fontsize=10 if k <= 5 else 7, color=colour)
        ax.set_xticks(range(k), names, rotation=45 if k > 3 else 0, ha="right" if k > 3 else "center",
                      fontsize=9)
        ax.set_yticks(range(k), names, fontsize=9)
        ax.set_xlabel("predicted", fontsize=9)
        ax.set_ylabel("true", fontsize=9)
        ax.set_title(title, fontsize=9.5)
    for ax in axes[len(items):]:
        ax.set_visible(False)
    fig.suptitle("Confusion matrices on the val set" + title_note, fontsize=12)
    return _save(fig, path)


# --------------------------------------------------------------------------- prediction grid


def grid_order(y_true: List[int], y_pred: List[int], confidence: Optional[List[float]], limit: int,
               n_classes: int) -> List[int]:
    """Misclassified first (most confident mistakes first), then correct ones, round-robin over classes."""
    wrong = [i for i in range(len(y_true)) if y_true[i] != y_pred[i]]
    if confidence:
        wrong.sort(key=lambda i: -confidence[i])
    right_by_class: Dict[int, List[int]] = {}
    for i in range(len(y_true)):
        if y_true[i] == y_pred[i]:
            right_by_class.setdefault(y_true[i], []).append(i)
    right = []
    queues = [right_by_class.get(c, []) for c in range(n_classes)]
    while any(queues) and len(wrong) + len(right) < limit:
        for q in queues:
            if q and len(wrong) + len(right) < limit:
                right.append(q.pop(0))
    return (wrong + right)[:limit]


def prediction_grid(predictions: dict, classes: Sequence[str], tiles: Dict[int, Optional[np.ndarray]], path: str,
                    title: str = "", limit: int = 24, ncols: int = 6) -> Optional[str]:
    """Val images with predicted and true labels, misclassified first (red), then correct (green).

    ``tiles[i]`` is the thumbnail (an RGB ``uint8`` array) of image ``i`` for the images
    :func:`grid_order` picks; a missing one (None) is drawn as a grey "not found" tile.
    """
    if not predictions.get("paths"):
        return None
    y_true, y_pred = predictions["y_true"], predictions["y_pred"]
    confidence = predictions.get("confidence")
    order = grid_order(y_true, y_pred, confidence, limit, len(classes))
    n_wrong = sum(y_true[i] != y_pred[i] for i in range(len(y_true)))
    ncols = min(ncols, len(order))
    nrows = math.ceil(len(order) / ncols)
    fig = _figure(2.2 * ncols, 2.55 * nrows + 0.7, dpi=100)  # photos: a lower dpi keeps the PNG small
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax, i in zip(axes, order):
        tile = tiles.get(i)
        if tile is None:
            ax.imshow(np.full((160, 160, 3), 225, np.uint8))
            ax.text(80, 80, "image not found", ha="center", va="center", fontsize=8, color="0.35")
        else:
            ax.imshow(tile)
        ok = y_true[i] == y_pred[i]
        conf = f" ({confidence[i]:.2f})" if confidence else ""
        ax.set_title(f"pred: {classes[y_pred[i]]}{conf}\ntrue: {classes[y_true[i]]}", fontsize=9,
                     color=_RIGHT if ok else _WRONG, fontweight="normal" if ok else "bold")
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_edgecolor(_RIGHT if ok else _WRONG)
            spine.set_linewidth(1.5 if ok else 3.5)
    for ax in axes[len(order):]:
        ax.set_visible(False)
    head = title or "Best method's predictions"
    shown = sum(y_true[i] != y_pred[i] for i in order)
    if n_wrong == 0:
        line = f"no val image misclassified; {len(order)} of {len(y_true)} shown (green: correct)"
    elif shown < n_wrong:
        which = "most confident" if confidence else "first"
        line = f"{n_wrong} of {len(y_true)} val images misclassified: the {shown} {which} shown (red)"
    else:
        line = (f"{n_wrong} of {len(y_true)} val images misclassified (red, first), "
                "then correct ones (green)")
    fig.suptitle(f"{head}\n{line}", fontsize=11)
    return _save(fig, path)


# --------------------------------------------------------------------------- PCA of the features


def feature_pca(panels: Sequence[PcaPanel], classes: Sequence[str], path: str) -> Optional[str]:
    """2-D PCA of each feature cache (fitted on train): train dots, val triangles, coloured by class."""
    if not panels:
        return None
    fig = _figure(6.2 * len(panels), 5.6)
    axes = np.atleast_1d(fig.subplots(1, len(panels), squeeze=False)).ravel()
    palette = [to_rgb(f"C{i}") for i in range(10)]
    for ax, panel in zip(axes, panels):
        x_tr, y_tr, x_va, y_va = panel.X_train, panel.y_train, panel.X_val, panel.y_val
        pca = PCA(n_components=2, random_state=0).fit(x_tr)
        z_tr, z_va = pca.transform(x_tr), pca.transform(x_va)
        for c, name in enumerate(classes):
            colour = palette[c % len(palette)]
            ax.scatter(*z_tr[y_tr == c].T, s=16, color=colour, alpha=0.55, lw=0, label=f"{name} (train)")
            ax.scatter(*z_va[y_va == c].T, s=34, marker="^", facecolor="none", edgecolor=colour, lw=1.1,
                       label=f"{name} (val)")
        ev = pca.explained_variance_ratio_
        ax.set_xlabel(f"PC 1 ({ev[0]:.0%} of variance)", fontsize=10)
        ax.set_ylabel(f"PC 2 ({ev[1]:.0%} of variance)", fontsize=10)
        ax.set_title(panel.title, fontsize=10)
        ax.grid(True, alpha=0.25)
        ax.legend(fontsize=8, markerscale=1.2, ncols=2 if len(classes) > 4 else 1, framealpha=0.9,
                  loc="best")
    fig.suptitle("Cached features, 2-D PCA (fitted on train) coloured by class", fontsize=12)
    return _save(fig, path)


# --------------------------------------------------------------------------- which wins, pair by pair


def pairwise_heatmap(names: Sequence[str], adjusted: np.ndarray, advantage: np.ndarray, alpha: float,
                     path: str, top: Sequence[int] = (), title_note: str = "") -> Optional[str]:
    """Every pair of methods: cell ``[i, j]`` tests row ``i`` against column ``j``.

    Parameters
    ----------
    adjusted : ndarray of shape (n, n)
        Holm-adjusted exact McNemar p-values (symmetric; NaN on the diagonal).
    advantage : ndarray of shape (n, n)
        Images only the row gets right minus images only the column gets right.
    top : indices of the top group (their labels are bold).

    Colour: green when the row is significantly better (adjusted p <= alpha), red when it is
    significantly worse, pale when the data cannot tell them apart (shade: the direction).
    Text: the adjusted p and the signed advantage.
    """
    n = len(names)
    if n < 2:
        return None
    rgb = np.ones((n, n, 3))
    green, red = np.array(to_rgb("#1e8449")), np.array(to_rgb("#c0392b"))
    for i in range(n):
        for j in range(n):
            if i == j:
                rgb[i, j] = to_rgb("0.85")
                continue
            sig = adjusted[i, j] <= alpha
            colour = green if advantage[i, j] > 0 else red if advantage[i, j] < 0 else np.ones(3)
            rgb[i, j] = colour if sig else 0.82 * np.ones(3) + 0.18 * colour  # pale: direction only
    side = max(5.0, 0.9 * n + 2.5)
    fig = _figure(side + 2.0, side + 1.4)
    ax = fig.add_subplot()
    ax.imshow(np.clip(rgb, 0, 1))
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            sig = adjusted[i, j] <= alpha
            text = f"p={adjusted[i, j]:.2g}\n{advantage[i, j]:+d}"
            ax.text(j, i, text, ha="center", va="center", fontsize=8 if n <= 8 else 6.5,
                    color="white" if sig else "0.2", fontweight="bold" if sig else "normal")
    labels = [f"{name} ●" if k in top else name for k, name in enumerate(names)]
    ax.set_xticks(range(n), labels, rotation=35, ha="right", fontsize=9)
    ax.set_yticks(range(n), labels, fontsize=9)
    for tick_labels in (ax.get_xticklabels(), ax.get_yticklabels()):
        for k, lab in enumerate(tick_labels):
            if k in top:
                lab.set_fontweight("bold")
    ax.set_xlabel("column method", fontsize=10)
    ax.set_ylabel("row method", fontsize=10)
    fig.suptitle(f"Which wins, pair by pair: exact McNemar, Holm-adjusted p (α = {alpha:g}){title_note}",
                 fontsize=11)
    handles = [Patch(color=green, label="row significantly better"),
               Patch(color=red, label="row significantly worse"),
               Patch(facecolor=0.82 * np.ones(3) + 0.18 * green, edgecolor="0.6",
                     label="not distinguishable\n(tint: direction only)"),
               Patch(facecolor="white", edgecolor="white", label="● bold: top group")]
    fig.legend(handles=handles, loc="outside lower center", ncols=2, fontsize=8.5, frameon=False,
               title="cell text: adjusted p; images only the row gets right minus only the column",
               title_fontsize=8.5)
    return _save(fig, path)


# --------------------------------------------------------------------------- data-size curve


def data_size_curve(series: Sequence[Series], path: str, title_note: str = "", note: str = "") -> Optional[str]:
    """Val accuracy (mean ± std over seeded subsets) against labelled train images per class."""
    series = [s for s in series if len(s.k)]
    if not series:
        return None
    fig = _figure(10.5, 5.6)
    ax = fig.add_subplot()
    ks = sorted({float(k) for s in series for k in s.k})
    heads = [s for s in series if s.kind == "head"]
    for n, s in enumerate(heads):
        k, m, sd = np.asarray(s.k, float), np.asarray(s.mean, float), np.asarray(s.std, float)
        colour = f"C{n % 10}"
        ax.plot(k, m, marker="o", ms=4, lw=1.6, color=colour, label=s.label)
        ax.fill_between(k, m - sd, m + sd, color=colour, alpha=0.07, lw=0)
    for n, s in enumerate(x for x in series if x.kind != "head"):
        colour = f"C{(len(heads) + n) % 10}"
        ax.errorbar(np.asarray(s.k, float), s.mean, yerr=s.std, fmt="s", ms=8, capsize=4, color=colour,
                    mfc="white", mew=1.8, label=f"{s.label} (end-to-end)")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(ks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:g}"))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlim(min(ks) / 1.3, max(ks) * 1.3)
    ax.grid(True, alpha=0.3)
    ax.set_xlabel("labelled train images per class (log scale)", fontsize=11)
    ax.set_ylabel("val accuracy", fontsize=11)
    ax.set_title("Val accuracy vs labelled images per class" + title_note
                 + (f"\n{note}" if note else ""), fontsize=12 if not note else 11)
    fig.legend(loc="outside right upper", fontsize=9, frameon=False,
               title="line: mean, band: ± std\nover seeded subsets", title_fontsize=8.5)
    return _save(fig, path)
