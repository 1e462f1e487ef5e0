"""Feature-extraction benchmark, measured side by side in one run (these machines are noisy).

    python bench/features.py [--data DIR] [--skip-tutorial] [--json FILE]

Prints: extraction images/s against a bare forward of the same model, precision and batch on
random tensors; the warm-cache rerun time; bf16 against fp32 (speed, feature cosine, whether a
logistic head's val predictions change); draft-mode JPEG decoding against full decoding on
the large images; the tutorial's frozen-backbone loop per epoch (x25) against the cached path.
Uses random weights (no ImageNet download here): speed does not depend on the weight values.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline import backbone, data, features, store  # noqa: E402
from pipeline.config import PREPROCESS, FeaturesConfig  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def default_data() -> str:
    for candidate in (os.environ.get("BENCH_DATA"), os.environ.get("PIPELINE_TEST_DATA"),
                      os.path.join(HERE, "..", "..", "shared", "data", "hymenoptera_data"),
                      os.path.join("data", "hymenoptera_data")):
        if candidate and os.path.isdir(candidate):
            return candidate
    sys.exit("no data set: pass --data DIR")


def bare_forward(weights, device, precision: str, batch: int, n_images: int) -> float:
    """Images/s of the extractor's forward alone on random tensors (no decoding, no I/O)."""
    model = backbone.feature_extractor(weights, device)
    x = torch.randn(batch, 3, PREPROCESS["crop"], PREPROCESS["crop"]).contiguous(memory_format=torch.channels_last)
    x = x.to(device)
    steps = max(1, -(-n_images // batch))
    with torch.inference_mode(), backbone.autocast(device, precision):
        model(x)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def cold_extraction(data_dir: str, precision: str, device: str, **kw):
    cache = tempfile.mkdtemp(prefix="bench-features-")
    cfg = FeaturesConfig(data=data_dir, cache=cache, weights="random", precision=precision, device=device,
                         progress=False, **kw)
    result = features.run(cfg)
    return cfg, result


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def precision_agreement(path: str, weights, device, precision: str, batch: int, limit: int) -> dict:
    """Val images through fp32 and ``precision``: speed, feature cosine, head predictions changed.

    ``limit`` caps the images (0: all): bf16 on a CPU without native bf16 is very slow.
    """
    meta = store.read_meta(path)
    fp32_feats, _, rels, _ = store.read_split(path, "val")
    rels = rels[:limit] if limit else rels
    dataset = data.ExtractionDataset(meta["data_root"], rels)
    images = torch.stack([dataset[i]["image"] for i in range(len(rels))]).contiguous(memory_format=torch.channels_last)
    model = backbone.feature_extractor(weights, device)
    out, speed = {}, {}
    with torch.inference_mode():
        for prec in ("fp32", precision):
            with backbone.autocast(device, prec):
                model(images[:2].to(device))  # warm-up
                start = time.perf_counter()
                out[prec] = torch.cat([model(images[i:i + batch].to(device)).float().cpu()
                                       for i in range(0, len(rels), batch)]).numpy()
            speed[prec] = len(rels) / (time.perf_counter() - start)
    cos = cosine_rows(out["fp32"], out[precision])
    head = fitted_head(path)
    changed = int((head.predict(out["fp32"]) != head.predict(out[precision])).sum())
    return {"images": len(rels), "img_s": speed[precision], "fp32_img_s": speed["fp32"],
            "cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()),
            "head_val_predictions_changed": changed}


def fitted_head(path: str):
    """A logistic head fitted on the cache's fp32 train features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    xtr, ytr, _, _ = store.read_split(path, "train")
    return make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000)).fit(xtr, ytr)


def draft_agreement(data_dir: str, weights, device) -> dict:
    """Features of the large JPEGs decoded in draft mode against full decoding."""
    ds = data.discover(data_dir)
    from PIL import Image

    big = []
    for split in ds.splits.values():
        for item in split:
            try:
                with Image.open(ds.path(item)) as im:
                    if im.format == "JPEG" and min(im.size) >= 2 * PREPROCESS["resize"]:
                        big.append(item.relpath)
            except Exception:
                continue
    if not big:
        return {"images": 0}
    model = backbone.feature_extractor(weights, device)
    out, decode_s = {}, {}
    for draft in (True, False):
        dataset = data.ExtractionDataset(ds.root, big, draft=draft)
        start = time.perf_counter()
        samples = [dataset[i] for i in range(len(big))]
        decode_s[draft] = time.perf_counter() - start
        with torch.inference_mode():
            x = torch.stack([s["image"] for s in samples]).contiguous(memory_format=torch.channels_last)
            out[draft] = model(x.to(device)).float().cpu().numpy()
    cos = cosine_rows(out[True], out[False])
    return {"images": len(big), "cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()),
            "decode_s_draft": decode_s[True], "decode_s_full": decode_s[False]}


def tutorial_frozen_epoch(data_dir: str, weights, device) -> float:
    from tutorial import run_tutorial

    with tempfile.TemporaryDirectory() as tmp:
        return run_tutorial(data_dir, weights.state_dict, "fixed", 1, device, tmp)["epoch_seconds"][0]


def heads_seconds(path: str) -> float:
    """Fit time of the default head suite (cross-validation included) on the cache."""
    try:
        from pipeline import heads
        from pipeline.config import HeadsConfig
    except ImportError:
        start = time.perf_counter()
        fitted_head(path)
        return time.perf_counter() - start
    start = time.perf_counter()
    heads.run(HeadsConfig(features=path, cache=tempfile.mkdtemp(prefix="bench-heads-")))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--skip-tutorial", action="store_true", help="skip the slow tutorial-loop epoch")
    parser.add_argument("--precision-images", type=int, default=None,
                        help="val images for the bf16/fp16 comparison (default: all on CUDA, 64 on CPU)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    data_dir = args.data or default_data()
    device = backbone.choose_device(args.device)
    fast_precision = "bf16" if device.type == "cpu" or torch.cuda.is_bf16_supported() else "fp16"
    report = {"data": os.path.abspath(data_dir), "device": str(device), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    print(f"data {data_dir} | device {device} | torch {torch.__version__} | {torch.get_num_threads()} threads")

    cfg, fp32 = cold_extraction(data_dir, "fp32", args.device)
    weights = backbone.resolve_weights("random")
    batch = cfg.batch_size or features.default_batch_size(device)
    bare32 = bare_forward(weights, device, "fp32", batch, fp32.computed)
    report["fp32"] = {"extract_img_s": fp32.images_per_s, "bare_img_s": bare32,
                      "ratio": fp32.images_per_s / bare32, "images": fp32.computed, "batch": batch}
    print(f"fp32  extraction {fp32.images_per_s:7.1f} img/s | bare forward {bare32:7.1f} img/s | "
          f"ratio {fp32.images_per_s / bare32:.2f} (target >= 0.85) | {fp32.computed} images, batch {batch}")

    start = time.perf_counter()
    warm = features.run(cfg)
    warm_s = time.perf_counter() - start
    cli = [sys.executable, "-m", "pipeline", "features", "--data", data_dir, "--cache", cfg.cache,
           "--weights", "random", "--device", args.device, "--precision", "fp32"]
    start = time.perf_counter()
    subprocess.run(cli, check=True, capture_output=True, cwd=os.path.dirname(HERE))
    warm_cli_s = time.perf_counter() - start
    assert warm.up_to_date
    report["warm_rerun_s"] = warm_s
    report["warm_rerun_cli_s"] = warm_cli_s
    print(f"warm rerun: {warm_s:.2f} s in process (target <= 2 s); {warm_cli_s:.2f} s as a command "
          "(python start-up and `import torch` included)")

    low = precision_agreement(fp32.path, weights, device, fast_precision, batch,
                              args.precision_images or (0 if device.type == "cuda" else 64))
    report[fast_precision] = low
    print(f"{fast_precision}  forward {low['img_s']:7.1f} img/s vs fp32 {low['fp32_img_s']:7.1f} img/s "
          f"({low['img_s'] / low['fp32_img_s']:.2f}x) on {low['images']} val images | feature cosine vs fp32 "
          f"min {low['cosine_min']:.5f} mean {low['cosine_mean']:.5f} | logistic head val predictions "
          f"changed: {low['head_val_predictions_changed']}/{low['images']}")

    drafted = draft_agreement(data_dir, weights, device)
    report["draft"] = drafted
    if drafted["images"]:
        print(f"draft JPEG decoding on {drafted['images']} large JPEGs: feature cosine vs full decode "
              f"min {drafted['cosine_min']:.5f} mean {drafted['cosine_mean']:.5f}; decode+transform "
              f"{drafted['decode_s_draft']:.2f} s vs {drafted['decode_s_full']:.2f} s")

    cached_total = fp32.seconds + heads_seconds(fp32.path)
    report["cached_path_s"] = cached_total
    if not args.skip_tutorial:
        epoch = tutorial_frozen_epoch(data_dir, weights, device)
        report["tutorial_frozen_epoch_s"] = epoch
        report["tutorial_frozen_25_epochs_s"] = 25 * epoch
        report["speedup_cached_vs_tutorial"] = 25 * epoch / cached_total
        print(f"tutorial frozen loop: {epoch:.1f} s/epoch, x25 = {25 * epoch:.0f} s | cached path "
              f"(extraction + head suite) {cached_total:.1f} s | {25 * epoch / cached_total:.1f}x faster (target >= 25x)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)


if __name__ == "__main__":
    main()
