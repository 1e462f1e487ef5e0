"""Read-speed cost of the feature cache's Fletcher-32 checksums (issue 13; target: under 10%).

Writes a feature cache of N x 512 float32 train features with ``store.write_cache`` (what
``features`` writes: every data set checksummed), and a copy with the same layout, chunks
and attributes but no checksum filter. Then reads both in alternating rounds (ABBA order,
so drift and caching favour neither), three ways:

* ``read_split``: ``store.read_split(path, "train")`` (features, labels and paths), as
  ``heads`` loads a split;
* ``features``: the features data set alone, ``read_direct`` into one preallocated array;
* ``streamed``: ``store.iter_split_chunks`` in blocks of ``--block`` rows, as the
  out-of-core heads read.

``--cold`` evicts each file from the page cache before every read (``posix_fadvise
DONTNEED``, no root needed), so disk reads are timed too; without it the files are read
from memory, which is the worst case for the ratio (the checksum is then most of the extra
work). Prints per-round times, the medians of each variant (wall clock and CPU seconds of
this process) and their ratio.

    python bench/checksums.py                          # 500k x 512: two ~1.1 GB files, deleted at the end
    python bench/checksums.py --cold                   # the same, reading from disk
    python bench/checksums.py --rows 50000 --rounds 3  # a quick check
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List

import h5py
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pipeline.features import store  # noqa: E402

DIM = 512


def write_checksummed(path: str, rows: int, seed: int = 0) -> None:
    """A cache as ``features`` writes it: N train rows, 1000 val rows, two classes."""
    rng = np.random.default_rng(seed)
    splits = {}
    for split, n in (("train", rows), ("val", 1000)):
        feats = rng.standard_normal((n, DIM), dtype=np.float32)
        labels = [i % 2 for i in range(n)]
        splits[split] = store.SplitRows(
            [store.Row(f"{split}/c{i % 2}/img_{i:07d}.jpg", f"{i:040x}", 1000 + i, i, feats[i]) for i in range(n)],
            labels)
    store.write_cache(path, {"bench": "checksums", "rows": rows}, {"backbone": "resnet18"}, ["c0", "c1"], splits)


def copy_without_checksums(src: str, dst: str) -> None:
    """The same file (attributes, data sets, chunk shapes), every data set without its filter."""
    block = 65536
    with h5py.File(src, "r") as f, h5py.File(dst, "w", libver=store.HDF5_LIBVER) as out:
        out.attrs.update(f.attrs)
        for split, group in f.items():
            g = out.create_group(split)
            g.attrs.update(group.attrs)
            for name, ds in group.items():
                copy = g.create_dataset(name, shape=ds.shape, dtype=ds.dtype, chunks=ds.chunks, maxshape=ds.maxshape)
                for start in range(0, ds.shape[0], block):
                    copy[start:start + block] = ds[start:start + block]
    with h5py.File(dst, "r") as f:
        assert not any(ds.fletcher32 for g in f.values() for ds in g.values())


def evict(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_features(path: str, out: np.ndarray) -> None:
    with h5py.File(path, "r") as f:
        f["train/features"].read_direct(out)


def read_streamed(path: str, block: int) -> None:
    for _X, _y in store.iter_split_chunks(path, "train", block):
        pass


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=500_000, help="train rows (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=6, help="rounds; each reads both files twice (ABBA order)")
    p.add_argument("--block", type=int, default=8192, help="rows per streamed read")
    p.add_argument("--dir", default=None, help="where the two files go (default: a temporary folder)")
    p.add_argument("--cold", action="store_true", help="evict the files from the page cache before each read")
    args = p.parse_args(argv)

    folder = tempfile.mkdtemp(prefix="bench-checksums-", dir=args.dir)
    files = {"fletcher32": os.path.join(folder, "fletcher32.h5"), "plain": os.path.join(folder, "plain.h5")}
    gib = args.rows * DIM * 4 / 2 ** 30
    try:
        write_checksummed(files["fletcher32"], args.rows)
        copy_without_checksums(files["fletcher32"], files["plain"])
        sizes = {name: os.path.getsize(path) / 2 ** 30 for name, path in files.items()}
        print(f"{args.rows} x {DIM} float32 train features ({gib:.2f} GiB; files {sizes['fletcher32']:.2f} and "
              f"{sizes['plain']:.2f} GiB), chunks of {store.FEATURE_CHUNK_ROWS} rows; h5py {h5py.__version__}, "
              f"HDF5 {h5py.version.hdf5_version}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, "
              f"{'cold (evicted before each read)' if args.cold else 'warm'} page cache")
        out = np.empty((args.rows, DIM), np.float32)
        ways: Dict[str, Callable[[str], None]] = {
            "read_split": lambda path: store.read_split(path, "train"),
            "features": lambda path: read_features(path, out),
            "streamed": lambda path: read_streamed(path, args.block),
        }
        wall: Dict[str, Dict[str, List[float]]] = {w: {n: [] for n in files} for w in ways}
        cpu: Dict[str, Dict[str, List[float]]] = {w: {n: [] for n in files} for w in ways}
        for r in range(args.rounds):
            order = list(files) if r % 2 == 0 else list(reversed(files))
            for way, read in ways.items():
                for name in order + order[::-1]:  # ABBA within the round too
                    if args.cold:
                        evict(files[name])
                    start, start_cpu = time.perf_counter(), time.process_time()
                    read(files[name])
                    wall[way][name].append(time.perf_counter() - start)
                    cpu[way][name].append(time.process_time() - start_cpu)
            print(f"round {r + 1}: " + "; ".join(
                f"{way} plain {wall[way]['plain'][-1]:.3f} s / fletcher32 {wall[way]['fletcher32'][-1]:.3f} s"
                for way in ways))
        print()
        print(f"{'read':<11} {'plain (median)':>15} {'fletcher32 (median)':>20} {'cost':>8}   "
              f"{'CPU s plain / fletcher32':>25} {'CPU cost':>9}")
        for way in ways:
            plain, checked = statistics.median(wall[way]["plain"]), statistics.median(wall[way]["fletcher32"])
            cpu_plain, cpu_checked = statistics.median(cpu[way]["plain"]), statistics.median(cpu[way]["fletcher32"])
            print(f"{way:<11} {plain:>13.3f} s {checked:>18.3f} s {checked / plain - 1:>+8.1%}   "
                  f"{cpu_plain:>12.3f} / {cpu_checked:<10.3f} {cpu_checked / max(cpu_plain, 1e-9) - 1:>+9.1%}")
        print(f"\ncost = fletcher32 median / plain median - 1 (wall clock; the target is under +10%). CPU: this "
              f"process's CPU seconds, less sensitive to a busy machine. Load average now {os.getloadavg()[0]:.1f}.")
    finally:
        for path in files.values():
            if os.path.exists(path):
                os.remove(path)
        os.rmdir(folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
