"""Stage 1: run the frozen ResNet18 once over the data set into the HDF5 feature cache.

Resumable (per-batch parts), incremental (unchanged images are never recomputed), atomic
(the cache appears under its final name only when complete) and never stale (the file name
is a hash of every setting that shapes a feature value).
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from filelock import FileLock
from tqdm.auto import tqdm

from . import backbone, data, store
from .config import FEATURE_DIM, FeaturesConfig
from .errors import UserError

__all__ = ["FeaturesResult", "run", "resolve", "default_workers", "default_batch_size"]

log = logging.getLogger(__name__)


@dataclass
class FeaturesResult:
    path: str
    counts: Dict[str, int]
    skipped: List[dict]
    computed: int
    seconds: float
    images_per_s: float
    device: str
    precision: str
    weights_id: str
    pretrained: bool
    up_to_date: bool
    content_key: str = ""
    timings: Dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"feature cache  {self.path}"]
        if not self.pretrained:
            lines.append(f"  weights        {self.weights_id} (not pretrained: not a transfer-learning result)")
        else:
            lines.append(f"  weights        {self.weights_id}")
        lines.append("  images         " + ", ".join(f"{s} {n}" for s, n in self.counts.items()))
        if self.up_to_date:
            lines.append("  up to date     no image changed: no forward pass")
        else:
            lines.append(f"  computed       {self.computed} images in {self.seconds:.1f} s "
                         f"({self.images_per_s:.1f} images/s) on {self.device}, {self.precision}")
        lines.append(f"  skipped        {len(self.skipped)}")
        for s in self.skipped:
            lines.append(f"    {s['path']}: {s['reason']}")
        return "\n".join(lines)


@dataclass(frozen=True)
class Resolved:
    """Everything a run decides before touching the network."""

    dataset: data.DataSet
    weights: backbone.Weights
    device: torch.device
    precision: str
    settings: dict
    path: str


def default_workers(device: torch.device) -> int:
    """Loader processes: leave the cores to the forward pass on CPU, feed the GPU generously."""
    cores = os.cpu_count() or 1
    if device.type == "cuda":
        return max(1, min(cores - 1, 12))
    return max(1, min(cores // 2, 4))


def default_batch_size(device: torch.device) -> int:
    return 256 if device.type == "cuda" else 32


def resolve(cfg: FeaturesConfig) -> Resolved:
    """Discover the data, weights, device and precision, and name the cache file."""
    _validate(cfg)
    device = backbone.choose_device(cfg.device)
    precision = backbone.choose_precision(cfg.precision, device)
    weights = backbone.resolve_weights(cfg.weights, cfg.seed)
    dataset = data.discover(cfg.data)
    settings = {
        "backbone": backbone.BACKBONE,
        "weights_sha256": weights.sha256,
        "transform": data.describe_transforms(cfg.views, cfg.draft),
        "precision": precision,
        "data_root": dataset.root,
        "view_seed": cfg.seed if cfg.views else None,
        "format_version": store.FORMAT_VERSION,
    }
    path = store.cache_file(cfg.cache, dataset.root, store.settings_key(settings))
    return Resolved(dataset, weights, device, precision, settings, path)


def _validate(cfg: FeaturesConfig) -> None:
    for name in ("batch_size", "views"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} {getattr(cfg, name)} must be >= 0")
    if cfg.workers < -1:
        raise UserError(f"--workers {cfg.workers} must be >= 0 (or -1 for automatic)")


def _sha1(path: str) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _plan(res: Resolved, known: Dict[str, store.Row]) -> Tuple[Dict[str, List[store.Row]], Dict[str, List[Tuple[str, os.stat_result]]]]:
    """Reuse every known row whose file is unchanged; list the images still to compute."""
    reused: Dict[str, List[store.Row]] = {}
    todo: Dict[str, List[Tuple[str, os.stat_result]]] = {}
    for split, items in res.dataset.splits.items():
        reused[split], todo[split] = [], []
        for item in items:
            full = res.dataset.path(item)
            st = os.stat(full)
            row = known.get(item.relpath)
            if row is not None and (row.size, row.mtime_ns) != (st.st_size, st.st_mtime_ns):
                # Touched but maybe not changed: the content hash decides.
                if row.sha1 == _sha1(full):
                    row.size, row.mtime_ns = st.st_size, st.st_mtime_ns
                else:
                    row = None
            if row is None:
                todo[split].append((item.relpath, st))
            else:
                reused[split].append(row)
    return reused, todo


def _loader(res: Resolved, cfg: FeaturesConfig, relpaths: List[str], views: int) -> torch.utils.data.DataLoader:
    workers = default_workers(res.device) if cfg.workers < 0 else cfg.workers
    dataset = data.ExtractionDataset(res.dataset.root, relpaths, views=views, seed=cfg.seed, draft=cfg.draft)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=cfg.batch_size or default_batch_size(res.device),
        num_workers=workers,
        pin_memory=res.device.type == "cuda",
        prefetch_factor=4 if workers else None,
    )


def _forward(model, images: torch.Tensor, res: Resolved, channels_last: bool) -> torch.Tensor:
    x = images.to(res.device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with backbone.autocast(res.device, res.precision):
        return model(x).float()


def _extract(res: Resolved, cfg: FeaturesConfig, todo: Dict[str, List[Tuple[str, os.stat_result]]],
             parts: str) -> int:
    """Forward every image in ``todo``, saving one atomic part per batch. Returns images done."""
    model = backbone.feature_extractor(res.weights, res.device, cfg.channels_last)
    total = sum(len(v) for v in todo.values())
    bar = tqdm(total=total, unit="img", desc="features", disable=not cfg.progress, dynamic_ncols=True)
    with torch.inference_mode():
        for split, entries in todo.items():
            if entries:
                # Augmented views are a training aid: only the train split gets them.
                _extract_split(model, res, cfg, entries, cfg.views if split == "train" else 0, parts, bar)
    bar.close()
    return total


def _extract_split(model, res: Resolved, cfg: FeaturesConfig, entries: List[Tuple[str, os.stat_result]],
                   n_views: int, parts: str, bar) -> None:
    relpaths = [rel for rel, _ in entries]
    stats = dict(entries)
    for batch in _loader(res, cfg, relpaths, n_views):
        ok = [i for i, err in enumerate(batch["error"]) if not err]
        feats = views = None
        if ok:
            sel = torch.tensor(ok)
            images = batch["image"][sel]
            if n_views:
                images = torch.cat([images, batch["views"][sel].flatten(0, 1)])
            out = _forward(model, images, res, cfg.channels_last).cpu().numpy()
            feats = out[: len(ok)]
            if n_views:
                views = out[len(ok):].reshape(len(ok), n_views, FEATURE_DIM)
        rows = []
        for i, index in enumerate(batch["index"].tolist()):
            rel = relpaths[index]
            st = stats[rel]
            row = store.Row(rel, batch["sha1"][i], st.st_size, st.st_mtime_ns, error=batch["error"][i])
            if not row.error:
                j = ok.index(i)
                row.feature = feats[j]
                row.views = None if views is None else views[j]
            elif cfg.strict:
                raise UserError(f"cannot decode {os.path.join(res.dataset.root, rel)!r} ({row.error}); "
                                "remove or fix the file, or drop --strict to skip it")
            rows.append(row)
        store.write_part(parts, rows)
        bar.update(len(rows))


def _assemble(res: Resolved, rows: Dict[str, store.Row]) -> Dict[str, store.SplitRows]:
    splits = {}
    for split, items in res.dataset.splits.items():
        good, labels, skipped = [], [], []
        for item in items:
            row = rows[item.relpath]
            if row.error:
                skipped.append(row)
            else:
                good.append(row)
                labels.append(item.label)
        splits[split] = store.SplitRows(good, labels, skipped)
    return splits


def _meta(res: Resolved, extract_seconds: float) -> dict:
    return {
        "extract_seconds": extract_seconds,
        "extract_device": str(res.device),
        "backbone": backbone.BACKBONE,
        "weights_id": res.weights.id,
        "weights_sha256": res.weights.sha256,
        "pretrained": res.weights.pretrained,
        "transform": res.settings["transform"],
        "precision": res.precision,
        "data_root": res.dataset.root,
    }


def _result(res: Resolved, meta: dict, computed: int, seconds: float, up_to_date: bool) -> FeaturesResult:
    skipped = [dict(s, split=split) for split, info in meta["splits"].items() for s in info["skipped"]]
    return FeaturesResult(
        path=res.path, counts={s: i["n"] for s, i in meta["splits"].items()}, skipped=skipped,
        computed=computed, seconds=seconds, images_per_s=computed / seconds if seconds > 0 else 0.0,
        device=str(res.device), precision=res.precision, weights_id=res.weights.id,
        pretrained=res.weights.pretrained, up_to_date=up_to_date, content_key=meta["content_key"],
    )


def _unchanged(path: str, res: Resolved, splits: Dict[str, store.SplitRows]) -> bool:
    """The existing cache already holds exactly these rows, labels, classes and skipped files."""
    if not os.path.exists(path):
        return False
    meta = store.read_meta(path)
    expected = store.content_key(store.settings_key(res.settings), res.dataset.classes, splits)
    skipped = {s: sorted(r.relpath for r in rows.skipped) for s, rows in splits.items()}
    return meta["content_key"] == expected and skipped == {
        s: sorted(x["path"] for x in info["skipped"]) for s, info in meta["splits"].items()}


def run(cfg: FeaturesConfig) -> FeaturesResult:
    """Extract (or update) the feature cache for ``cfg`` and return what happened."""
    res = resolve(cfg)
    os.makedirs(os.path.dirname(res.path), exist_ok=True)
    parts = store.parts_dir(res.path)
    with FileLock(res.path + ".lock"):
        if cfg.rebuild:
            store.remove_cache(res.path)
        known = store.read_known_rows(res.path)
        known.update(store.read_parts(parts))
        reused, todo = _plan(res, known)
        if cfg.strict:
            bad = [r for rows in reused.values() for r in rows if r.error]
            if bad:
                raise UserError(f"cannot decode {os.path.join(res.dataset.root, bad[0].relpath)!r} "
                                f"({bad[0].error}); remove or fix it, or drop --strict to skip it")
        rows = {r.relpath: r for split_rows in reused.values() for r in split_rows}
        if not any(todo.values()) and _unchanged(res.path, res, _assemble(res, rows)):
            return _result(res, store.read_meta(res.path), 0, 0.0, up_to_date=True)
        start = time.perf_counter()
        computed = _extract(res, cfg, todo, parts)
        seconds = time.perf_counter() - start
        rows.update(store.read_parts(parts))
        # Compute time of every row in the cache, so compare can charge heads their share.
        previous = store.read_meta(res.path).get("extract_seconds", 0.0) if os.path.exists(res.path) else 0.0
        meta = _meta(res, previous + seconds)
        store.write_cache(res.path, res.settings, meta, res.dataset.classes, _assemble(res, rows))
        shutil.rmtree(parts, ignore_errors=True)
        meta = store.read_meta(res.path)
    return _result(res, meta, computed, seconds, up_to_date=False)
