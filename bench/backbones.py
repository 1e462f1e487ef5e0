"""Extraction speed of each backbone against its compute floor, side by side in one run.

    python bench/backbones.py [--data DIR] [--backbones "resnet18 efficientnet_lite0"] [--rounds 2]

For every backbone: the ``features`` stage's images/s over the data set (decoding, transforms,
forward, HDF5 write; ``--rebuild`` each round) against the bare forward of the same extractor
at the same precision, batch and threads on random tensors (``common.forward_floor``), in
alternating rounds, best round of each side (noise only slows a run). The weights are random:
speed does not depend on their values, and it keeps the run offline for every backbone.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import default_data, forward_floor, machine, pin_threads, subset_folder  # noqa: E402
from pipeline import backbones  # noqa: E402
from pipeline.config import FeaturesConfig  # noqa: E402
from pipeline.features import extraction, stage as features  # noqa: E402
from pipeline.text import format_table  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=None, help="ImageFolder data set (default: $BENCH_DATA or $PIPELINE_TEST_DATA)")
    p.add_argument("--backbones", default="resnet18 efficientnet_lite0", help="space-separated --backbone values")
    p.add_argument("--subset", type=int, default=0, help="images per class and split (0: all)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of each side (>= 2)")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch's default)")
    p.add_argument("--precision", default="auto", help="auto | fp32 | bf16 | fp16")
    p.add_argument("--json", default="", help="also write the figures here")
    return p


def measure(data_dir: str, name: str, precision: str, rounds: int) -> dict:
    device = torch.device("cpu")
    chosen = backbones.choose_precision(precision, device)
    weights = extraction.load_weights("random", 0, name)
    batch = extraction.default_batch_size(device)
    extract, floor, n = [], [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(rounds):
            res = features.run(FeaturesConfig(data=data_dir, cache=tmp, backbone=name, weights="random",
                                              device="cpu", precision=chosen, progress=False, rebuild=True))
            extract.append(res.images_per_s)
            n = res.computed
            floor.append(forward_floor(weights, device, chosen, batch, n))
    return {"backbone": name, "feature_dim": backbones.feature_dim(name), "precision": chosen, "images": n,
            "batch": batch, "extraction_images_per_s": max(extract), "floor_images_per_s": max(floor),
            "ratio": max(extract) / max(floor)}


def main(args) -> int:
    data_dir = args.data or default_data()
    threads = pin_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if args.subset:
            data_dir = subset_folder(data_dir, args.subset, tmp)
        rows = [measure(data_dir, name, args.precision, max(2, args.rounds)) for name in args.backbones.split()]
    print(f"machine: {json.dumps(machine())}; threads {threads}; data {data_dir}")
    print(format_table(("backbone", "dim", "precision", "images", "extraction img/s", "bare forward img/s",
                        "extraction / floor"),
                       [(r["backbone"], str(r["feature_dim"]), r["precision"], str(r["images"]),
                         f"{r['extraction_images_per_s']:.1f}", f"{r['floor_images_per_s']:.1f}",
                         f"{r['ratio']:.2f}x") for r in rows]))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"machine": machine(), "threads": threads, "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
