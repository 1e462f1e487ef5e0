"""Sharded extraction benchmark: 1 versus N processes, scaling with the set size, stitching.

    python bench/distributed.py [--data DIR] [--nproc 2] [--json FILE]        # a few minutes
    python bench/distributed.py --sizes 2500,5000,10000,20000 --stitch-rows 20000,100000   # full run
    python bench/distributed.py --skip-real --skip-scaling --skip-stitch   # (d) fine-tuning alone

(a) the real data set extracted cold by one process and by ``torchrun --nproc_per_node=N``:
    extraction images/s, wall time of the whole command, peak RSS per process;
(b) synthetic sets of small JPEGs of growing size (``--sizes``, capped by ``--max-images``),
    extracted by N ranks: images/s and peak RSS should stay flat as the set grows;
(c) stitching N shards into one cache: the merge (copy) the pipeline does against an h5py
    virtual data set (VDS) over the shards: creation time, full read time, file size, and
    whether the result still reads right once the shards are gone or the file is moved;
(d) fine-tuning (``python -m pipeline finetune``) of the real data set by one process and by
    ``torchrun --nproc_per_node=N`` (DistributedDataParallel, the same global batch): train
    images/s of the last epoch and the scaling efficiency (speed-up over one single-threaded
    process, divided by N), with the load average around each run.

Random weights (nothing to download; speed does not depend on the weight values). Each run
is a fresh process tree on a fresh cache; run ``--worker`` is the per-rank entry point.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

import h5py
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from pipeline.features import store  # noqa: E402


def default_data() -> str:
    for candidate in (os.environ.get("BENCH_DATA"), os.environ.get("PIPELINE_TEST_DATA"),
                      os.path.join(HERE, "..", "..", "shared", "data", "hymenoptera_data"),
                      os.path.join("data", "hymenoptera_data")):
        if candidate and os.path.isdir(candidate):
            return candidate
    sys.exit("no data set: pass --data DIR")


# ---------------------------------------------------------------- one rank (under torchrun or alone)

def worker(args) -> None:
    """Run the feature stage; every rank writes ``<out>.rank<r>.json`` with its peak RSS."""
    from pipeline.features import stage as features
    from pipeline.config import FeaturesConfig

    cfg = FeaturesConfig(data=args.data, cache=args.cache, weights="random", device="cpu", progress=False,
                         batch_size=args.batch_size)
    result = features.run(cfg)
    rank = int(os.environ.get("RANK", "0"))
    me, loaders = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    report = {"rank": rank, "maxrss_mb": me.ru_maxrss / 1024,
              # CPU seconds of this rank and its (finished) loader processes: the cost, whatever the load.
              "cpu_s": me.ru_utime + me.ru_stime + loaders.ru_utime + loaders.ru_stime}
    if result.primary:
        report["result"] = dataclasses.asdict(result)
    with open(f"{args.out}.rank{rank}.json", "w") as fh:
        json.dump(report, fh)


def extract(data: str, nproc: int, batch_size: int = 0, threads: int = 0) -> dict:
    """Cold extraction of ``data`` by ``nproc`` processes (torchrun when > 1), as a fresh command.

    ``threads``: OMP_NUM_THREADS per process (0: torchrun's 1 per rank, torch's default alone).
    """
    tmp = tempfile.mkdtemp(prefix="bench-dist-")
    out = os.path.join(tmp, "report")
    entry = [os.path.abspath(__file__), "--worker", "--data", data, "--cache", os.path.join(tmp, "cache"),
             "--out", out, "--batch-size", str(batch_size)]
    if nproc > 1:
        # torchrun gives every rank OMP_NUM_THREADS=1; the single process keeps torch's default.
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *entry]
    else:
        cmd = [sys.executable, *entry]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else None
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"extraction failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    ranks = [json.load(open(f"{out}.rank{r}.json")) for r in range(nproc)]
    result = ranks[0]["result"]
    shutil.rmtree(tmp, ignore_errors=True)
    return {
        "processes": nproc, "images": result["computed"], "extract_s": result["seconds"],
        "images_per_s": result["images_per_s"], "wall_s": wall, "wall_images_per_s": result["computed"] / wall,
        "timings": result["timings"], "maxrss_mb": [r["maxrss_mb"] for r in ranks],
        "cpu_ms_per_image": 1000 * sum(r["cpu_s"] for r in ranks) / max(1, result["computed"]),
        "threads": threads, "load_before": load, "load_after": os.getloadavg()[0],
    }


def _line(tag: str, m: dict) -> str:
    t = m["timings"]
    rss = "/".join(f"{x:.0f}" for x in m["maxrss_mb"])
    return (f"{tag:<22} {m['images']:>6} img | extraction {m['images_per_s']:6.1f} img/s ({m['extract_s']:6.1f} s) | "
            f"command {m['wall_s']:6.1f} s | CPU {m['cpu_ms_per_image']:4.0f} ms/img | plan {t['plan']:.2f} s, "
            f"write {t['write']:.2f} s | peak RSS per process {rss} MB | load {m['load_before']:.1f}->{m['load_after']:.1f}")


def finetune(data: str, nproc: int, args, threads: int = 0) -> dict:
    """One fresh ``finetune`` command on ``data`` by ``nproc`` processes (torchrun when > 1).

    ``threads``: OMP_NUM_THREADS per process (0: torchrun's 1 per rank, torch's default alone).
    """
    tmp = tempfile.mkdtemp(prefix="bench-dist-ft-")
    cache = os.path.join(tmp, "cache")
    stage = ["-m", "pipeline", "finetune", "--data", data, "--cache", cache, "--weights", "random",
             "--device", "cpu", "--mode", args.ft_mode, "--epochs", str(args.ft_epochs),
             "--batch-size", str(args.ft_batch_size), "--train-per-class", str(args.ft_per_class),
             "--precision", "fp32", "--no-progress"]
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    env = dict(os.environ, PYTHONPATH=REPO, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *launcher, *stage], cwd=REPO, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"fine-tuning failed:\n{proc.stderr[-3000:]}")
    # The fresh cache holds this one run (its folder name carries the settings hash of --batch-size/--precision).
    run = next(d.path for d in os.scandir(os.path.join(cache, "runs")) if d.is_dir())
    with open(os.path.join(run, "metrics.json")) as fh:
        record = json.load(fh)
    with open(os.path.join(run, "history.json")) as fh:
        last = json.load(fh)["epochs"][-1]
    shutil.rmtree(tmp, ignore_errors=True)
    n_train = record["train_images"]
    return {"processes": nproc, "threads": threads or record["config"]["threads"], "train_images": n_train,
            "world_size": record["world_size"], "last_epoch_train_s": last["train_seconds"],
            "images_per_s": n_train / last["train_seconds"], "epoch_s": last["seconds"], "wall_s": wall,
            "load_before": load, "load_after": os.getloadavg()[0]}


# ---------------------------------------------------------------- (b) synthetic sets

def make_images(root: str, n: int, seed: int = 0) -> None:
    """``n`` small JPEGs (48x40, two colour-coded classes), 80% train / 20% val."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        split = "val" if i % 5 == 4 else "train"
        label = i % 2
        folder = os.path.join(root, split, ("ants", "bees")[label])
        os.makedirs(folder, exist_ok=True)
        base = np.array([200, 60, 40]) if label == 0 else np.array([40, 80, 210])
        pixels = np.clip(base + rng.normal(0, 25, (40, 48, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"img_{i:06d}.jpg"), quality=90)


def subset(pool: str, root: str, n: int) -> None:
    """The first ``n`` images of ``pool`` under ``root`` (hard links: no copy, same bytes)."""
    for i in range(n):
        split = "val" if i % 5 == 4 else "train"
        rel = os.path.join(split, ("ants", "bees")[i % 2], f"img_{i:06d}.jpg")
        os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
        try:
            os.link(os.path.join(pool, rel), os.path.join(root, rel))
        except OSError:
            shutil.copyfile(os.path.join(pool, rel), os.path.join(root, rel))


# ---------------------------------------------------------------- (c) stitching

def _rows_of_rank(m: int, rank: int, world: int, strided: bool) -> range:
    """Rank ``rank``'s rows of ``m``: every world-th (the pipeline's share) or one contiguous block."""
    if strided:
        return range(rank, m, world)
    return range(rank * m // world, (rank + 1) * m // world)


def _synthetic_shards(folder: str, n: int, world: int, strided: bool) -> List[str]:
    """``world`` shards of an ``n``-row cache (train 80%, val 20%)."""
    rng = np.random.default_rng(0)
    settings = {"bench": "stitch"}
    shards = []
    for rank in range(world):
        splits = {}
        for split, m in (("train", n - n // 5), ("val", n // 5)):
            mine = _rows_of_rank(m, rank, world, strided)
            rows = [store.Row(f"{split}/c{i % 2}/img_{i:07d}.jpg", f"{i:040x}", 1000 + i, i,
                              rng.standard_normal(512).astype(np.float32)) for i in mine]
            splits[split] = store.SplitRows(rows, [i % 2 for i in mine])
        path = os.path.join(folder, "cache.h5.shards", f"rank{rank}-of-{world}-bench.h5")
        shards.append(store.write_shard(path, settings, {}, ["c0", "c1"], splits, rank, world, "cache.h5"))
    return shards


def _merge(shards: List[str], path: str) -> None:
    """What rank 0 does: read every shard's rows, write one cache in data-set order."""
    rows: Dict[str, store.Row] = {}
    for shard in shards:
        rows.update(store.read_shard_rows(shard))
    splits = {}
    for split in ("train", "val"):
        ordered = sorted((r for r in rows.values() if r.relpath.startswith(split + "/")), key=lambda r: r.relpath[-15:])
        splits[split] = store.SplitRows(ordered, [int(r.relpath.split("/")[1][1]) for r in ordered])
    store.write_cache(path, {"bench": "stitch"}, {}, ["c0", "c1"], splits)


def _virtual(shards: List[str], path: str, strided: bool) -> None:
    """An h5py virtual data set per data set of each split, mapping each shard to its rows."""
    world = len(shards)
    with h5py.File(shards[0], "r") as first, h5py.File(path, "w") as out:
        for name, value in first.attrs.items():
            out.attrs[name] = value
        out.attrs["format"] = store.FORMAT
        for split in first:
            sizes = []
            for shard in shards:
                with h5py.File(shard, "r") as f:
                    sizes.append(f[split]["features"].shape[0])
            total = sum(sizes)
            group = out.create_group(split)
            for key in first[split].attrs:
                group.attrs[key] = first[split].attrs[key]
            group.attrs["n"], group.attrs["complete"] = total, True
            for name, ds in first[split].items():
                layout = h5py.VirtualLayout((total,) + ds.shape[1:], ds.dtype)
                for rank, shard in enumerate(shards):
                    rel = os.path.relpath(shard, os.path.dirname(os.path.abspath(path)))
                    source = h5py.VirtualSource(rel, f"{split}/{name}", shape=(sizes[rank],) + ds.shape[1:])
                    if strided:
                        layout[rank::world] = source
                    else:
                        start = sum(sizes[:rank])
                        layout[start:start + sizes[rank]] = source
                group.create_virtual_dataset(name, layout)


def _read_all(path: str) -> Dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {split: f[split]["features"][()] for split in f}


def _timed(fn, *a) -> float:
    start = time.perf_counter()
    fn(*a)
    return time.perf_counter() - start


def stitch(n: int, world: int, strided: bool, portability: bool) -> dict:
    folder = tempfile.mkdtemp(prefix="bench-stitch-")
    shards = _synthetic_shards(folder, n, world, strided)
    for shard in shards:
        _read_all(shard)  # page cache warm for both readers
    merged, virtual = os.path.join(folder, "merged.h5"), os.path.join(folder, "cache.h5")
    report = {"rows": n, "shards": world, "strided": strided,
              "merge_create_s": _timed(_merge, shards, merged), "vds_create_s": _timed(_virtual, shards, virtual, strided)}
    report["merge_read_s"] = _timed(_read_all, merged)
    report["vds_read_s"] = _timed(_read_all, virtual)
    report["merge_mb"] = os.path.getsize(merged) / 2 ** 20
    report["vds_mb"] = os.path.getsize(virtual) / 2 ** 20
    expected = _read_all(merged)
    assert all(np.array_equal(expected[s], a) for s, a in _read_all(virtual).items()), "VDS differs from merge"
    if portability:
        # The cache copied alone to another machine or folder; then the shards removed.
        elsewhere = tempfile.mkdtemp(prefix="bench-stitch-copy-")
        for name in (merged, virtual):
            shutil.copy(name, elsewhere)
        report["copied_alone"] = _survives(os.path.join(elsewhere, "merged.h5"), os.path.join(elsewhere, "cache.h5"),
                                           expected)
        shutil.rmtree(os.path.join(folder, "cache.h5.shards"))
        report["shards_deleted"] = _survives(merged, virtual, expected)
        shutil.rmtree(elsewhere, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)
    return report


def _survives(merged: str, virtual: str, expected: Dict[str, np.ndarray]) -> dict:
    """Rows that still read right (the VDS reads its fill value, 0, for a missing source: no error)."""
    out = {}
    for tag, path in (("merge", merged), ("vds", virtual)):
        try:
            got = _read_all(path)
            out[tag] = sum(int((got[s] == expected[s]).all(axis=1).sum()) for s in expected)
        except Exception as exc:  # an error would at least be honest
            out[tag] = f"error: {type(exc).__name__}"
    out["of"] = sum(len(v) for v in expected.values())
    return out


# ---------------------------------------------------------------- driver

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--data", default=None, help="real data set for (a) (default: the hymenoptera set)")
    parser.add_argument("--nproc", type=int, default=2, help="ranks of the distributed runs (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=0, help="0: the pipeline's automatic batch")
    parser.add_argument("--sizes", default="250,500,1000",
                        help="synthetic set sizes for (b); the full run: 2500,5000,10000,20000 (default: %(default)s)")
    parser.add_argument("--max-images", type=int, default=0, help="cap every synthetic size at this (0: no cap)")
    parser.add_argument("--stitch-rows", default="20000", help="cache sizes for (c) (default: %(default)s)")
    parser.add_argument("--skip-real", action="store_true")
    parser.add_argument("--skip-scaling", action="store_true")
    parser.add_argument("--skip-stitch", action="store_true")
    parser.add_argument("--skip-finetune", action="store_true")
    parser.add_argument("--ft-mode", default="finetune", help="(d) --mode of the fine-tuning runs (default: %(default)s)")
    parser.add_argument("--ft-epochs", type=int, default=2, help="(d) epochs; the last is timed (default: %(default)s)")
    parser.add_argument("--ft-batch-size", type=int, default=16, help="(d) global batch (default: %(default)s)")
    parser.add_argument("--ft-per-class", type=int, default=48,
                        help="(d) train images per class, 0: all (default: %(default)s)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    report = {"cpus": os.cpu_count(), "load_average": os.getloadavg()}
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (shared machine: timings are noisy)")

    if not args.skip_real:
        data = os.path.abspath(args.data or default_data())
        print(f"(a) {data}: one process vs torchrun --nproc_per_node={args.nproc}")
        report["real"] = []
        for n, threads, tag in ((1, 0, "1 process"), (1, 1, "1 process, 1 thread"),
                                (args.nproc, 0, f"{args.nproc} processes")):
            m = extract(data, n, args.batch_size, threads)
            report["real"].append(m)
            print("  " + _line(tag, m), flush=True)

    if not args.skip_scaling:
        sizes = [int(s) for s in args.sizes.split(",") if s]
        if args.max_images:
            sizes = sorted({min(s, args.max_images) for s in sizes})
        tmp = tempfile.mkdtemp(prefix="bench-scaling-")
        start = time.perf_counter()
        make_images(os.path.join(tmp, "pool"), max(sizes))
        print(f"(b) synthetic 48x40 JPEGs ({max(sizes)} made in {time.perf_counter() - start:.0f} s), "
              f"{args.nproc} ranks")
        report["scaling"] = []
        for n in sizes:
            root = os.path.join(tmp, f"set{n}")
            subset(os.path.join(tmp, "pool"), root, n)
            m = extract(root, args.nproc, args.batch_size)
            report["scaling"].append(m)
            print("  " + _line(f"{n} images", m), flush=True)
            shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)

    if not args.skip_stitch:
        print(f"(c) stitching {args.nproc} shards: merge (copy, what the pipeline does) vs h5py virtual data set")
        report["stitch"] = []
        for i, n in enumerate(int(s) for s in args.stitch_rows.split(",") if s):
            for strided in (True, False):
                r = stitch(n, args.nproc, strided, portability=i == 0 and strided)
                report["stitch"].append(r)
                how = "rank r: every n-th row (the pipeline's share)" if strided else "rank r: one block of rows"
                print(f"  {n:>7} rows, {how}\n"
                      f"          create: merge {r['merge_create_s']:.2f} s, VDS {r['vds_create_s']:.3f} s | "
                      f"full read: merge {r['merge_read_s']:.3f} s, VDS {r['vds_read_s']:.3f} s | "
                      f"file: merge {r['merge_mb']:.1f} MB, VDS {r['vds_mb']:.2f} MB (+ the shards)", flush=True)
                for case in ("copied_alone", "shards_deleted"):
                    if case in r:
                        c = r[case]
                        silent = " (the rest read as zeros, no error)" if isinstance(c["vds"], int) and c["vds"] < c["of"] else ""
                        print(f"          {case.replace('_', ' ')}: rows that read right: merge {c['merge']}/{c['of']}, "
                              f"VDS {c['vds']}/{c['of']}{silent}")
    if not args.skip_finetune:
        data = os.path.abspath(args.data or default_data())
        print(f"(d) {data}: finetune --mode {args.ft_mode}, global batch {args.ft_batch_size}, "
              f"{args.ft_per_class or 'all'} train images per class, one process vs torchrun --nproc_per_node={args.nproc}")
        report["finetune"] = []
        for n, threads, tag in ((1, 0, "1 process"), (1, 1, "1 process, 1 thread"),
                                (args.nproc, 0, f"{args.nproc} processes")):
            m = finetune(data, n, args, threads)
            report["finetune"].append(m)
            print(f"  {tag:<22} {m['train_images']:>4} train img | last epoch: train {m['images_per_s']:5.2f} img/s "
                  f"({m['last_epoch_train_s']:.1f} s), with val {m['epoch_s']:.1f} s | command {m['wall_s']:.1f} s | "
                  f"{m['threads']} thread(s) per process | load {m['load_before']:.1f}->{m['load_after']:.1f}", flush=True)
        base = report["finetune"][1]["images_per_s"]
        top = report["finetune"][2]
        report["finetune_scaling"] = {"speedup_vs_1_thread": top["images_per_s"] / base,
                                      "efficiency": top["images_per_s"] / base / args.nproc,
                                      "speedup_vs_default_threads": top["images_per_s"] / report["finetune"][0]["images_per_s"]}
        sc = report["finetune_scaling"]
        print(f"  {args.nproc} ranks: {sc['speedup_vs_1_thread']:.2f}x one single-threaded process (scaling efficiency "
              f"{sc['efficiency']:.0%}), {sc['speedup_vs_default_threads']:.2f}x one process with torch's default threads")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)


if __name__ == "__main__":
    main()
