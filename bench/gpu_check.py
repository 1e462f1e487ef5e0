"""The whole pipeline on a GPU, in one prepared run (< 10 minutes on one modern GPU), one table.

    python bench/gpu_check.py [--data DIR] [--device cuda] [--json FILE]
    python bench/gpu_check.py --dry-run        # the same code path on CPU, tiny sizes (seconds)

Rows, each measured side by side in this one run:

- extraction images/s from JPEG files (the features stage, fp32 and bf16) against the bare
  forward of the same engine on in-memory tensors at the same batch size (its floor);
- bf16 against fp32 features of the same images: cosine per image (min, mean);
- a 2-rank NCCL extraction (``torchrun``, where 2 GPUs are visible) against 1 rank: same
  cache key, features equal up to batching noise;
- one fine-tuning epoch against its floor (forward + backward + step of the same network,
  batch size and precision on in-memory tensors: no decoding, no augmentation);
- resume: 1 epoch + 1 resumed epoch against 2 straight epochs (parameters bit-equal?), next to
  two straight runs (the noise floor of the device's own non-determinism);
- a 2-GPU DistributedDataParallel fine-tuning epoch (``torchrun``, NCCL, SyncBatchNorm) against
  1 GPU at the same global batch: train images/s, scaling efficiency, first-epoch train loss.
  It runs where 2 GPUs are visible and says "skipped" where not (gloo on CPU in a dry run).

Weights are random (nothing is downloaded; speed does not depend on weight values), so no
accuracy here is a transfer-learning result. Without ``--data`` a synthetic ImageFolder of
JPEGs the size of hymenoptera's (500x375) is written to a temporary folder first.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402  (bench/common.py: the compute floors every benchmark shares)

from pipeline import backbones  # noqa: E402
from pipeline import config  # noqa: E402
from pipeline.features import extraction, stage as features, store  # noqa: E402
from pipeline.finetune import stage as finetune  # noqa: E402
from pipeline.config import FeaturesConfig, FinetuneConfig  # noqa: E402
from pipeline.text import format_table  # noqa: E402

FULL = {"train": 600, "val": 200, "size": (500, 375), "epochs": 2, "bare_images": 2048}
DRY = {"train": 6, "val": 3, "size": (48, 40), "epochs": 2, "bare_images": 16,
       "preprocess": {"resize": 40, "crop": 32}}


# --------------------------------------------------------------------------- set-up


def synthetic_data(root: str, per_class_train: int, per_class_val: int, size) -> str:
    """Two classes of noisy JPEGs whose colour depends on the class (so heads can learn)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    w, h = size
    for split, n in (("train", per_class_train), ("val", per_class_val)):
        for label, name in enumerate(("ants", "bees")):
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            base = np.array([200, 60, 40]) if label == 0 else np.array([40, 80, 210])
            for i in range(n):
                pixels = np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(os.path.join(folder, f"img_{i:04d}.jpg"), quality=90)
    return root


def apply_sizes(dry_run: bool) -> None:
    """Tiny crops in a dry run (the same code path, a fraction of the arithmetic)."""
    if dry_run:
        config.PREPROCESS.update(DRY["preprocess"])


def timed(device: torch.device, fn):
    extraction.sync(device)
    start = time.perf_counter()
    out = fn()
    extraction.sync(device)
    return out, time.perf_counter() - start


# --------------------------------------------------------------------------- checks


def bare_forward(weights, device: torch.device, precision: str, batch: int, n_images: int) -> float:
    """Images/s of the engine's forward alone, on in-memory tensors (pinned on CUDA)."""
    engine = extraction.Extractor(weights, device, precision, batch_size=batch, workers=0)
    crop = config.PREPROCESS["crop"]
    x = torch.randn(batch, 3, crop, crop)
    if device.type == "cuda":
        x = x.pin_memory()
    engine.forward(x)  # warm-up: kernels chosen, memory allocated
    steps = max(1, -(-n_images // batch))
    _, seconds = timed(device, lambda: [engine.forward(x) for _ in range(steps)])
    return steps * batch / seconds


def extract(data_dir: str, cache: str, device: str, precision: str, batch_size: int):
    cfg = FeaturesConfig(data=data_dir, cache=cache, weights="random", device=device, precision=precision,
                         batch_size=batch_size, progress=False, rebuild=True)
    result = features.run(cfg)
    return result, result.computed / result.timings["extract"]


def agreement(a_path: str, b_path: str) -> dict:
    """Cosine per image between two caches of the same images (rows matched by path)."""
    cos, diff = [], 0.0
    for split in ("train", "val"):
        xa, _, pa, _ = store.read_split(a_path, split)
        xb, _, pb, _ = store.read_split(b_path, split)
        order = {p: i for i, p in enumerate(pb)}
        xb = xb[[order[p] for p in pa]]
        cos.append((xa * xb).sum(1) / (np.linalg.norm(xa, axis=1) * np.linalg.norm(xb, axis=1)))
        diff = max(diff, float(np.abs(xa - xb).max()))
    c = np.concatenate(cos)
    return {"cos_min": float(c.min()), "cos_mean": float(c.mean()), "max_abs_diff": diff}


def two_ranks(data_dir: str, cache: str, device: str, batch_size: int, dry_run: bool) -> subprocess.CompletedProcess:
    """This script's ``_features`` entry under ``torchrun --nproc_per_node=2`` (NCCL on 2 GPUs, gloo on CPU)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.abspath(__file__), "_features", "--data", data_dir, "--cache", cache, "--device", device,
           "--batch-size", str(batch_size)] + (["--dry-run"] if dry_run else [])
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1" if dry_run else "4"))
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def epoch_floor(device: torch.device, precision: str, n_train: int, n_val: int, batch: int, threads: int) -> float:
    """Seconds of one epoch's arithmetic alone (``bench/common.epoch_floor``: train steps on n_train,
    val forward on n_val, in memory), at the run's own intra-op thread count.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        val_batch = max(batch, extraction.default_batch_size(device))  # finetune's val batch
        return common.epoch_floor(device, precision, n_train, n_val, batch, val_batch)["epoch_s"]
    finally:
        torch.set_num_threads(previous)


def finetune_run(data_dir: str, cache: str, device: str, precision: str, epochs: int,
                 workers: int = -1) -> finetune.RunResult:
    cfg = FinetuneConfig(data=data_dir, cache=cache, weights="random", device=device, precision=precision,
                         mode="finetune", epochs=epochs, workers=workers, progress=False)
    return finetune.run(cfg).runs[0]


DDP_BATCH = {"full": 32, "dry": 4}  # the global batch of the DDP row (per GPU: half)


def ddp_run(data_dir: str, cache: str, device: str, precision: str, dry_run: bool) -> subprocess.CompletedProcess:
    """This script's ``_finetune`` entry under ``torchrun --nproc_per_node=2``: one epoch of one run."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.abspath(__file__), "_finetune", "--data", data_dir, "--cache", cache, "--device", device,
           "--precision", precision] + (["--dry-run"] if dry_run else [])
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1" if dry_run else "4"))
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def ddp_config(data_dir: str, cache: str, device: str, precision: str, dry_run: bool) -> FinetuneConfig:
    return FinetuneConfig(data=data_dir, cache=cache, weights="random", device=device, precision=precision,
                          mode="finetune", epochs=1, batch_size=DDP_BATCH["dry" if dry_run else "full"],
                          progress=False)


def max_param_diff(a_dir: str, b_dir: str) -> float:
    a = torch.load(os.path.join(a_dir, "last.pt"), map_location="cpu", weights_only=True)["model"]
    b = torch.load(os.path.join(b_dir, "last.pt"), map_location="cpu", weights_only=True)["model"]
    return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a)


# --------------------------------------------------------------------------- main


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
           "cores_allowed": extraction.allowed_cores()}
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), gpus=torch.cuda.device_count(),
                   capability=".".join(map(str, torch.cuda.get_device_capability(device))),
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return env


def check(args) -> dict:
    sizes = DRY if args.dry_run else FULL
    apply_sizes(args.dry_run)
    device = backbones.choose_device(args.device)
    work = tempfile.mkdtemp(prefix="gpu-check-")
    try:
        return _check(args, sizes, device, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _check(args, sizes: dict, device: torch.device, work: str) -> dict:
    data_dir = args.data or synthetic_data(os.path.join(work, "data"), sizes["train"], sizes["val"], sizes["size"])
    n_train = sum(len(files) for _, _, files in os.walk(os.path.join(data_dir, "train")))
    n_val = sum(len(files) for _, _, files in os.walk(os.path.join(data_dir, "val")))
    batch = args.batch_size or extraction.default_batch_size(device)
    report = {"environment": environment(device), "dry_run": args.dry_run, "data": data_dir,
              "images": {"train": n_train, "val": n_val}, "batch_size": batch, "rows": []}
    rows = report["rows"]
    weights = extraction.load_weights("random", 0)
    spec = str(device)

    # 1. extraction from JPEG files against the bare forward (its floor), fp32 and bf16
    caches = {}
    for precision in ("fp32", "bf16"):
        bare = bare_forward(weights, device, precision, batch, sizes["bare_images"])
        result, rate = extract(data_dir, os.path.join(work, f"cache-{precision}"), spec, precision, batch)
        caches[precision] = result.path
        rows.append({"check": f"extraction {precision}: JPEG files -> cache", "value": f"{rate:.1f} images/s",
                     "floor": f"{bare:.1f} images/s bare forward", "ratio": rate / bare,
                     "ok": rate > 0, "images_per_s": rate, "bare_images_per_s": bare})

    # 2. bf16 against fp32 features
    agree = agreement(caches["fp32"], caches["bf16"])
    rows.append({"check": "bf16 vs fp32 features (cosine per image)",
                 "value": f"min {agree['cos_min']:.5f}, mean {agree['cos_mean']:.5f}",
                 "floor": "min >= 0.99", "ok": agree["cos_min"] >= 0.99, **agree})

    # 3. two ranks (NCCL on 2 GPUs; gloo on CPU in a dry run) against one
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and gpus < 2:
        rows.append({"check": "2 ranks (NCCL) vs 1 rank", "value": f"skipped: {gpus} GPU visible",
                     "floor": "", "ok": None})
    elif args.no_distributed:
        rows.append({"check": "2 ranks vs 1 rank", "value": "skipped (--no-distributed)", "floor": "", "ok": None})
    else:
        cache2 = os.path.join(work, "cache-2ranks")
        (proc, seconds) = timed(device, lambda: two_ranks(data_dir, cache2, "cuda" if gpus else "cpu", batch,
                                                          args.dry_run))
        backend = "NCCL" if gpus else "gloo, CPU"
        if proc.returncode != 0:
            rows.append({"check": f"2 ranks ({backend}) vs 1 rank", "value": f"FAILED (exit {proc.returncode})",
                         "floor": "", "ok": False, "stderr": proc.stderr[-2000:]})
        else:
            path2 = os.path.join(cache2, "features", os.path.basename(caches["fp32"]))
            same_key = os.path.isfile(path2) and \
                store.read_meta(path2)["content_key"] == store.read_meta(caches["fp32"])["content_key"]
            diff = agreement(caches["fp32"], path2)["max_abs_diff"] if same_key else float("nan")
            rows.append({"check": f"2 ranks ({backend}) vs 1 rank, fp32", "value":
                         f"same cache key: {same_key}, max |diff| {diff:.2e}", "floor": "<= 1e-4",
                         "ok": bool(same_key and diff <= 1e-4), "seconds": seconds, "max_abs_diff": diff})

    # 4. one fine-tuning epoch against its floor
    precision = backbones.choose_precision("auto", device)
    one = finetune_run(data_dir, os.path.join(work, "ft-one"), spec, precision, 1)
    epoch_s = one.metrics["epoch_seconds"][0]
    floor = epoch_floor(device, precision, n_train, n_val, FinetuneConfig.batch_size,
                        one.metrics["config"]["threads"])
    rows.append({"check": f"fine-tune epoch ({precision}, batch {FinetuneConfig.batch_size})",
                 "value": f"{epoch_s:.2f} s", "floor": f"{floor:.2f} s arithmetic alone", "ratio": epoch_s / floor,
                 "ok": epoch_s > 0, "epoch_seconds": epoch_s, "floor_seconds": floor})

    # 5. resume: 1 + 1 epochs against 2 straight (and 2 straight twice: the device's own noise)
    epochs = sizes["epochs"]
    straight = finetune_run(data_dir, os.path.join(work, "ft-a"), spec, precision, epochs)
    again = finetune_run(data_dir, os.path.join(work, "ft-b"), spec, precision, epochs)
    finetune_run(data_dir, os.path.join(work, "ft-r"), spec, precision, 1)
    resumed = finetune_run(data_dir, os.path.join(work, "ft-r"), spec, precision, epochs)
    d_resume, d_rerun = max_param_diff(straight.path, resumed.path), max_param_diff(straight.path, again.path)
    rows.append({"check": f"resume 1+{epochs - 1} vs {epochs} straight epochs",
                 "value": f"max |diff| {d_resume:.2e} (resumed after epoch {resumed.resumed_from})",
                 "floor": f"{d_rerun:.2e} between two straight runs",
                 "ok": resumed.resumed_from == 1 and d_resume <= d_rerun, "max_abs_diff": d_resume,
                 "rerun_max_abs_diff": d_rerun})

    # 6. a 2-GPU DDP fine-tuning epoch against 1 GPU, the same global batch
    rows.append(ddp_row(args, data_dir, work, device, gpus, precision))
    return report


def ddp_row(args, data_dir: str, work: str, device: torch.device, gpus: int, precision: str) -> dict:
    batch = DDP_BATCH["dry" if args.dry_run else "full"]
    if device.type == "cuda" and gpus < 2:
        return {"check": "2-GPU DDP fine-tune epoch vs 1 GPU", "value": f"skipped: {gpus} GPU visible (needs 2)",
                "floor": "", "ok": None}
    if args.no_distributed:
        return {"check": "2-GPU DDP fine-tune epoch vs 1 GPU", "value": "skipped (--no-distributed)", "floor": "",
                "ok": None}
    backend = "NCCL" if gpus else "gloo, CPU"
    name = f"2 ranks DDP fine-tune epoch ({backend}, batch {batch}) vs 1"
    one = finetune.run(ddp_config(data_dir, os.path.join(work, "ddp-one"), str(device), precision,
                                  args.dry_run)).runs[0].metrics
    proc = ddp_run(data_dir, os.path.join(work, "ddp-two"), "cuda" if gpus else "cpu", precision, args.dry_run)
    if proc.returncode != 0:
        return {"check": name, "value": f"FAILED (exit {proc.returncode})", "floor": "", "ok": False,
                "stderr": proc.stderr[-2000:]}
    with open(os.path.join(work, "ddp-two", "runs", "finetune", "metrics.json")) as fh:
        two = json.load(fh)
    loss = [finetune_loss(os.path.join(work, d, "runs", "finetune")) for d in ("ddp-one", "ddp-two")]
    speedup = two["images_per_s"] / one["images_per_s"]
    return {"check": name, "value": f"{two['images_per_s']:.1f} vs {one['images_per_s']:.1f} train images/s, "
                                    f"efficiency {speedup / 2:.0%}; epoch-1 train loss {loss[1]:.4f} vs {loss[0]:.4f}",
            "floor": "1 rank, same global batch", "ratio": speedup,
            "ok": two["world_size"] == 2 and bool(two["sync_batchnorm"]),
            "images_per_s": two["images_per_s"], "one_images_per_s": one["images_per_s"],
            "efficiency": speedup / 2, "train_loss": loss[1], "one_train_loss": loss[0]}


def finetune_loss(run_dir: str) -> float:
    with open(os.path.join(run_dir, "history.json")) as fh:
        return json.load(fh)["epochs"][0]["train_loss"]


def table(report: dict) -> str:
    env = report["environment"]
    head = (f"gpu_check{' --dry-run' if report['dry_run'] else ''}: {env.get('gpu', env['device'])}, "
            f"torch {env['torch']}, {report['images']['train']}+{report['images']['val']} images, "
            f"batch {report['batch_size']}, random weights (not pretrained)")
    rows = [("check", "measured", "against", "ratio", "ok")]
    for r in report["rows"]:
        ok = "-" if r["ok"] is None else ("yes" if r["ok"] else "NO")
        rows.append((r["check"], r["value"], r["floor"], f"{r['ratio']:.2f}" if "ratio" in r else "", ok))
    lines = [head] + format_table(rows[0], rows[1:]).splitlines()
    for r in report["rows"]:
        if r.get("stderr"):
            lines.append(f"  {r['check']} stderr:\n{r['stderr']}")
    return "\n".join(lines)


def rank_entry(argv) -> int:
    """``_features``: one rank of the 2-rank extraction (torchrun starts two of these)."""
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--cache", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch-size", type=int, default=0)
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    apply_sizes(args.dry_run)
    features.run(FeaturesConfig(data=args.data, cache=args.cache, weights="random", device=args.device,
                                precision="fp32", batch_size=args.batch_size, progress=False))
    return 0


def ddp_entry(argv) -> int:
    """``_finetune``: one rank of the 2-rank fine-tuning epoch (torchrun starts two of these)."""
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--cache", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    apply_sizes(args.dry_run)
    finetune.run(ddp_config(args.data, args.cache, args.device, args.precision, args.dry_run))
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_features"]:
        return rank_entry(argv[1:])
    if argv[:1] == ["_finetune"]:
        return ddp_entry(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="", help="an ImageFolder data set (default: synthetic JPEGs)")
    p.add_argument("--device", default="", help="default: cuda (cpu with --dry-run)")
    p.add_argument("--batch-size", type=int, default=0, help="extraction batch (0: the engine's default)")
    p.add_argument("--dry-run", action="store_true", help="the same code path on CPU with tiny sizes")
    p.add_argument("--no-distributed", action="store_true", help="skip the 2-rank run")
    p.add_argument("--json", default="", help="also write the report as JSON here")
    args = p.parse_args(argv)
    args.device = args.device or ("cpu" if args.dry_run else "cuda")
    started = time.perf_counter()
    report = check(args)
    report["seconds"] = time.perf_counter() - started
    print(table(report))
    print(f"  total {report['seconds']:.0f} s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2)
    return 0 if all(r["ok"] is not False for r in report["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
