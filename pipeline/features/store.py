"""The one module that knows the feature cache's HDF5 layout (and its resume parts).

Layout of ``cache/features/<data>-<key>.h5`` (readable with plain h5py or ``h5ls -r``)::

    /                 attrs: format, format_version, backbone, weights_id, weights_sha256,
                             pretrained, transform (JSON), precision, data_root, classes (JSON),
                             versions (JSON), created, settings_key, content_key
    /<split>/features float32 (N, D)     the backbone's pooled pre-logits (ResNet18: D = 512)
    /<split>/labels   int64 (N,)         index into classes
    /<split>/paths    utf-8 (N,)         image path relative to data_root (fixed length)
    /<split>/sha1     utf-8 (N,)         sha1 of the image file's bytes (fixed length)
    /<split>/size, /<split>/mtime_ns     int64 (N,) file stat, for cheap change detection
    /<split>/views    float32 (N, K, D) optional, K augmented passes (train split)
    /<split>          attrs: complete (bool), n (int), skipped (JSON list of
                             {path, reason, sha1, size, mtime_ns})

Every data set is chunked with HDF5's Fletcher-32 checksum filter (format version 2), so
HDF5 itself verifies each chunk it reads; a mismatch is a :class:`DamagedCacheError`.
Strings are fixed-length because HDF5 filters cannot apply to variable-length data. The
file is written with HDF5 1.10's object format (``libver="v110"``), whose object headers
carry checksums too, so damaged attributes are caught as well. Version-1 caches (no
checksums) are still read, with a warning.

A cache is written whole to a temporary name and renamed, so a file under the final name is
always complete. Work in progress lives in ``<file>.parts/`` as one ``.npz`` per batch (each
written atomically), which is what an interrupted run resumes from.

A distributed run (``torchrun``) also writes one shard per rank,
``<file>.shards/rank<r>-of-<w>-<tag>.h5``: the same split layout holding only the rows that
rank computed, root attribute ``format = pipeline.features.shard`` (so a shard is never read
as a cache) plus ``rank``, ``world_size`` and ``cache`` (the final file's name), and split
attribute ``complete = False``. Rank 0 copies the shards into the cache, then removes them.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import time
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import h5py
import numpy as np

from .. import files
from ..errors import DamagedCacheError, UserError
from ..paths import cache_file, parts_dir, shard_file, shards_dir  # file names: paths.py (re-exported)
from ..versions import TORCH_STACK, library_versions

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "FORMAT_SHARD",
    "DamagedCacheError",
    "FEATURE_CHUNK_ROWS",
    "HDF5_LIBVER",
    "Row",
    "SplitRows",
    "settings_key",
    "content_key",
    "cache_file",
    "write_cache",
    "read_meta",
    "read_split",
    "iter_split_chunks",
    "read_known_rows",
    "write_part",
    "read_parts",
    "read_part_files",
    "parts_dir",
    "shards_dir",
    "shard_file",
    "write_shard",
    "read_shard_rows",
    "read_shards",
    "remove_cache",
    "describe",
    "verify",
]

FORMAT = "pipeline.features"
FORMAT_VERSION = 2  # 2: every data set carries a Fletcher-32 checksum
_UNCHECKED_VERSION = 1  # still read, with a warning: no checksums
FORMAT_SHARD = "pipeline.features.shard"
# Caches written before backbones had a registry hold no feature_dim attribute: ResNet18's 512.
LEGACY_FEATURE_DIM = 512
HDF5_LIBVER = ("v110", "v110")  # HDF5 1.10 object headers (with checksums), readable by HDF5 >= 1.10
FEATURE_CHUNK_ROWS = 1024  # rows per chunk of <split>/features (2 MiB); the checksum is per chunk
_ROWS_PER_CHUNK = {"features": FEATURE_CHUNK_ROWS, "views": 256}  # others: _COLUMN_CHUNK rows
_COLUMN_CHUNK = 65536
_VERIFY_BYTES = 32 << 20  # verify() reads at most this much at a time



@dataclass
class Row:
    """One image's cached result (or why it was skipped)."""

    relpath: str
    sha1: str
    size: int
    mtime_ns: int
    feature: Optional[np.ndarray] = None  # (D,) float32; None when skipped
    views: Optional[np.ndarray] = None  # (K, D) float32
    error: str = ""


@dataclass
class SplitRows:
    """Everything one split of the cache holds, in order."""

    rows: List[Row]
    labels: List[int]
    skipped: List[Row] = field(default_factory=list)


def settings_key(settings: dict) -> str:
    """sha256 of the canonical JSON of everything that determines a feature value."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode("utf-8")).hexdigest()


def content_key(key: str, classes: List[str], splits: Dict[str, SplitRows]) -> str:
    h = hashlib.sha256(key.encode())
    h.update(json.dumps(classes).encode())
    for split in sorted(splits):
        for row, label in zip(splits[split].rows, splits[split].labels):
            h.update(f"{split}\0{row.relpath}\0{row.sha1}\0{label}\n".encode("utf-8"))
    return h.hexdigest()


def write_cache(path: str, settings: dict, meta: dict, classes: List[str],
                splits: Dict[str, SplitRows]) -> str:
    """Write a complete cache atomically (temporary file, fsync, rename). Returns content_key."""
    content = content_key(settings_key(settings), classes, splits)
    _write_atomic(path, lambda f: _write_file(f, FORMAT, settings, meta, classes, splits, content, True))
    return content


def write_shard(path: str, settings: dict, meta: dict, classes: List[str], splits: Dict[str, SplitRows],
                rank: int, world_size: int, cache: str) -> str:
    """Write one rank's rows of the cache ``cache`` atomically, in the cache's split layout.

    ``splits`` holds only the rows this rank computed (in data-set order). Returns ``path``.
    """
    content = content_key(settings_key(settings), classes, splits)
    shard_meta = dict(meta, rank=rank, world_size=world_size, cache=os.path.basename(cache))
    _write_atomic(path, lambda f: _write_file(f, FORMAT_SHARD, settings, shard_meta, classes, splits,
                                              content, False))
    return path


def _write_atomic(path: str, fill) -> None:
    """Create ``path`` through ``fill(h5py.File)`` on a temporary name, fsync, rename."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)

    def write(tmp: str) -> None:
        with h5py.File(tmp, "w", libver=HDF5_LIBVER) as f:
            fill(f)
            f.flush()

    files.atomic_write(path, write, by_name=True)


def _write_file(f: h5py.File, fmt: str, settings: dict, meta: dict, classes: List[str],
                splits: Dict[str, SplitRows], content: str, complete: bool) -> None:
    f.attrs["format"] = fmt
    f.attrs["format_version"] = FORMAT_VERSION
    for name, value in meta.items():
        f.attrs[name] = value if isinstance(value, (str, int, float, bool)) else json.dumps(value)
    f.attrs["classes"] = json.dumps(classes)
    f.attrs["versions"] = json.dumps(library_versions(*TORCH_STACK))
    f.attrs["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    f.attrs["settings"] = json.dumps(settings, sort_keys=True)
    f.attrs["settings_key"] = settings_key(settings)
    f.attrs["content_key"] = content
    for split, data in splits.items():
        _write_split(f.create_group(split), data, complete, int(meta.get("feature_dim", LEGACY_FEATURE_DIM)))


def _write_split(group: h5py.Group, data: SplitRows, complete: bool = True, dim: int = 0) -> None:
    n = len(data.rows)
    feats = np.stack([r.feature for r in data.rows]).astype(np.float32) if n else np.zeros((0, dim), np.float32)
    _dataset(group, "features", feats)
    _dataset(group, "labels", np.asarray(data.labels, dtype=np.int64))
    _dataset(group, "paths", _text([r.relpath for r in data.rows]))
    _dataset(group, "sha1", _text([r.sha1 for r in data.rows]))
    _dataset(group, "size", np.asarray([r.size for r in data.rows], dtype=np.int64))
    _dataset(group, "mtime_ns", np.asarray([r.mtime_ns for r in data.rows], dtype=np.int64))
    if n and data.rows[0].views is not None:
        _dataset(group, "views", np.stack([r.views for r in data.rows]).astype(np.float32))
    group.attrs["n"] = n
    group.attrs["complete"] = complete
    group.attrs["skipped"] = json.dumps([
        {"path": r.relpath, "reason": r.error, "sha1": r.sha1, "size": r.size, "mtime_ns": r.mtime_ns}
        for r in data.skipped
    ])


def _dataset(group: h5py.Group, name: str, values: np.ndarray) -> None:
    """A chunked, resizable data set with a Fletcher-32 checksum on every chunk."""
    rows = max(1, min(len(values), _ROWS_PER_CHUNK.get(name, _COLUMN_CHUNK)))
    group.create_dataset(name, data=values, chunks=(rows,) + values.shape[1:],
                         maxshape=(None,) + values.shape[1:], fletcher32=True)


def _text(values: List[str]) -> np.ndarray:
    """Fixed-length UTF-8: HDF5 filters (the checksum) cannot apply to variable-length strings."""
    encoded = [v.encode("utf-8") for v in values]
    return np.array(encoded, dtype=h5py.string_dtype("utf-8", max([1] + [len(e) for e in encoded])))


def _open(path: str) -> h5py.File:
    """Open a cache for reading; anything unreadable is a user error naming the fix."""
    if not os.path.isfile(path):
        raise UserError(f"feature cache {path!r} does not exist; run `make features` (python -m pipeline features) first")
    try:
        f = h5py.File(path, "r")
    except Exception as exc:
        raise DamagedCacheError(
            f"feature cache {path!r} is corrupt or not HDF5 ({type(exc).__name__}); delete it or rerun "
            "`python -m pipeline features --rebuild`"
        ) from None
    if f.attrs.get("format") != FORMAT:
        f.close()
        raise UserError(f"{path!r} is not a feature cache of this project (no format={FORMAT!r} attribute); "
                        "pass a cache that `python -m pipeline features` made, or rerun it with --rebuild")
    version = int(f.attrs.get("format_version", -1))
    if version == _UNCHECKED_VERSION:
        warnings.warn(f"feature cache {path!r} has format version {version}, which stores no checksums: damage "
                      "inside it cannot be detected; rerun `python -m pipeline features` to write a checksummed "
                      f"cache (version {FORMAT_VERSION}, a new file) and use that one")
    elif version != FORMAT_VERSION:
        f.close()
        raise UserError(
            f"feature cache {path!r} has format version {version}, this project reads {FORMAT_VERSION}; "
            "rerun `python -m pipeline features --rebuild`"
        )
    return f


def _attrs(f: h5py.File) -> dict:
    meta = {}
    for name, value in f.attrs.items():
        if isinstance(value, bytes):
            value = value.decode()
        if isinstance(value, str) and value[:1] in "[{":
            value = json.loads(value)
        elif isinstance(value, np.generic):
            value = value.item()
        meta[name] = value
    return meta


def _corrupt(path: str, exc: Exception, where: str = "") -> DamagedCacheError:
    if "filter returned failure" in str(exc):  # the only filter is the checksum
        what = f"data set {where} failed its checksum" if where else "a data set failed its checksum"
        return DamagedCacheError(f"feature cache {path!r} is damaged: {what} (its bytes changed after it was "
                                 "written); rerun `python -m pipeline features --rebuild`")
    return DamagedCacheError(
        f"feature cache {path!r} is damaged ({type(exc).__name__}: {str(exc)[:80]}); rerun "
        "`python -m pipeline features --rebuild`"
    )


def _read(path: str, ds: h5py.Dataset, selection=(), text: bool = False):
    """``ds[selection]`` (strings decoded when ``text``); HDF5 verifies each chunk's checksum."""
    try:
        return ds.asstr()[selection] if text else ds[selection]
    except Exception as exc:
        raise _corrupt(path, exc, ds.name.lstrip("/")) from None


def read_meta(path: str) -> dict:
    """Root attributes (JSON decoded) plus ``splits``: {split: {n, complete, skipped, views}}."""
    with _open(path) as f:
        try:
            meta = _attrs(f)
            dim = int(meta.get("feature_dim", LEGACY_FEATURE_DIM))
            meta["splits"] = {name: _split_info(name, g, dim) for name, g in f.items()}
        except Exception as exc:
            raise _corrupt(path, exc) from None
    meta["path"] = path
    return meta


def _split_info(name: str, g: h5py.Group, dim: int) -> dict:
    """A split's attributes, after checking that every data set holds its ``n`` rows."""
    n = int(g.attrs["n"])
    for column in ("features", "labels", "paths", "sha1", "size", "mtime_ns") + (("views",) if "views" in g else ()):
        if g[column].shape[:1] != (n,):
            raise ValueError(f"{name}/{column} has shape {g[column].shape}, expected {n} rows")
    if g["features"].shape[1:] != (dim,):
        raise ValueError(f"{name}/features has shape {g['features'].shape}, expected ({n}, {dim})")
    return {
        "n": n,
        "complete": bool(g.attrs["complete"]),
        "skipped": json.loads(g.attrs["skipped"]),
        "views": int(g["views"].shape[1]) if "views" in g else 0,
    }


def read_split(path: str, split: str, views: bool = False) -> Tuple[np.ndarray, np.ndarray, List[str], Optional[np.ndarray]]:
    """``(features (N, D), labels (N,), relpaths, views (N, K, D) or None)`` of one split."""
    with _open(path) as f:
        if split not in f:
            raise UserError(f"feature cache {path!r} has no split {split!r} (has {sorted(f)})")
        g = f[split]
        try:
            if not g.attrs.get("complete", False):
                raise UserError(f"split {split!r} of {path!r} is incomplete; rerun `python -m pipeline features`")
            feats = _read(path, g["features"])
            labels = _read(path, g["labels"])
            paths = list(_read(path, g["paths"], text=True))
            view_arr = _read(path, g["views"]) if views and "views" in g else None
        except UserError:
            raise
        except Exception as exc:
            raise _corrupt(path, exc) from None
    return feats, labels, paths, view_arr


def iter_split_chunks(path: str, split: str, chunk_rows: int,
                      order: Optional[Iterable[int]] = None) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """Stream ``(features, labels)`` of one split in row chunks, for out-of-core training.

    ``order``: chunk indices to read, in that order (chunk ``i`` holds rows
    ``i * chunk_rows`` up to the next chunk), e.g. a shuffled permutation; default sequential.
    """
    with _open(path) as f:
        try:
            g = f[split]
            n = int(g.attrs["n"])
            feats, labels = g["features"], g["labels"]
        except Exception as exc:
            raise _corrupt(path, exc) from None
        for i in (range(-(-n // chunk_rows)) if order is None else order):
            rows = slice(int(i) * chunk_rows, min(n, (int(i) + 1) * chunk_rows))
            chunk = _read(path, feats, rows), _read(path, labels, rows)
            yield chunk


def read_known_rows(path: str, features: bool = True) -> Dict[str, Row]:
    """Every row (and skipped file) of an existing complete cache, keyed by relative path.

    ``features=False`` leaves ``feature``/``views`` unset: enough to plan, a fraction of the memory.
    """
    if not os.path.exists(path):
        return {}
    with _open(path) as f:
        try:
            return _rows_of(f, features)
        except UserError:
            raise
        except Exception as exc:
            raise _corrupt(path, exc) from None


def _rows_of(f: h5py.File, features: bool) -> Dict[str, Row]:
    known: Dict[str, Row] = {}
    path = f.filename
    for g in f.values():
        feats = _read(path, g["features"]) if features else None
        views = _read(path, g["views"]) if features and "views" in g else None
        for i, (rel, sha, size, mtime) in enumerate(zip(
                _read(path, g["paths"], text=True), _read(path, g["sha1"], text=True), _read(path, g["size"]),
                _read(path, g["mtime_ns"]))):
            known[rel] = Row(rel, sha, int(size), int(mtime), None if feats is None else feats[i],
                             None if views is None else views[i])
        for s in json.loads(g.attrs["skipped"]):
            known[s["path"]] = Row(s["path"], s["sha1"], s["size"], s["mtime_ns"], error=s["reason"])
    return known


def read_shard_rows(path: str, features: bool = True, key: Optional[str] = None) -> Dict[str, Row]:
    """The rows of one rank's shard; ``key``: the settings_key it must have been made with.

    Raises
    ------
    UserError
        The file is unreadable, not a shard, or made with other settings.
    """
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != FORMAT_SHARD or int(f.attrs.get("format_version", -1)) != FORMAT_VERSION:
                raise UserError(f"{path!r} is not a feature-cache shard of this format version")
            if key is not None and f.attrs.get("settings_key") != key:
                raise UserError(f"shard {path!r} was made with other settings; delete it")
            return _rows_of(f, features)
    except DamagedCacheError:
        raise UserError(f"shard {path!r} is damaged (a checksum or structure error); delete it and rerun") from None
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"shard {path!r} is damaged ({type(exc).__name__}); delete it and rerun") from None


def read_shards(path: str, features: bool = True, key: Optional[str] = None) -> Dict[str, Row]:
    """Rows of every shard left beside the cache ``path`` (a distributed run that did not finish).

    Shards are written atomically, so an unreadable one means damage: it is ignored (with a
    warning) and its rows are computed again.
    """
    known: Dict[str, Row] = {}
    for name in sorted(glob.glob(os.path.join(shards_dir(path), "*.h5")), key=os.path.getmtime):
        try:
            known.update(read_shard_rows(name, features, key))
        except UserError as exc:
            warnings.warn(f"{exc}; its images will be extracted again")
    return known


def write_part(directory: str, rows: Iterable[Row], tag: str = "") -> str:
    """Persist one batch of results atomically; a crash leaves either all of it or none."""
    rows = list(rows)
    os.makedirs(directory, exist_ok=True)
    ok = [r for r in rows if r.feature is not None]
    arrays = {
        "relpath": np.array([r.relpath for r in rows], dtype=object).astype(str),
        "sha1": np.array([r.sha1 for r in rows]).astype(str),
        "size": np.array([r.size for r in rows], dtype=np.int64),
        "mtime_ns": np.array([r.mtime_ns for r in rows], dtype=np.int64),
        "error": np.array([r.error for r in rows]).astype(str),
        "features": np.stack([r.feature for r in ok]) if ok else np.zeros((0, 0), np.float32),
    }
    if ok and ok[0].views is not None:
        arrays["views"] = np.stack([r.views for r in ok])
    name = os.path.join(directory, f"{tag}{uuid.uuid4().hex}.npz")
    files.atomic_write(name, lambda fh: np.savez(fh, **arrays))
    return name


def read_parts(directory: str, features: bool = True) -> Dict[str, Row]:
    """Rows saved by interrupted runs; unreadable parts (should not happen) are ignored."""
    return read_part_files(sorted(glob.glob(os.path.join(directory, "*.npz")), key=os.path.getmtime), features)


def read_part_files(names: Iterable[str], features: bool = True) -> Dict[str, Row]:
    """Rows of the given part files, later files winning."""
    known: Dict[str, Row] = {}
    for name in names:
        try:
            with np.load(name) as z:
                feats = z["features"] if features else None
                views = z["views"] if features and "views" in z.files else None
                j = 0
                for rel, sha, size, mtime, err in zip(z["relpath"], z["sha1"], z["size"], z["mtime_ns"], z["error"]):
                    row = Row(str(rel), str(sha), int(size), int(mtime), error=str(err))
                    if not row.error:
                        row.feature = None if feats is None else feats[j]
                        row.views = None if views is None else views[j]
                        j += 1
                    known[row.relpath] = row
        except Exception:  # a torn part cannot exist (atomic rename); be safe anyway
            continue
    return known


def remove_cache(path: str) -> None:
    for p in (path, parts_dir(path), shards_dir(path)):
        if os.path.isdir(p):
            shutil.rmtree(p)
        elif os.path.exists(p):
            os.remove(p)


def describe(path: str) -> str:
    """A human-readable summary of a cache (``python -m pipeline info CACHE``)."""
    meta = read_meta(path)
    lines = [f"feature cache  {path}"]
    pretrained = meta.get("pretrained", True)
    for name in ("backbone", "weights_id", "precision", "data_root", "created", "content_key"):
        if name in meta:
            lines.append(f"  {name:<14} {meta[name]}")
    if not pretrained:
        lines.append("  NOTE           not pretrained (random weights): not a transfer-learning result")
    lines.append(f"  {'classes':<14} {', '.join(meta['classes'])}")
    for split, info in meta["splits"].items():
        extra = f", {info['views']} augmented views each" if info["views"] else ""
        lines.append(f"  {split:<14} {info['n']} images{extra}, {len(info['skipped'])} skipped, "
                     f"complete={info['complete']}")
        for s in info["skipped"]:
            lines.append(f"    skipped {s['path']}: {s['reason']}")
    lines.append(f"  {'versions':<14} " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()))
    checked, unchecked = verify(path)
    lines.append(f"  {'checksums':<14} " + (f"{checked} data sets read whole, every chunk's Fletcher-32 checksum "
                                            "matches" if not unchecked else
                                            f"none stored for {', '.join(unchecked)} (format version "
                                            f"{meta.get('format_version')}); the data cannot be verified"))
    return "\n".join(lines)


def verify(path: str) -> Tuple[int, List[str]]:
    """Read every data set of a cache whole, so HDF5 checks every chunk's checksum.

    Returns ``(data sets verified, data sets that store no checksum)``.

    Raises
    ------
    DamagedCacheError
        A chunk's bytes do not match its checksum, or the file is otherwise damaged.
    """
    checked, unchecked = 0, []
    with _open(path) as f:
        try:
            datasets = [g[name] for g in f.values() for name in g]
        except Exception as exc:
            raise _corrupt(path, exc) from None
        for ds in datasets:
            row_bytes = max(1, ds.dtype.itemsize * int(np.prod(ds.shape[1:], dtype=np.int64)))
            step = max(1, _VERIFY_BYTES // row_bytes)
            for start in range(0, ds.shape[0], step):
                _read(path, ds, slice(start, start + step))
            if ds.fletcher32:
                checked += 1
            else:
                unchecked.append(ds.name.lstrip("/"))
    return checked, unchecked
