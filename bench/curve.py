"""Benchmark the heads' data-size curve (what `make compare` runs by default).

    python bench/curve.py --features cache/features/hymenoptera_data-<key>.h5
    python bench/curve.py --features FILE --heads logistic,ridge --subsets 5 --repeat 3

Fits the default head suite on every k = 1, 2, 4, ... (5 seeded subsets per k, CV inside
each subset) exactly as ``compare`` does (``pipeline.compare.curve.heads_curve``), and prints the
process time (this process's CPU time: the measure that a shared machine disturbs least;
the curve is single-threaded) and the wall time of each repeat, and the issue's target
(the whole curve on the tutorial's data under 30 s on 2 cores).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pipeline.compare import curve  # noqa: E402
from pipeline.features import store  # noqa: E402
from pipeline.config import HeadsConfig  # noqa: E402

TARGET_SECONDS = 30.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--features", required=True, help="a feature cache (cache/features/*.h5)")
    p.add_argument("--heads", default=",".join(HeadsConfig().heads), help="heads, comma list")
    p.add_argument("--subsets", type=int, default=5, help="seeded subsets per k")
    p.add_argument("--repeat", type=int, default=3, help="timed repeats")
    args = p.parse_args()
    X_tr, y_tr, _, _ = store.read_split(args.features, "train")
    X_va, y_va, _, _ = store.read_split(args.features, "val")
    heads = [h for h in args.heads.split(",") if h]
    print(f"curve on {args.features}: {len(y_tr)} train / {len(y_va)} val rows, heads {', '.join(heads)}, "
          f"{args.subsets} subsets per k, cpu count {os.cpu_count()}, load {os.getloadavg()[0]:.1f}")
    best = None
    for i in range(args.repeat):
        wall = time.perf_counter()
        result = curve.heads_curve(X_tr, y_tr, X_va, y_va, heads, n_subsets=args.subsets)
        wall = time.perf_counter() - wall
        best = result.seconds if best is None else min(best, result.seconds)
        print(f"  repeat {i + 1}: process time {result.seconds:.2f} s, wall {wall:.2f} s, k = {result.ks}")
    print(f"best process time {best:.2f} s: target < {TARGET_SECONDS:.0f} s "
          f"{'met' if best < TARGET_SECONDS else 'NOT met'}")


if __name__ == "__main__":
    main()
