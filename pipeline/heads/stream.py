"""Out-of-core heads: SGD with ``partial_fit`` over HDF5 chunks of the train split.

Memory is a few chunks plus 9 bytes per train row (labels and the hold-out mask); the train
split is never loaded whole. Used by ``heads --out-of-core`` for the heads whose spec says
``out_of_core`` (the SGD heads).
"""
from __future__ import annotations

import time
from typing import Iterator, Sequence, Tuple

import numpy as np
from sklearn.preprocessing import StandardScaler

from ..features import store
from ..config import HeadsConfig
from .cv import Fitted, n_splits, splitter
from .saved import head_pipeline

__all__ = ["stream_train", "fit_out_of_core"]


def stream_train(path: str, n: int, chunk_rows: int, rng: np.random.Generator
                 ) -> Iterator[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Shuffled ``(X, y, row_index)`` batches of about ``chunk_rows`` rows, read as random
    blocks: a cache is stored class by class, so sequential chunks would each hold one class."""
    block = max(1, chunk_rows // 8)
    n_blocks = -(-n // block)
    order = rng.permutation(n_blocks)
    buf_x, buf_y, buf_i = [], [], []
    for b, (X, y) in zip(order, store.iter_split_chunks(path, "train", block, order=order)):
        buf_x.append(X)
        buf_y.append(y)
        buf_i.append(np.arange(b * block, b * block + len(y)))
        if sum(len(v) for v in buf_y) >= chunk_rows:
            yield _shuffled(buf_x, buf_y, buf_i, rng)
            buf_x, buf_y, buf_i = [], [], []
    if buf_y:
        yield _shuffled(buf_x, buf_y, buf_i, rng)


def _shuffled(xs, ys, idx, rng):
    X, y, i = np.concatenate(xs), np.concatenate(ys), np.concatenate(idx)
    p = rng.permutation(len(y))
    return X[p], y[p], i[p]


def fit_out_of_core(spec, path: str, cfg: HeadsConfig, classes: Sequence[str], n: int) -> Fitted:
    """SGD with ``partial_fit`` over HDF5 chunks; memory is O(chunk_rows) plus 9 bytes per row.

    A first pass fits the final scaler and reads the labels, which fix a stratified hold-out
    fold (1/k of train); a second pass fits the CV scaler on the other rows. The alpha grid
    is trained in the same passes on those rows and scored on the hold-out fold; the chosen
    alpha is then refitted on every train row.
    """
    start = time.perf_counter()
    step = cfg.chunk_rows  # n: the train rows, from the metadata the caller has read
    scaler, cv_scaler, labels = StandardScaler(), StandardScaler(), np.empty(n, np.int64)
    for i, (X, y) in enumerate(store.iter_split_chunks(path, "train", step)):
        scaler.partial_fit(X)
        labels[i * step: i * step + len(y)] = y
    k = n_splits(labels, classes, cfg.cv_folds)
    holdout = np.zeros(n, bool)
    _, test = next(splitter(k, cfg.seed).split(np.zeros((n, 1), np.int8), labels))
    holdout[test] = True
    for i, (X, _y) in enumerate(store.iter_split_chunks(path, "train", step)):
        cv_scaler.partial_fit(X[~holdout[i * step: i * step + len(X)]])
    all_classes = np.arange(len(classes))
    rng = np.random.default_rng(cfg.seed)
    models = [spec.build(a, cfg.seed, streamed=True) for a in spec.grid]
    for _ in range(cfg.epochs):
        for X, y, rows in stream_train(path, n, step, rng):
            keep = ~holdout[rows]
            if keep.any():
                Xs = cv_scaler.transform(X[keep])
                for m in models:
                    m.partial_fit(Xs, y[keep], classes=all_classes)
    correct = np.zeros(len(models))
    for i, (X, y) in enumerate(store.iter_split_chunks(path, "train", step)):
        mask = holdout[i * step: i * step + len(y)]
        if mask.any():
            Xs = cv_scaler.transform(X[mask])
            correct += [np.sum(m.predict(Xs) == y[mask]) for m in models]
    acc = correct / max(1, holdout.sum())
    best_i = int(np.argmax(acc))
    best = spec.grid[best_i]
    cv = {"metric": "accuracy", "splitter": f"stratified hold-out fold (1/{k} of train rows), streamed",
          "folds": 1, "param": spec.param, "val_used": False, "grid": list(spec.grid),
          "mean": [float(a) for a in acc], "std": [0.0] * len(acc), "best": {spec.param: best},
          "best_score": float(acc[best_i]), "best_std": 0.0, "refined": False, "not_converged": 0,
          "out_of_core": {"chunk_rows": cfg.chunk_rows, "epochs": cfg.epochs, "rows": n}}
    cv["seconds"] = time.perf_counter() - start
    final = spec.build(best, cfg.seed, streamed=True)
    for _ in range(cfg.epochs):
        for X, y, _rows in stream_train(path, n, cfg.chunk_rows, rng):
            final.partial_fit(scaler.transform(X), y, classes=all_classes)
    return Fitted(head_pipeline(final, scaler), cv, time.perf_counter() - start, [])


