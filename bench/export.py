"""Benchmark export: time and size of one export, and ONNX Runtime images/s against ``predict --head``.

    python bench/export.py --cache cache --head logistic            # images: the head's val set
    python bench/export.py --cache cache --head ridge --images DIR --repeats 5 --threads 2

The export goes to a temporary folder (``cache/export`` is not touched); its time includes
the check on val images. Then the same image files are classified end to end (decode,
resize, crop, network, head) by ``predict --model`` (the exported file on ONNX Runtime) and
by ``predict --head`` (PyTorch backbone + the joblib head, features computed as for new
images: the feature cache is not consulted), alternately, ``--repeats``
times each, with the same number of threads, each call starting cold as a new command would
(ONNX Runtime session created, PyTorch network rebuilt, no memoised features); the table gives the median and best wall time,
images/s of the median, and whether the two agree on every image's class.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--cache", default="cache", help="cache folder holding heads/ (and the features they name)")
    p.add_argument("--head", default="logistic", help="the head to export and compare")
    p.add_argument("--images", default="", help="image folder to classify (default: the head's data root's val/)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each way; median and best are shown")
    p.add_argument("--threads", type=int, default=0, help="threads for both runtimes (0: every core)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass, both ways")
    p.add_argument("--json", default="", help="also write the figures to this JSON file")
    return p


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    import torch

    from pipeline.export import stage as export, client, predict
    from pipeline.features import extraction
    from pipeline.heads import stage as heads
    from pipeline.data import images as pipeline_images
    from pipeline.config import ExportConfig, PredictConfig

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    head = heads.load_head(predict.resolve_head(args.head, args.cache))
    images = args.images or os.path.join(head.record.data_root, "val")
    out = {"head": head.name, "pretrained": head.record.weights.pretrained, "threads": threads,
           "images_dir": images, "load_average": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        started = time.perf_counter()
        result = export.run(ExportConfig(head=args.head, cache=args.cache, out=path))
        out.update(export_seconds=time.perf_counter() - started, size_bytes=result.doc["size_bytes"],
                   max_abs_diff_probabilities=result.doc["verification"]["max_abs_diff_probabilities"],
                   max_abs_diff_logits=result.doc["verification"]["max_abs_diff_logits"],
                   checked_images=result.doc["verification"]["images"])
        # The head by its sidecar path and an empty --cache: features are computed as for new
        # images, not read from the feature cache (which holds the val images).
        empty = os.path.join(tmp, "empty-cache")
        os.makedirs(empty)
        head_cfg = PredictConfig(head=predict.resolve_head(args.head, args.cache), cache=empty, inputs=(images,),
                                 device="cpu", batch_size=args.batch_size)

        def by_model():  # what predict --model does, with the thread count set
            model = client.OnnxClassifier(path, device="cpu", threads=threads)
            paths = pipeline_images.collect_images([images])
            ok, logits, proba, _errors = model.classify(paths, args.batch_size)
            pred = logits.argmax(1)
            return {paths[i]: (model.classes[int(c)], None if proba is None else float(proba[row, c]))
                    for row, (i, c) in enumerate(zip(ok, pred))}

        def by_head():
            extraction.forget_weights()  # like a fresh `predict --head`: weights read and checked again
            return {p["path"]: (p["class"], p["probability"]) for p in predict.run(head_cfg).predictions}

        ways = {"predict --model (ONNX Runtime)": by_model, "predict --head (PyTorch + joblib)": by_head}
        times = {name: [] for name in ways}
        classes = {}
        for _ in range(args.repeats):
            for name, way in ways.items():
                started = time.perf_counter()
                classes[name] = way()
                times[name].append(time.perf_counter() - started)
    onnx_out, head_out = classes.values()
    n = len(onnx_out)
    out["images"] = n
    out["class_disagreements"] = sum(onnx_out[p][0] != head_out[p][0] for p in onnx_out)
    diffs = [abs(onnx_out[p][1] - head_out[p][1]) for p in onnx_out
             if onnx_out[p][1] is not None and onnx_out[p][0] == head_out[p][0]]
    out["max_abs_diff_probability_vs_head"] = max(diffs) if diffs else None
    out["head_precision"] = head.record.features.precision
    out["ways"] = {name: {"median_s": statistics.median(t), "best_s": min(t), "images_per_s": n / statistics.median(t)}
                   for name, t in times.items()}
    (a, ta), (b, tb) = out["ways"].items()
    out["speedup_onnx_vs_head"] = ta["images_per_s"] / tb["images_per_s"]
    label = "" if out["pretrained"] else " (random weights, not pretrained)"
    print(f"export of head {out['head']}{label}: {out['export_seconds']:.1f} s (incl. the check on "
          f"{out['checked_images']} val images; max |Δ probability| {out['max_abs_diff_probabilities']}), "
          f"{out['size_bytes'] / 1e6:.1f} MB")
    print(f"{n} images from {images}, {threads} thread(s), load average {out['load_average']:.1f} at start, "
          f"{args.repeats} alternating runs each, end to end (decode to class)")
    print(f"  {'way':<36} {'median s':>9} {'best s':>8} {'images/s':>9}")
    for name, t in out["ways"].items():
        print(f"  {name:<36} {t['median_s']:>9.2f} {t['best_s']:>8.2f} {t['images_per_s']:>9.1f}")
    print(f"  ONNX Runtime / PyTorch images/s: {out['speedup_onnx_vs_head']:.2f}x")
    print(f"  agreement with predict --head ({out['head_precision']} features, the exported model is fp32): "
          f"{n - out['class_disagreements']}/{n} classes, max |Δ probability| {out['max_abs_diff_probability_vs_head']}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
