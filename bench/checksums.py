"""Read-speed cost of the feature cache's Fletcher-32 checksums (issue 13; target: under 10%).

Writes two files holding the same N x 512 float32 features in the layout ``store.py`` uses
(chunks of ``store.FEATURE_CHUNK_ROWS`` rows, HDF5 1.10 object headers), one with
``fletcher32=True`` (what the pipeline writes) and one without, then reads them in
alternating rounds (ABBA order, so drift and caching favour neither) two ways:

* whole: ``dataset.read_direct`` into one preallocated array, as ``heads`` reads a split;
* streamed: consecutive blocks of ``--block`` rows, as the out-of-core heads read.

``--cold`` evicts each file from the page cache before every read (``posix_fadvise
DONTNEED``, no root needed), so disk reads are timed too; without it the files are read
from memory, which is the worst case for the ratio (the checksum is then most of the
extra work). Prints per-round times, the median of each variant and the ratio of medians.

    python bench/checksums.py                      # 500k x 512: two 1 GB files, deleted at the end
    python bench/checksums.py --rows 50000 --rounds 3   # a quick check
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

from pipeline import store  # noqa: E402

DIM = 512


def write(path: str, rows: int, checksum: bool, seed: int = 0) -> None:
    """``rows`` x 512 random float32 features under ``train/features``, written block by block."""
    rng = np.random.default_rng(seed)
    block = 65536
    with h5py.File(path, "w", libver=store.HDF5_LIBVER) as f:
        ds = f.create_dataset("train/features", shape=(rows, DIM), dtype=np.float32,
                              chunks=(min(rows, store.FEATURE_CHUNK_ROWS), DIM), maxshape=(None, DIM),
                              fletcher32=checksum)
        for start in range(0, rows, block):
            stop = min(rows, start + block)
            ds[start:stop] = rng.standard_normal((stop - start, DIM), dtype=np.float32)
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def evict(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_whole(path: str, out: np.ndarray) -> None:
    with h5py.File(path, "r") as f:
        f["train/features"].read_direct(out)


def read_streamed(path: str, block: int) -> None:
    with h5py.File(path, "r") as f:
        ds = f["train/features"]
        for start in range(0, ds.shape[0], block):
            ds[start:start + block]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=500_000)
    p.add_argument("--rounds", type=int, default=6, help="rounds; each reads both files (ABBA order)")
    p.add_argument("--block", type=int, default=8192, help="rows per streamed read")
    p.add_argument("--dir", default=None, help="where the two files go (default: a temporary folder)")
    p.add_argument("--cold", action="store_true", help="evict the files from the page cache before each read")
    p.add_argument("--keep", action="store_true", help="keep the files")
    args = p.parse_args(argv)

    folder = tempfile.mkdtemp(prefix="bench-checksums-", dir=args.dir)
    files = {"fletcher32": os.path.join(folder, "fletcher32.h5"), "plain": os.path.join(folder, "plain.h5")}
    gib = args.rows * DIM * 4 / 2 ** 30
    print(f"{args.rows} x {DIM} float32 ({gib:.2f} GiB per file), chunks of {store.FEATURE_CHUNK_ROWS} rows, "
          f"h5py {h5py.__version__}, HDF5 {h5py.version.hdf5_version}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}, {'cold' if args.cold else 'warm'} page cache")
    try:
        for name, path in files.items():
            write(path, args.rows, checksum=(name == "fletcher32"))
        with h5py.File(files["fletcher32"], "r") as f:
            assert f["train/features"].fletcher32
        out = np.empty((args.rows, DIM), np.float32)
        ways: Dict[str, Callable[[str], None]] = {
            "whole": lambda path: read_whole(path, out),
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
        print(f"{'read':<10} {'plain (median)':>15} {'fletcher32 (median)':>20} {'cost':>8}   "
              f"{'CPU s plain / fletcher32':>25} {'CPU cost':>9}")
        for way in ways:
            plain, checked = statistics.median(wall[way]["plain"]), statistics.median(wall[way]["fletcher32"])
            cpu_plain, cpu_checked = statistics.median(cpu[way]["plain"]), statistics.median(cpu[way]["fletcher32"])
            print(f"{way:<10} {plain:>13.3f} s {checked:>18.3f} s {checked / plain - 1:>+8.1%}   "
                  f"{cpu_plain:>12.3f} / {cpu_checked:<10.3f} {cpu_checked / max(cpu_plain, 1e-9) - 1:>+9.1%}")
        print(f"\ncost = fletcher32 median / plain median - 1 (wall clock; the target is under +10%). CPU: this "
              f"process's CPU seconds, less sensitive to a busy machine. Load average now {os.getloadavg()[0]:.1f}.")
    finally:
        if not args.keep:
            for path in files.values():
                if os.path.exists(path):
                    os.remove(path)
            os.rmdir(folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
