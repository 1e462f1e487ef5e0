"""Every benchmark of the project in one run: one table of ratios, each against its target,
written to reports/bench.json as well.

    python bench/run.py [--data DIR] [--quick] [--threads N] [--rounds R] [--json reports/bench.json]

(`make bench` runs this; `make bench QUICK=1` the quick mode: a 20-image-per-class subset, a few
minutes on 2 cores.)

Each figure is a ratio measured side by side in this one run, because the machines this runs
on are shared and their absolute speed drifts:

- extraction / its true floor: in-process extraction images/s against the decode + forward
  floor measured in the same run (>= 0.9): the bare forward of the same extractor at the same
  precision, batch and threads on random tensors, plus the PIL decode + transform cost of
  every image (one core's seconds, as the loader decodes) spread over the allowed cores, which
  on a CPU the decoding shares with the forward (on CUDA: the slower of the forward and the
  loader processes' decode rate). The bare forward alone is shown beside it, untargeted;
- `--decode gpu` extraction against the bare forward (CUDA only; skipped with the reason on CPU);
- end-to-end epoch / its floor: one `finetune` epoch (train + val, checkpoint saves excluded)
  against forward + backward + SGD step on random tensors at the training batch plus the val
  forward at the val batch, same precision and threads (<= 1.15);
- the default head suite with cross-validation on the cache (<= 3 s);
- the fixed cost of the commands: a no-op `features` on an up-to-date cache (<= 2 s), and the
  fast path from an empty cache as a user pays it (`features`, `heads`, `compare` as
  commands) minus its extraction time (<= 8 s);
- the tutorial's loops (bench/tutorial.py), measured ONCE per run and shared by every ratio
  that uses them, at the same thread count, warmed up, in >= 2 rounds alternating with this
  project's side: the fast path's commands against the tutorial's 25-epoch frozen-backbone
  loop (extrapolated from the measured epochs), and a `finetune` epoch against the tutorial's;
- `--precision auto` against fp32 on this machine: extraction speed, feature cosine, and how
  many val predictions of a logistic head change;
- ONNX Runtime against torch for the extractor's forward (fp32, and the features' agreement);
- draft JPEG decoding against full decoding on the large JPEGs.

Weights: ImageNet when torch's hub cache already holds them, else random weights, labelled
"not pretrained" (speed does not depend on the weight values). Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import copy
import glob
import json
import os
import statistics
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Dict, List

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (REPO, decode_forward_floor, decode_seconds, default_data, epoch_floor, forward_floor, machine,
                    pin_threads,  # noqa: E402
                    ratio_row, subset_folder)
from pipeline import backbones  # noqa: E402
from pipeline.data import imagefolder as data  # noqa: E402
from pipeline.features import extraction, stage as features, store  # noqa: E402
from pipeline.finetune import stage as finetune  # noqa: E402
from pipeline.config import FeaturesConfig, FinetuneConfig, HeadsConfig  # noqa: E402
from tutorial import run_tutorial  # noqa: E402

TUTORIAL_EPOCHS = 25  # the tutorial's num_epochs, what the cached path replaces


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- one side of each comparison


def commands(data_dir: str, weights: str, workdir: str) -> Dict[str, float]:
    """The fast path as a user runs it, from an empty cache: wall seconds of each command, the
    extraction seconds and images it reports, then a no-op `features` on the up-to-date cache."""
    cache, reports = os.path.join(workdir, "cache"), os.path.join(workdir, "reports")
    common = ["--data", data_dir, "--cache", cache, "--weights", weights]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    steps = [("features", ["features", *common, "--no-progress"]),
             ("heads", ["heads", *common]),
             ("compare", ["compare", "--cache", cache, "--reports", reports, "--data", data_dir]),
             ("features_noop", ["features", *common, "--no-progress"])]
    out: Dict[str, float] = {}
    for name, args in steps:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, env=env,
                              capture_output=True, text=True)
        out[name + "_s"] = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"`python -m pipeline {' '.join(args)}` failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
        if name == "features_noop" and "up to date" not in proc.stdout:
            raise SystemExit(f"the second `features` was not up to date:\n{proc.stdout}")
    path = cache_path(cache)
    meta = store.read_meta(path)
    out["extract_s"] = float(meta["extract_seconds"])
    out["images"] = sum(int(info["n"]) for info in meta["splits"].values())
    out["extract_img_s"] = out["images"] / out["extract_s"]
    out["fast_path_s"] = out["features_s"] + out["heads_s"] + out["compare_s"]
    out["overhead_s"] = out["fast_path_s"] - out["extract_s"]
    out["precision"] = meta["precision"]
    out["cache"] = path
    return out


def cache_path(cache: str) -> str:
    paths = glob.glob(os.path.join(cache, "features", "*.h5"))
    if len(paths) != 1:
        raise SystemExit(f"expected one feature cache under {cache}, found {paths}")
    return paths[0]


def project_epoch(data_dir: str, weights: str, device: str, cache: str, threads: int) -> Dict[str, object]:
    """One `finetune` epoch (mode finetune, the protocol's batch 4) in this process."""
    cfg = FinetuneConfig(data=data_dir, cache=cache, weights=weights, device=device, mode="finetune",
                         epochs=1, progress=False, rebuild=True, threads=threads)
    m = finetune.run(cfg).runs[0].metrics
    return {"epoch_s": m["epoch_seconds"][0], "precision": m["precision"], "threads": m["config"]["threads"],
            "workers": m["config"]["workers"], "batch_size": m["config"]["batch_size"]}


def heads_suite(path: str) -> float:
    """Wall seconds of the default head suite (cross-validation, refit, val metrics, save) in process."""
    from pipeline.heads import stage as heads
    from pipeline.config import HeadsConfig

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        heads.run(HeadsConfig(cache=tmp, features=path, rebuild=True))
        return time.perf_counter() - start


# ---------------------------------------------------------------- precision, ONNX Runtime, draft


def logistic_predictions(path: str) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    xtr, ytr, _, _ = store.read_split(path, "train")
    xva, _, _, _ = store.read_split(path, "val")
    return make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000)).fit(xtr, ytr).predict(xva)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def onnx_extraction(data_dir: str, weights: str, precision: str, fp32_cache: str, rounds: int) -> Dict:
    """`features --engine onnxruntime` (fp32) against `--engine torch` at `precision` (what `auto`
    picks), end to end in this process, alternating, a cold cache each time (the export done
    first, untimed: it happens once per weights); and its features against torch's fp32 ones."""
    from pipeline.features import onnx_engine

    speeds: Dict[str, List[float]] = {"onnxruntime": [], "torch": []}
    path = ""
    with tempfile.TemporaryDirectory() as tmp:
        onnx_engine.export_backbone(backbones.resolve_weights(weights), tmp)
        for r in range(rounds):
            for engine in (("onnxruntime", "torch") if r % 2 == 0 else ("torch", "onnxruntime")):
                res = features.run(FeaturesConfig(
                    data=data_dir, cache=tmp, weights=weights, device="cpu", engine=engine, progress=False,
                    precision="fp32" if engine == "onnxruntime" else precision, rebuild=True))
                speeds[engine].append(res.images_per_s)
                if engine == "onnxruntime":
                    path = res.path
                    diff = 0.0
                    for split in ("train", "val"):
                        a, _, _, _ = store.read_split(fp32_cache, split)
                        b, _, _, _ = store.read_split(path, split)
                        diff = max(diff, float(np.abs(a - b).max()))
    img_s = {k: statistics.median(v) for k, v in speeds.items()}
    return {"img_s": img_s, "ratio_vs_torch_auto": img_s["onnxruntime"] / img_s["torch"],
            "max_abs_diff_vs_torch_fp32": diff, "runs": speeds}


def precision_vs_fp32(data_dir: str, weights: str, device: str, precision: str, rounds: int, keep: str) -> Dict:
    """`--precision auto` against fp32, extracted end to end in this process, alternating, a cold
    cache each time: speed, feature cosine (train and val), and the val predictions of a
    logistic head fitted on each cache that differ. The fp32 cache is kept at ``keep``."""
    speeds: Dict[str, List[float]] = {precision: [], "fp32": []}
    paths: Dict[str, str] = {}
    sides = [precision, "fp32"] if precision != "fp32" else ["fp32"]
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for prec in (sides if r % 2 == 0 else sides[::-1]):
                res = features.run(FeaturesConfig(data=data_dir, cache=os.path.join(tmp, prec), weights=weights,
                                                  device=device, precision=prec, progress=False, rebuild=True))
                speeds[prec].append(res.images_per_s)
                paths[prec] = res.path
        shutil.copy(paths["fp32"], keep)
        if precision == "fp32":
            return {"auto": "fp32", "note": "auto is fp32 on this machine: nothing to compare",
                    "fp32_img_s": statistics.median(speeds["fp32"]), "runs": speeds}
        cos = []
        for split in ("train", "val"):
            a, _, pa, _ = store.read_split(paths[precision], split)
            b, _, pb, _ = store.read_split(paths["fp32"], split)
            assert pa == pb
            cos.append(cosine_rows(a.astype(np.float64), b.astype(np.float64)))
        cos = np.concatenate(cos)
        pred_auto, pred_fp32 = logistic_predictions(paths[precision]), logistic_predictions(paths["fp32"])
    img_s = {k: statistics.median(v) for k, v in speeds.items()}
    return {"auto": precision, "auto_img_s": img_s[precision], "fp32_img_s": img_s["fp32"],
            "speed_ratio": img_s[precision] / img_s["fp32"], "runs": speeds, "cosine_min": float(cos.min()),
            "cosine_mean": float(cos.mean()), "val_predictions_changed": int((pred_auto != pred_fp32).sum()),
            "val_images": int(len(pred_auto))}


def onnx_vs_torch(weights_obj, device: torch.device, precision: str, batch: int, n_images: int,
                  val_images: torch.Tensor, rounds: int) -> Dict:
    """The extractor's forward under ONNX Runtime (fp32, CPU) against torch at fp32 and at the
    precision `auto` picks, alternating; and the largest feature difference on real images."""
    try:
        import onnxruntime as ort
    except ImportError:
        return {"note": "onnxruntime is not installed (pip install -e '.[onnx]')"}
    if device.type != "cpu":
        return {"note": "ONNX Runtime is measured on CPU only"}
    from pipeline.features import onnx_engine

    model = backbones.feature_extractor(weights_obj, device, channels_last=False)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        path = onnx_engine.export_backbone(weights_obj, tmp)  # what --engine onnxruntime runs
        export_s = time.perf_counter() - start
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224), dtype=np.float32)
    steps = max(1, -(-n_images // batch))
    session.run(None, {"image": x})  # warm-up
    speeds: Dict[str, List[float]] = {"onnxruntime": [], "torch_fp32": [], f"torch_{precision}": []}
    for r in range(rounds):
        for side in (list(speeds) if r % 2 == 0 else list(speeds)[::-1]):
            if side == "onnxruntime":
                start = time.perf_counter()
                for _ in range(steps):
                    session.run(None, {"image": x})
                speeds[side].append(steps * batch / (time.perf_counter() - start))
            else:
                speeds[side].append(forward_floor(weights_obj, device, side[len("torch_"):], batch, n_images))
    with torch.inference_mode():
        ref = model(val_images).numpy()
    got = session.run(None, {"image": val_images.numpy()})[0]
    best = {k: statistics.median(v) for k, v in speeds.items()}
    return {"export_s": export_s, "img_s": best, "ratio_vs_torch_fp32": best["onnxruntime"] / best["torch_fp32"],
            "ratio_vs_torch_auto": best["onnxruntime"] / best[f"torch_{precision}"], "auto": precision,
            "max_abs_diff": float(np.abs(got - ref).max()), "images_compared": int(len(ref)),
            "ort": ort.__version__}


def draft_agreement(data_dir: str, weights_obj, device: torch.device) -> Dict:
    """Features of the large JPEGs decoded in draft mode against full decoding."""
    from PIL import Image

    from pipeline.config import PREPROCESS

    ds = data.discover(data_dir)
    big = []
    for items in ds.splits.values():
        for item in items:
            try:
                with Image.open(ds.path(item)) as im:
                    if im.format == "JPEG" and min(im.size) >= 2 * PREPROCESS["resize"]:
                        big.append(item.relpath)
            except Exception:
                continue
    if not big:
        return {"images": 0}
    model = backbones.feature_extractor(weights_obj, device)
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


def val_tensor(data_dir: str, limit: int) -> torch.Tensor:
    ds = data.discover(data_dir)
    rels = [item.relpath for item in ds.splits["val"]][:limit]
    dataset = data.ExtractionDataset(ds.root, rels)
    return torch.stack([dataset[i]["image"] for i in range(len(rels))])


# ---------------------------------------------------------------- the run


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=None, help="ImageFolder data set (default: $BENCH_DATA, $PIPELINE_TEST_DATA, "
                                                "../shared/data/hymenoptera_data or data/hymenoptera_data)")
    p.add_argument("--quick", action="store_true", help="a subset of 20 images per class and split (see --subset)")
    p.add_argument("--subset", type=int, default=0, help="images per class and split (0: all; --quick: 20)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of each side-by-side comparison (>= 2)")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads on every side (0: torch's default)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--skip", default="", help="comma-separated sections to skip: tutorial, precision, onnx, draft")
    p.add_argument("--json", default=os.path.join(REPO, "reports", "bench.json"), help="where to write the figures")
    return p


def main(args) -> int:
    warnings.filterwarnings("ignore", message="This DataLoader will create")  # the tutorial's 4 workers
    if args.rounds < 2:
        raise SystemExit("--rounds must be at least 2 (alternating order)")
    skip = set(filter(None, args.skip.split(",")))
    threads = pin_threads(args.threads)
    device = backbones.choose_device(args.device)
    precision = backbones.choose_precision("auto", device)
    weights = "imagenet" if os.path.isfile(backbones.imagenet_cache_file()) else "random"
    weights_obj = backbones.resolve_weights(weights)
    label = "imagenet" if weights == "imagenet" else "random (not pretrained: ImageNet weights not cached here)"
    subset = args.subset or (20 if args.quick else 0)
    report: Dict[str, object] = {
        "command": "python bench/run.py " + " ".join(sys.argv[1:]), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(), "device": str(device), "precision_auto": precision, "weights": label,
        "threads": threads, "rounds": args.rounds}
    tmp = tempfile.mkdtemp(prefix="bench-")
    data_dir = os.path.abspath(args.data or default_data())
    report["data"] = data_dir
    if subset:
        data_dir = subset_folder(data_dir, subset, tmp)
        report["subset_per_class_split"] = subset
    dataset = data.discover(data_dir)
    ds_counts = {s: len(v) for s, v in dataset.splits.items()}
    report["images"] = ds_counts
    log(f"bench: {ds_counts} images, {device}, auto precision {precision}, {threads} threads, weights {label}")

    # Warm-up, untimed: both in-process sides once on a tiny subset (oneDNN primitives, imports),
    # and every image read once (page cache). The commands are new processes each time: a user
    # pays their start-up on every call, so they are measured cold, as they run.
    warm = subset_folder(data_dir, 2, os.path.join(tmp, "warm"))
    log("bench: warm-up")
    for item in [i for items in dataset.splits.values() for i in items]:
        with open(dataset.path(item), "rb") as fh:
            fh.read()
    if "tutorial" not in skip:
        for mode in ("fixed", "finetune"):
            run_tutorial(warm, copy.deepcopy(weights_obj.state_dict), mode, 1, device, tmp)
    project_epoch(warm, weights, args.device, os.path.join(tmp, "warm-cache"), threads)

    batch = extraction.default_batch_size(device)
    n_images = sum(ds_counts.values())
    sides = ["commands", "extraction_floor", "decode_cost", "project_epoch", "epoch_floor", "heads_suite"]
    relpaths = [item.relpath for items in dataset.splits.values() for item in items]
    if "tutorial" not in skip:
        sides += ["tutorial_fixed", "tutorial_finetune"]
    runs: Dict[str, list] = {side: [] for side in sides}
    for r in range(args.rounds):
        order = sides if r % 2 == 0 else sides[::-1]
        for side in order:
            log(f"bench: round {r + 1}/{args.rounds}: {side}")
            if side == "commands":
                out = commands(data_dir, weights, os.path.join(tmp, f"commands-{r}"))
            elif side == "extraction_floor":
                out = forward_floor(weights_obj, device, precision, batch, n_images)
            elif side == "decode_cost":  # one core's seconds per image, as the loader decodes
                out = decode_seconds(data_dir, relpaths)
            elif side == "project_epoch":
                out = project_epoch(data_dir, weights, args.device, os.path.join(tmp, "project"), threads)
            elif side == "epoch_floor":
                out = epoch_floor(device, precision, ds_counts["train"], ds_counts["val"],
                                  FinetuneConfig.batch_size, batch, num_classes=len(dataset.classes))
            elif side == "heads_suite":
                path = runs["commands"][-1]["cache"] if runs["commands"] else None
                if path is None:  # the commands come later in this round's order
                    path = commands(data_dir, weights, os.path.join(tmp, f"heads-{r}"))["cache"]
                out = heads_suite(path)
            else:
                mode = side[len("tutorial_"):]
                out = run_tutorial(data_dir, copy.deepcopy(weights_obj.state_dict), mode, 1, device, tmp)
            runs[side].append(out)
    report["runs"] = runs

    med = statistics.median
    cmd = {k: med(o[k] for o in runs["commands"]) for k in
           ("features_s", "heads_s", "compare_s", "features_noop_s", "extract_s", "extract_img_s", "fast_path_s",
            "overhead_s")}
    # Against a floor, the best of the rounds on both sides: other work on a shared machine only
    # ever slows a run down, so the fastest round is the closest to what each side costs.
    floor_img_s = max(runs["extraction_floor"])
    decode_s = min(runs["decode_cost"])
    cores = extraction.allowed_cores()
    loader_workers = extraction.default_workers(device, images=n_images)
    true_floor = decode_forward_floor(floor_img_s, decode_s, device, cores, loader_workers)
    report["decode_forward_floor"] = {"forward_img_s": floor_img_s, "decode_ms_per_image_one_core": decode_s * 1e3,
                                      "cores": cores, "loader_workers": loader_workers, "floor_img_s": true_floor}
    epoch_s = min(o["epoch_s"] for o in runs["project_epoch"])
    floor_epoch_s = min(o["epoch_s"] for o in runs["epoch_floor"])
    suite_s = min(runs["heads_suite"])
    rows = [
        ratio_row("extraction (command, cold) / bare forward", cmd["extract_img_s"] / floor_img_s,
                  ">= 0.9" if "precision" in skip else None,
                  f"{cmd['extract_img_s']:.1f} vs {floor_img_s:.1f} images/s, {precision}, batch {batch}; a new "
                  "process: model build, loader start and first-call kernels inside the timer"),
        ratio_row("finetune epoch / its floor", epoch_s / floor_epoch_s, "<= 1.15",
                  f"{epoch_s:.1f} vs {floor_epoch_s:.1f} s (train + val, batch {FinetuneConfig.batch_size}, {precision})"),
        ratio_row(f"head suite ({len(HeadsConfig().heads)} default heads, CV)", suite_s, "<= 3", "seconds, in process, best of rounds", unit="s"),
        ratio_row("no-op `features` command", cmd["features_noop_s"], "<= 2", "seconds, up-to-date cache", unit="s"),
        ratio_row("fast path commands - extraction", cmd["overhead_s"], "<= 8",
                  f"seconds: features + heads + compare {cmd['fast_path_s']:.1f} s, extraction {cmd['extract_s']:.1f} s",
                  unit="s"),
    ]
    report["commands"] = cmd
    if "tutorial" not in skip:
        tut_fixed = [s for o in runs["tutorial_fixed"] for s in o["epoch_seconds"]]
        tut_ft = [s for o in runs["tutorial_finetune"] for s in o["epoch_seconds"]]
        tutorial_25 = TUTORIAL_EPOCHS * statistics.mean(tut_fixed)
        rows.append(ratio_row("tutorial frozen loop x25 / fast path", tutorial_25 / cmd["fast_path_s"], None,
                              f"{tutorial_25:.0f} s ({statistics.mean(tut_fixed):.1f} s/epoch over {len(tut_fixed)} "
                              f"epochs) vs {cmd['fast_path_s']:.1f} s of commands from an empty cache"))
        rows.append(ratio_row("finetune epoch / tutorial's", epoch_s / statistics.mean(tut_ft), None,
                              f"{epoch_s:.1f} vs {statistics.mean(tut_ft):.1f} s/epoch, saves excluded on both sides"))
        report["tutorial"] = {"fixed_epoch_s": tut_fixed, "finetune_epoch_s": tut_ft,
                              "fixed_25_epochs_s": tutorial_25}
    if "precision" not in skip:
        log("bench: fp32 against auto")
        prec = precision_vs_fp32(data_dir, weights, args.device, precision, args.rounds, os.path.join(tmp, "fp32.h5"))
        report["precision"] = prec
        warm = max(prec["runs"][precision])
        rows.insert(1, ratio_row("extraction / bare forward", warm / floor_img_s, None,
                                 f"{warm:.1f} vs {floor_img_s:.1f} images/s, {precision}, batch {batch}, in process "
                                 "like the floor (best of the auto runs below); no decoding in the floor"))
        rows.insert(2, ratio_row("extraction / decode + forward floor", warm / true_floor, ">= 0.9",
                                 _floor_detail(warm, true_floor, floor_img_s, decode_s, device, cores, loader_workers)))
        if "speed_ratio" in prec:
            rows.append(ratio_row(f"extraction {prec['auto']} (auto) / fp32", prec["speed_ratio"], None,
                                  f"{prec['auto_img_s']:.1f} vs {prec['fp32_img_s']:.1f} images/s in process, "
                                  f"alternating; feature cosine min {prec['cosine_min']:.5f}; logistic head val predictions "
                                  f"changed {prec['val_predictions_changed']}/{prec['val_images']}"))
        else:
            rows.append(ratio_row("auto precision / fp32", 1.0, None, prec["note"]))
    rows.append(_gpu_decode_row(data_dir, weights, device, args.rounds, floor_img_s, report))
    vals = None
    if "onnx" not in skip:
        log("bench: ONNX Runtime")
        vals = val_tensor(data_dir, 32)
        onnx = onnx_vs_torch(weights_obj, device, precision, batch, min(n_images, 128), vals, args.rounds)
        report["onnx"] = onnx
        if "img_s" in onnx:
            rows.append(ratio_row("ONNX Runtime fp32 / torch auto forward", onnx["ratio_vs_torch_auto"], None,
                                  f"vs torch fp32 {onnx['ratio_vs_torch_fp32']:.2f}x; max |diff| vs torch fp32 "
                                  f"{onnx['max_abs_diff']:.1e} on {onnx['images_compared']} val images (adopt: >= 1.2x "
                                  "end to end and diff <= 1e-4)"))
            if "precision" not in skip and device.type == "cpu":
                e2e = onnx_extraction(data_dir, weights, precision, os.path.join(tmp, "fp32.h5"), args.rounds)
                onnx["end_to_end"] = e2e
                rows.append(ratio_row("extraction onnxruntime / torch auto", e2e["ratio_vs_torch_auto"], ">= 1.2",
                                      f"{e2e['img_s']['onnxruntime']:.1f} vs {e2e['img_s']['torch']:.1f} images/s end "
                                      f"to end, in process, alternating; max |diff| vs torch fp32 cache "
                                      f"{e2e['max_abs_diff_vs_torch_fp32']:.1e} (adopt as default: >= 1.2x and <= 1e-4)"))
        else:
            rows.append(ratio_row("ONNX Runtime", None, None, onnx["note"]))
    if "draft" not in skip:
        drafted = draft_agreement(data_dir, weights_obj, device)
        report["draft"] = drafted
        if drafted["images"]:
            rows.append(ratio_row("draft JPEG decode / full decode", drafted["decode_s_draft"] / drafted["decode_s_full"],
                                  None, f"{drafted['images']} large JPEGs; feature cosine min {drafted['cosine_min']:.5f}"))
    report["rows"] = rows
    print_table(report)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=1, default=str)
    print(f"written to {args.json}")
    return 0


def _floor_detail(rate: float, floor: float, forward: float, decode_s: float, device: torch.device, cores: int,
                  workers: int) -> str:
    """What the decode + forward floor is made of, and where the extraction's time goes beyond it."""
    per = 1e3 / rate
    if device.type == "cuda":
        return (f"{rate:.1f} vs {floor:.1f} images/s: min(forward {forward:.1f}, {workers} loader processes x "
                f"1/{decode_s * 1e3:.2f} ms decode)")
    fwd_ms, dec_ms = 1e3 / forward, decode_s * 1e3 / cores
    return (f"{rate:.1f} vs {floor:.1f} images/s; per image {per:.2f} ms = forward {fwd_ms:.2f} + decode "
            f"{decode_s * 1e3:.2f} ms of one core / {cores} cores {dec_ms:.2f} + rest {per - fwd_ms - dec_ms:.2f} ms "
            + ("(hand-off, batching, cache writes, cores shared with other work)" if per >= fwd_ms + dec_ms else
               "(negative: the machine's load changed between the measurements)"))


def _gpu_decode_row(data_dir: str, weights: str, device: torch.device, rounds: int, floor_img_s: float,
                    report: Dict) -> Dict:
    """``features --decode gpu`` (nvJPEG) in process against the bare forward; skipped off CUDA."""
    name = "extraction --decode gpu / bare forward"
    if device.type != "cuda":
        return ratio_row(name, None, None, f"skipped: --decode gpu decodes on a CUDA device; this run is on {device}")
    if not extraction.tensor_decode_available():
        return ratio_row(name, None, None, "skipped: torchvision < 0.19 has no batched decode_jpeg with EXIF")
    best = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(rounds):
            res = features.run(FeaturesConfig(data=data_dir, cache=tmp, weights=weights, device=str(device),
                                              decode="gpu", progress=False, rebuild=True))
            best = max(best, res.images_per_s)
    report["gpu_decode_img_s"] = best
    return ratio_row(name, best / floor_img_s, None, f"{best:.1f} vs {floor_img_s:.1f} images/s, in process, "
                     f"best of {rounds} cold caches")


def print_table(report: Dict) -> None:
    m = report["machine"]
    print(f"\n{m['cpu']}, {m['cpus']} CPUs, flags {' '.join(m['cpu_flags']) or '-'}, torch {m['torch']}, "
          f"{report['threads']} threads, {report['device']}, auto precision {report['precision_auto']}")
    print(f"data {report['data']}{' (subset %d/class/split)' % report['subset_per_class_split'] if 'subset_per_class_split' in report else ''}"
          f", {report['images']}, weights {report['weights']}, {report['rounds']} rounds")
    print(f"{'figure':<40} {'value':>8}  {'target':<8} {'':<6} detail")
    for row in report["rows"]:
        value = "-" if row["value"] is None else (f"{row['value']:.2f}" + ("x" if row["unit"] == "x" else " s"))
        status = {True: "met", False: "MISSED", None: ""}[row["met"]]
        print(f"{row['name']:<40} {value:>8}  {row['target'] or '':<8} {status:<6} {row['detail']}")


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
