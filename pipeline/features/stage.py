"""Stage 1: run the frozen ResNet18 once over the data set into the HDF5 feature cache.

Resumable (per-batch parts), incremental (unchanged images are never recomputed), atomic
(the cache appears under its final name only when complete) and never stale (the file name
is a hash of every setting that shapes a feature value).

Under ``torchrun`` (``WORLD_SIZE`` > 1) every rank plans the same work, computes a disjoint,
deterministic share of it into its own HDF5 shard, and rank 0 copies the shards into one
cache identical to a single process's (same layout, row order and content key).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
from filelock import FileLock, Timeout
from tqdm.auto import tqdm

from .. import backbones, data, distributed, files, paths
from . import extraction, store
from ..config import FeaturesConfig
from ..errors import UserError

__all__ = ["FeaturesResult", "Plan", "run", "resolve", "prepare", "find_cache", "share"]

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
    timings: Dict[str, float] = field(default_factory=dict)  # seconds: plan, extract, write
    processes: int = 1  # ranks that shared the extraction (torchrun)
    threads: int = 0  # torch's intra-op threads of the (each) extracting process
    primary: bool = True  # False on ranks other than 0, which report nothing
    backbone: str = ""

    def summary(self) -> str:
        lines = [f"feature cache  {self.path}"]
        if self.backbone:
            lines.append(f"  backbone       {self.backbone}")
        if not self.pretrained:
            lines.append(f"  weights        {self.weights_id} (not pretrained: not a transfer-learning result)")
        else:
            lines.append(f"  weights        {self.weights_id}")
        lines.append("  images         " + ", ".join(f"{s} {n}" for s, n in self.counts.items()))
        if self.up_to_date:
            lines.append("  up to date     no image changed: no forward pass")
        else:
            on = f"{self.processes} processes on {self.device.split(':')[0]}" if self.processes > 1 else self.device
            threads = f", {self.threads} thread{'s' if self.threads != 1 else ''}" if self.threads else ""
            lines.append(f"  computed       {self.computed} images in {self.seconds:.1f} s "
                         f"({self.images_per_s:.1f} images/s) on {on}, {self.precision}{threads}")
        lines.append(f"  skipped        {len(self.skipped)}")
        for s in self.skipped:
            lines.append(f"    {s['path']}: {s['reason']}")
        return "\n".join(lines)


@dataclass(frozen=True)
class Resolved:
    """Everything a run decides before touching the network."""

    dataset: data.DataSet
    weights: backbones.Weights
    device: torch.device
    precision: str
    settings: dict
    path: str
    engine: str = "torch"  # what computes the features (not part of the key: fp32 either way)
    decode: str = "pil"  # who decodes JPEGs: pil or tensor (extraction.choose_decode; part of the key)


def resolve(cfg: FeaturesConfig, device: Optional[torch.device] = None) -> Resolved:
    """Discover the data, weights, device (unless given) and precision, and name the cache file."""
    if device is None:
        device = backbones.choose_device(cfg.device)
    precision = backbones.choose_precision(cfg.precision, device)
    if cfg.engine == "onnxruntime" and (device.type != "cpu" or precision != "fp32"):
        raise UserError(f"--engine onnxruntime computes fp32 on CPU, not {precision} on {device}; pass "
                        "--device cpu --precision fp32 (the same to heads), or use --engine torch")
    backbone = backbones.get_backbone(cfg.backbone)
    decode = extraction.choose_decode(cfg.decode, device, cfg.engine)
    weights = extraction.load_weights(cfg.weights, cfg.seed, backbone.name)
    dataset = data.discover(cfg.data)
    settings = {
        "backbone": backbone.name,
        "weights_sha256": weights.sha256,
        "transform": _transform(cfg, decode, backbone.preprocess()),
        "precision": precision,
        "data_root": dataset.root,
        "view_seed": cfg.seed if cfg.views else None,
        "format_version": store.FORMAT_VERSION,
    }
    path = store.cache_file(cfg.cache, dataset.root, store.settings_key(settings))
    return Resolved(dataset, weights, device, precision, settings, path, cfg.engine, decode)


def _transform(cfg: FeaturesConfig, decode: str, preprocess: dict) -> dict:
    """What shapes the backbone's input (``preprocess``: the backbone's). The tensor decode path
    changes feature values slightly (another resize implementation, no draft mode), so it is part
    of the cache's key; PIL, the default everywhere but CUDA, adds nothing (caches made before
    ``--decode`` keep their key)."""
    desc = data.describe_transforms(cfg.views, cfg.draft, preprocess)
    if decode == "tensor":
        desc["decode"] = data.TENSOR_DECODE
    return desc


def _request(cfg: FeaturesConfig, precision: str, decode: str = "pil") -> str:
    """The index key: every setting that names a cache, knowable without weights or images.

    The weights are named by spec and seed, or by a file's path, size, mtime and inode (a
    changed file names no cache until ``features`` has run with it).
    """
    backbone = backbones.get_backbone(cfg.backbone)
    request = {
        "data_root": os.path.abspath(cfg.data),
        "weights": list(extraction.weights_identity(cfg.weights, cfg.seed)),
        "transform": _transform(cfg, decode, backbone.preprocess()),
        "precision": precision,
        "view_seed": cfg.seed if cfg.views else None,
        "format_version": store.FORMAT_VERSION,
    }
    if not backbone.is_default:  # the default's key stays what it was before backbones had names
        request["backbone"] = backbone.name
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode("utf-8")).hexdigest()


def _read_index(cache: str) -> dict:
    try:
        with open(paths.features_index(cache), encoding="utf-8") as fh:
            index = json.load(fh)
        return index if isinstance(index, dict) else {}
    except (OSError, ValueError):
        return {}  # no index (or a damaged one): `features` writes it again


def _remember(cfg: FeaturesConfig, res: Resolved) -> None:
    """Record in the index that ``res.path`` holds the features of ``cfg`` (atomic, locked)."""
    path = paths.features_index(cfg.cache)
    with FileLock(path + ".lock"):
        files.remove_temporaries(*os.path.split(path))  # left by a killed writer (none is live)
        index = _read_index(cfg.cache)
        index[_request(cfg, res.precision, res.decode)] = {
            "file": os.path.basename(res.path), "weights_id": res.weights.id,
            "weights_sha256": res.weights.sha256, "data_root": res.dataset.root}
        text = json.dumps(index, indent=1, sort_keys=True)
        files.atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def find_cache(cfg: FeaturesConfig) -> str:
    """The cache file ``features`` made for ``cfg``, from its index: no weights read, no images listed.

    Raises ``UserError`` naming `make features` when there is none for these settings (or the
    data set's own error when it is unusable: only then is the image folder listed).
    """
    device = backbones.choose_device(cfg.device)
    precision = backbones.choose_precision(cfg.precision, device)
    decode = extraction.choose_decode(cfg.decode, device, cfg.engine)
    entry = _read_index(cfg.cache).get(_request(cfg, precision, decode))
    found = isinstance(entry, dict) and isinstance(entry.get("file"), str)
    path = os.path.join(paths.features_dir(cfg.cache), entry["file"]) if found else ""
    if not path or not os.path.isfile(path):
        data.discover(cfg.data)  # an unusable data set is the first thing to fix: its own error
        raise UserError(
            f"no feature cache for these settings under {paths.features_dir(cfg.cache)!r}; run "
            "`python -m pipeline features` with the same --data, --cache, --backbone, --weights, --views and --precision "
            "first (make heads does), or pass --features FILE")
    return path


def _plan(res: Resolved, known: Dict[str, store.Row]) -> Tuple[Dict[str, List[store.Row]], Dict[str, List[Tuple[str, os.stat_result]]]]:
    """Reuse every known row whose file is unchanged; list the images still to compute.

    The stat taken here is the one stored with the row, and it is taken *before* the loader
    reads the bytes (whose sha1 is stored with the feature): a file rewritten after this
    point has another stat on the next run, is hashed again there, and is recomputed when
    its bytes differ. So a feature is never stored under another content's fingerprint.
    """
    reused: Dict[str, List[store.Row]] = {}
    todo: Dict[str, List[Tuple[str, os.stat_result]]] = {}
    for split, items in res.dataset.splits.items():
        reused[split], todo[split] = [], []
        for item in items:
            full = res.dataset.path(item)
            try:
                st = os.stat(full)
                row = known.get(item.relpath)
                if row is not None and (row.size, row.mtime_ns) != (st.st_size, st.st_mtime_ns):
                    # Touched but maybe not changed: the content hash decides.
                    if row.sha1 == files.file_digest(full):
                        row.size, row.mtime_ns = st.st_size, st.st_mtime_ns
                    else:
                        row = None
            except FileNotFoundError:  # deleted since the data set was listed: skipped and listed
                reused[split].append(store.Row(item.relpath, "", -1, -1, error=_DELETED))
                continue
            if row is None:
                todo[split].append((item.relpath, st))
            else:
                reused[split].append(row)
    return reused, todo


_DELETED = "deleted while this run was in progress (after the data set was listed)"


def _extract(res: Resolved, cfg: FeaturesConfig, todo: Dict[str, List[Tuple[str, os.stat_result]]],
             parts: str, ctx: distributed.Context = distributed.Context()) -> List[str]:
    """Forward every image in ``todo``, saving one atomic part per batch. Returns the part files."""
    total = sum(len(v) for v in todo.values())
    if not total:
        return []
    if res.engine == "onnxruntime":
        from .onnx_engine import OnnxExtractor

        engine = OnnxExtractor(res.weights, cfg.cache, cfg.batch_size, cfg.workers, processes=ctx.local_world_size)
    else:
        engine = extraction.Extractor(res.weights, res.device, res.precision, cfg.batch_size, cfg.workers,
                                      cfg.channels_last, processes=ctx.local_world_size, decode=res.decode)
    desc = f"features rank 0/{ctx.world_size}" if ctx.is_distributed else "features"
    bar = tqdm(total=total, unit="img", desc=desc, disable=not (cfg.progress and ctx.is_primary),
               dynamic_ncols=True)
    written: List[str] = []
    tag = f"rank{ctx.rank}-of-{ctx.world_size}-" if ctx.is_distributed else ""
    for split, entries in todo.items():
        if entries:
            # Augmented views are a training aid: only the train split gets them.
            written += _extract_split(engine, res, cfg, entries, cfg.views if split == "train" else 0,
                                      parts, bar, tag)
    bar.close()
    return written


def _extract_split(engine: extraction.Extractor, res: Resolved, cfg: FeaturesConfig,
                   entries: List[Tuple[str, os.stat_result]], n_views: int, parts: str, bar,
                   tag: str = "") -> List[str]:
    relpaths = [rel for rel, _ in entries]
    stats = dict(entries)
    written = []
    for batch in engine.batches(res.dataset.root, relpaths, n_views, cfg.seed, cfg.draft):
        rows = []
        for j, index in enumerate(batch.index):
            rel = relpaths[index]
            st = stats[rel]
            row = store.Row(rel, batch.sha1[j], st.st_size, st.st_mtime_ns, error=batch.error[j])
            if row.error and not row.sha1:  # not even read (deleted, unreadable): tried again next run
                row.size = row.mtime_ns = -1
            if not row.error:
                row.feature = batch.features[j]
                row.views = None if batch.views is None else batch.views[j]
            elif cfg.strict:
                raise UserError(f"cannot decode {os.path.join(res.dataset.root, rel)!r} ({row.error}); "
                                "remove or fix the file, or drop --strict to skip it")
            rows.append(row)
        written.append(store.write_part(parts, rows, tag=tag))
        bar.update(len(rows))
    return written


def _assemble(res: Resolved, rows: Dict[str, store.Row], partial: bool = False) -> Dict[str, store.SplitRows]:
    """Rows in data-set order, split by split; ``partial``: only the images ``rows`` holds (a shard)."""
    splits = {}
    for split, items in res.dataset.splits.items():
        good, labels, skipped = [], [], []
        for item in items:
            row = rows.get(item.relpath) if partial else rows[item.relpath]
            if row is None:
                continue
            if row.error:
                skipped.append(row)
            else:
                good.append(row)
                labels.append(item.label)
        splits[split] = store.SplitRows(good, labels, skipped)
    return splits


def _meta(res: Resolved, extract_seconds: float, processes: int = 1) -> dict:
    return {
        "extract_seconds": extract_seconds,
        "extract_device": str(res.device),
        "extract_processes": processes,
        "extract_threads": torch.get_num_threads(),
        "extract_engine": res.engine,
        "backbone": res.weights.backbone.name,
        "feature_dim": backbones.feature_dim(res.weights.backbone.name),
        "weights_id": res.weights.id,
        "weights_sha256": res.weights.sha256,
        "pretrained": res.weights.pretrained,
        "weights": res.weights.ref.to_json(),
        "transform": res.settings["transform"],
        "precision": res.precision,
        "data_root": res.dataset.root,
    }


def _result(res: Resolved, meta: dict, computed: int, seconds: float, up_to_date: bool,
            processes: int = 1) -> FeaturesResult:
    skipped = [dict(s, split=split) for split, info in meta["splits"].items() for s in info["skipped"]]
    return FeaturesResult(
        path=res.path, counts={s: i["n"] for s, i in meta["splits"].items()}, skipped=skipped,
        computed=computed, seconds=seconds, images_per_s=computed / seconds if seconds > 0 else 0.0,
        device=str(res.device), precision=res.precision, weights_id=res.weights.id,
        pretrained=res.weights.pretrained, up_to_date=up_to_date, content_key=meta["content_key"],
        processes=processes, threads=torch.get_num_threads(), backbone=res.weights.backbone.name,
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


def _known(res: Resolved, features: bool = True) -> Dict[str, store.Row]:
    """Rows already computed: the cache, then shards and parts left by interrupted runs."""
    known = store.read_known_rows(res.path, features)
    known.update(store.read_shards(res.path, features, store.settings_key(res.settings)))
    known.update(store.read_parts(store.parts_dir(res.path), features))
    return known


class Plan(NamedTuple):
    """What :func:`prepare` found: the work an extraction of ``res`` has left."""

    rows: Dict[str, store.Row]  # reusable results (cache, parts, shards), by image path
    todo: Dict[str, List[Tuple[str, os.stat_result]]]  # per split: (path, stat) still to compute
    up_to_date: bool  # nothing to compute and the cache file already holds exactly ``rows``


def prepare(res: Resolved, cfg: FeaturesConfig, features: bool = True) -> Plan:
    """What is known and what is left for the cache ``res`` (``features=False``: rows without vectors)."""
    reused, todo = _plan(res, _known(res, features))
    if cfg.strict:
        bad = [r for rows in reused.values() for r in rows if r.error]
        if bad:
            raise UserError(f"cannot decode {os.path.join(res.dataset.root, bad[0].relpath)!r} "
                            f"({bad[0].error}); remove or fix it, or drop --strict to skip it")
    rows = {r.relpath: r for split_rows in reused.values() for r in split_rows}
    up_to_date = not any(todo.values()) and _unchanged(res.path, res, _assemble(res, rows))
    return Plan(rows, todo, up_to_date)


def _previous_seconds(res: Resolved) -> float:
    return store.read_meta(res.path).get("extract_seconds", 0.0) if os.path.exists(res.path) else 0.0


def _finish(res: Resolved, rows: Dict[str, store.Row], seconds: float, processes: int = 1) -> dict:
    """Write the cache from every row (in data-set order), drop the work files; returns its meta."""
    missing = [item.relpath for items in res.dataset.splits.values() for item in items if item.relpath not in rows]
    if missing:
        raise RuntimeError(f"{len(missing)} images have no result (e.g. {missing[0]!r}); rerun to resume")
    # Compute time of every row in the cache, so compare can charge heads their share.
    meta = _meta(res, _previous_seconds(res) + seconds, processes)
    store.write_cache(res.path, res.settings, meta, res.dataset.classes, _assemble(res, rows))
    _remove_work_files(res.path)
    return store.read_meta(res.path)


def _remove_work_files(path: str) -> None:
    """Parts and shards, once the cache at ``path`` holds every row they hold."""
    shutil.rmtree(store.parts_dir(path), ignore_errors=True)
    shutil.rmtree(store.shards_dir(path), ignore_errors=True)


def run(cfg: FeaturesConfig) -> FeaturesResult:
    """Extract (or update) the feature cache for ``cfg`` and return what happened.

    Under ``torchrun`` the work is shared by the ranks; only rank 0's result is ``primary``.
    """
    ctx = distributed.from_env()
    if not ctx.is_distributed:
        res = resolve(cfg)
        result = _run_local(cfg, res)
        _remember(cfg, res)
        return result
    device = backbones.choose_device(distributed.device_spec(cfg.device, ctx))
    with distributed.session(ctx, device, cfg.dist_timeout) as ctx:
        return _run_distributed(cfg, ctx, device)


def _run_local(cfg: FeaturesConfig, res: Resolved) -> FeaturesResult:
    os.makedirs(os.path.dirname(res.path), exist_ok=True)
    with FileLock(res.path + ".lock"):
        files.remove_temporaries(*os.path.split(res.path))  # left by a killed run
        if cfg.rebuild:
            store.remove_cache(res.path)
        start = time.perf_counter()
        rows, todo, up_to_date = prepare(res, cfg)
        if up_to_date:
            _remove_work_files(res.path)  # left by a run killed after its rename
            return _result(res, store.read_meta(res.path), 0, 0.0, up_to_date=True)
        planned = time.perf_counter()
        written = _extract(res, cfg, todo, store.parts_dir(res.path))
        extracted = time.perf_counter()
        seconds = extracted - planned
        rows.update(store.read_part_files(written))
        meta = _finish(res, rows, seconds)
    result = _result(res, meta, sum(len(v) for v in todo.values()), seconds, up_to_date=False)
    result.timings = {"plan": planned - start, "extract": seconds, "write": time.perf_counter() - extracted}
    return result


def share(todo: Dict[str, list], rank: int, world_size: int) -> Dict[str, list]:
    """Rank ``rank``'s share of the work: every ``world_size``-th image of each split.

    Deterministic (a function of the plan, which every rank computes alike), disjoint, and
    balanced within one image per split, also between slow and fast class folders.
    """
    return {split: entries[rank::world_size] for split, entries in todo.items()}


def _plan_digest(res: Resolved, todo: Dict[str, list], up_to_date: bool) -> str:
    plan = [res.path, up_to_date, {split: [rel for rel, _ in entries] for split, entries in todo.items()}]
    return hashlib.sha256(json.dumps(plan).encode("utf-8")).hexdigest()


def _take_lock(stack: contextlib.ExitStack, res: Resolved, cfg: FeaturesConfig) -> None:
    """Rank 0 alone holds the cache's lock for the whole job (and applies --rebuild)."""
    os.makedirs(os.path.dirname(res.path), exist_ok=True)
    try:
        # A little under the ranks' own timeout, so rank 0 explains before they give up.
        stack.enter_context(FileLock(res.path + ".lock", timeout=0.9 * cfg.dist_timeout))
    except Timeout:
        raise UserError(f"another extraction holds {res.path + '.lock'!r}; wait for it to finish "
                        "(or raise --dist-timeout)") from None
    files.remove_temporaries(*os.path.split(res.path))  # left by a killed run
    if cfg.rebuild:
        store.remove_cache(res.path)


def _extract_shard(res: Resolved, cfg: FeaturesConfig, ctx: distributed.Context,
                   mine: Dict[str, List[Tuple[str, os.stat_result]]]) -> dict:
    """Compute this rank's share into parts, then into its shard file; returns what it did."""
    start = time.perf_counter()
    written = _extract(res, cfg, mine, store.parts_dir(res.path), ctx)
    seconds = time.perf_counter() - start
    shard = store.shard_file(res.path, ctx.rank, ctx.world_size, uuid.uuid4().hex[:8])
    store.write_shard(shard, res.settings, _meta(res, seconds, ctx.world_size), res.dataset.classes,
                      _assemble(res, store.read_part_files(written), partial=True),
                      ctx.rank, ctx.world_size, res.path)
    for name in written:  # the shard holds them now
        os.remove(name)
    return {"shard": shard, "computed": sum(len(v) for v in mine.values()), "seconds": seconds}


def _stitch(res: Resolved, rows: Dict[str, store.Row], shards: List[dict], seconds: float,
            world_size: int) -> FeaturesResult:
    """Rank 0: the reused rows plus every rank's shard, copied into one cache."""
    key = store.settings_key(res.settings)
    for info in shards:
        rows.update(store.read_shard_rows(info["shard"], key=key))
    meta = _finish(res, rows, seconds, world_size)
    return _result(res, meta, sum(i["computed"] for i in shards), seconds, up_to_date=False,
                   processes=world_size)


def _secondary(res: Resolved, ctx: distributed.Context) -> FeaturesResult:
    """What ranks other than 0 return: nothing to report (rank 0 prints the summary)."""
    return FeaturesResult(path=res.path, counts={}, skipped=[], computed=0, seconds=0.0, images_per_s=0.0,
                          device=str(res.device), precision=res.precision, weights_id=res.weights.id,
                          pretrained=res.weights.pretrained, up_to_date=False,
                          processes=ctx.world_size, primary=False)


def _run_distributed(cfg: FeaturesConfig, ctx: distributed.Context, device: torch.device) -> FeaturesResult:
    # Rank 0 first: it may download the data set or the weights the others then find.
    res = ctx.primary_first("resolve", lambda: resolve(cfg, device))
    begin = time.perf_counter()
    with contextlib.ExitStack() as stack:
        ctx.collective("lock", lambda: _take_lock(stack, res, cfg), run=ctx.is_primary)
        # Only rank 0 needs the known features (to write the cache); the others plan from paths.
        rows, todo, up_to_date = ctx.collective("plan", lambda: prepare(res, cfg, features=ctx.is_primary))
        digests = ctx.meet("plan", value=_plan_digest(res, todo, up_to_date))
        if len(set(digests)) > 1:  # the same on every rank, so every rank stops here
            raise UserError(
                f"the ranks planned different work for {res.path!r}: the data folder, the cache folder "
                "and the files in them must be the same (shared) paths on every node")
        if up_to_date:
            if not ctx.is_primary:
                return _secondary(res, ctx)
            _remove_work_files(res.path)  # left by a run killed after its rename
            _remember(cfg, res)
            return _result(res, store.read_meta(res.path), 0, 0.0, up_to_date=True, processes=ctx.world_size)
        start = time.perf_counter()
        info, error = None, None
        try:
            info = _extract_shard(res, cfg, ctx, share(todo, ctx.rank, ctx.world_size))
        except Exception as exc:  # every rank hears of it at the meeting below
            error = exc
        shards = ctx.meet("extraction", error, info)
        extracted = time.perf_counter()
        seconds = extracted - start
        result = ctx.collective("stitch", lambda: _stitch(res, rows, shards, seconds, ctx.world_size),
                                run=ctx.is_primary)
    if not ctx.is_primary:
        return _secondary(res, ctx)
    _remember(cfg, res)
    result.timings = {"plan": start - begin, "extract": seconds, "write": time.perf_counter() - extracted}
    return result
