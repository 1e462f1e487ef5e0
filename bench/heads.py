"""Benchmark the heads stage: the default suite with CV on a real feature cache, and the
out-of-core SGD path's peak memory on a synthetic cache of many rows.

    python bench/heads.py --features cache/features/hymenoptera_data-<key>.h5
    python bench/heads.py --data DIR --weights random          # the cache `features` made
    python bench/heads.py --features FILE --ooc-rows 0         # skip the out-of-core part

The suite is fitted into a temporary cache folder (your saved heads are not touched) with
``rebuild``, ``--repeats`` times; the table shows the fastest run and the median. The
out-of-core part writes a ``ROWS x 512`` float32 cache to a temporary file (about 1 GiB for
the default 500k rows) and trains ``sgd_log`` out-of-core in a child process, which reports
its peak resident memory and the peak of Python/NumPy allocations.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--features", default="", help="feature cache file (default: resolve from --data etc.)")
    p.add_argument("--data", default=os.environ.get("BENCH_DATA", ""), help="data folder, to resolve the cache")
    p.add_argument("--cache", default="cache", help="cache folder, to resolve the cache")
    p.add_argument("--weights", default="imagenet", help="weights, to resolve the cache")
    p.add_argument("--repeats", type=int, default=3, help="suite runs; the fastest and the median are shown")
    p.add_argument("--jobs", type=int, default=1, help="CV folds in parallel threads")
    p.add_argument("--ooc-rows", type=int, default=500_000, help="rows of the synthetic out-of-core cache; 0 skips it")
    p.add_argument("--ooc-epochs", type=int, default=1, help="out-of-core passes over the synthetic cache")
    p.add_argument("--chunk-rows", type=int, default=4096, help="rows per partial_fit step")
    p.add_argument("--json", default="", help="also write the figures to this JSON file")
    return p


def bench_suite(args) -> dict:
    from pipeline import heads
    from pipeline.config import HeadsConfig

    path = args.features or heads.features_path(HeadsConfig(data=args.data or HeadsConfig.data, cache=args.cache,
                                                            weights=args.weights))
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            wall, cpu = time.perf_counter(), time.process_time()
            result = heads.run(HeadsConfig(cache=tmp, features=path, rebuild=True, jobs=args.jobs))
            runs.append((time.perf_counter() - wall, time.process_time() - cpu, result))
    best = min(runs, key=lambda r: r[0])
    return {"features": path, "pretrained": best[2].pretrained, "weights_id": best[2].weights_id,
            "suite_seconds_best": best[0], "suite_seconds_median": statistics.median(r[0] for r in runs),
            "suite_cpu_seconds_best": min(r[1] for r in runs), "repeats": args.repeats,
            "heads": [{"name": r.name, "fit_seconds": r.doc["fit_seconds"], "cv_seconds": r.doc["cv"]["seconds"],
                       "cv_fits": len(r.doc["cv"]["grid"]) * r.doc["cv"]["folds"],
                       "chosen": r.doc["cv"]["best"], "val_accuracy": r.doc["metrics"]["accuracy"],
                       "predict_us_per_image": r.doc["predict_us_per_image"]} for r in best[2].rows]}


def write_synthetic_cache(path: str, rows: int, val_rows: int = 2000, dim: int = 512, block: int = 50_000) -> None:
    """A cache in pipeline.store's layout (see its docstring), written block by block so the
    generator itself stays small. Rows are sorted by class, like a real ImageFolder cache."""
    import h5py
    import numpy as np

    from pipeline import store

    rng = np.random.default_rng(0)
    means = rng.normal(0.0, 0.05, (2, dim)).astype(np.float32)
    text = h5py.string_dtype("utf-8")
    with h5py.File(path, "w") as f:
        meta = {"format": store.FORMAT, "format_version": store.FORMAT_VERSION, "backbone": "resnet18",
                "weights_id": "synthetic", "weights_sha256": "0" * 64, "pretrained": False, "precision": "fp32",
                "weights": json.dumps({"kind": "random", "seed": 0, "sha256": "0" * 64}),
                "data_root": "/synthetic", "classes": json.dumps(["a", "b"]), "versions": json.dumps({}),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "settings": "{}", "settings_key": "synthetic",
                "content_key": f"synthetic-{rows}", "extract_seconds": 0.0, "extract_device": "none",
                "transform": json.dumps({})}
        f.attrs.update(meta)
        for split, n in (("train", rows), ("val", val_rows)):
            g = f.create_group(split)
            feats = g.create_dataset("features", (n, dim), np.float32, chunks=(min(n, 1024), dim))
            labels = (np.arange(n) >= n // 2).astype(np.int64)
            g.create_dataset("labels", data=labels)
            for start in range(0, n, block):
                stop = min(n, start + block)
                feats[start:stop] = means[labels[start:stop]] + rng.standard_normal((stop - start, dim), np.float32)
            g.create_dataset("paths", data=[f"{split}/{i}.jpg" for i in range(n)], dtype=text)
            g.create_dataset("sha1", data=[""] * n, dtype=text)
            for name in ("size", "mtime_ns"):
                g.create_dataset(name, data=np.zeros(n, np.int64))
            g.attrs.update({"n": n, "complete": True, "skipped": "[]"})


_CHILD = r"""
import json, os, resource, sys, time, tempfile, tracemalloc
from pipeline import heads
from pipeline.config import HeadsConfig


def status(field):  # kB from /proc/self/status (Linux); VmHWM is this process image's peak RSS
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


path, chunk, epochs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
before = status("VmRSS")
try:  # reset the peak to the current RSS, so the peak below is the run's own
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
except OSError:
    pass
tracemalloc.start()
t = time.perf_counter()
with tempfile.TemporaryDirectory() as tmp:
    row = heads.run(HeadsConfig(cache=tmp, features=path, heads=("sgd_log",), out_of_core=True,
                                chunk_rows=chunk, epochs=epochs)).rows[0]
seconds = time.perf_counter() - t
peak_traced = tracemalloc.get_traced_memory()[1]
print(json.dumps({"seconds": seconds, "rss_before_kib": before, "rss_peak_kib": status("VmHWM"),
                  "traced_peak_bytes": peak_traced, "val_accuracy": row.doc["metrics"]["accuracy"],
                  "chosen": row.doc["cv"]["best"]}))
"""


def bench_out_of_core(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "synthetic.h5")
        t = time.perf_counter()
        write_synthetic_cache(path, args.ooc_rows)
        written = time.perf_counter() - t
        size = os.path.getsize(path)
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        out = subprocess.run([sys.executable, "-c", _CHILD, path, str(args.chunk_rows), str(args.ooc_epochs)],
                             capture_output=True, text=True, env=env, check=True)
    child = json.loads(out.stdout.strip().splitlines()[-1])
    return {"rows": args.ooc_rows, "file_bytes": size, "train_features_bytes": args.ooc_rows * 512 * 4,
            "write_seconds": written, "chunk_rows": args.chunk_rows, "epochs": args.ooc_epochs, **child}


def main(args) -> int:
    from pipeline.errors import UserError

    try:
        suite = bench_suite(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    label = "" if suite["pretrained"] else " (not pretrained: random weights)"
    print(f"heads suite on {suite['features']}{label}")
    print(f"  {'head':<11} {'fit s':>6} {'cv s':>6} {'cv fits':>7}  {'chosen':<16} {'val acc':>7} {'µs/img':>7}")
    for h in suite["heads"]:
        chosen = ", ".join(f"{k}={v:.3g}" for k, v in h["chosen"].items())
        print(f"  {h['name']:<11} {h['fit_seconds']:6.3f} {h['cv_seconds']:6.3f} {h['cv_fits']:7d}  {chosen:<16} "
              f"{h['val_accuracy']:7.3f} {h['predict_us_per_image']:7.2f}")
    print(f"  whole suite (read cache, CV, refit, val metrics, save): best {suite['suite_seconds_best']:.2f} s, "
          f"median {suite['suite_seconds_median']:.2f} s of {suite['repeats']} (CPU {suite['suite_cpu_seconds_best']:.2f} s); "
          f"target <= 3 s: {'met' if suite['suite_seconds_best'] <= 3.0 else 'MISSED'}")
    results = {"suite": suite}
    if args.ooc_rows > 0:
        ooc = bench_out_of_core(args)
        results["out_of_core"] = ooc
        peak = (ooc["rss_peak_kib"] - ooc["rss_before_kib"]) / 1024
        print(f"out-of-core sgd_log on a synthetic {ooc['rows']:,} x 512 cache ({ooc['file_bytes'] / 2**20:.0f} MiB on disk, "
              f"{ooc['train_features_bytes'] / 2**20:.0f} MiB of train features)")
        print(f"  {ooc['seconds']:.1f} s for {ooc['epochs']} epoch(s) of chunks of {ooc['chunk_rows']} rows; peak RSS "
              f"{ooc['rss_peak_kib'] / 1024:.0f} MiB ({peak:+.0f} MiB over the process after imports), peak "
              f"Python/NumPy allocations {ooc['traced_peak_bytes'] / 2**20:.1f} MiB; val accuracy "
              f"{ooc['val_accuracy']:.3f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
