"""The whole pipeline on a GPU, in one prepared run (< 10 minutes on one modern GPU), one table.

    python bench/gpu_check.py [--data DIR] [--device cuda] [--json FILE]
    python bench/gpu_check.py --dry-run        # the same code path on CPU, tiny sizes (seconds)

Rows, each measured side by side in this one run, each able to fail (outside ``--dry-run``,
whose tiny sizes make ratios meaningless, only the rows that do not depend on speed keep their
bounds):

- steady-state extraction (enough images to fill every loader process, timed after two forward
  batches of warm-up), fp32 and the low precision the GPU runs natively (bf16 on sm80+, else
  fp16), against two floors measured here: the bare forward on in-memory tensors, and the
  bare forward with the measured PIL decode cost spread over the loader processes;
- the same with ``--decode gpu`` (JPEGs decoded by nvJPEG on the device) against the bare forward;
- low precision against fp32 features: per-image agreement of a logistic head's predictions
  (fitted on the fp32 train features) and the features' relative error;
- a 2-rank extraction (``torchrun``) against 1 rank, with one tensor ``all_reduce`` on the
  device between the ranks (NCCL on 2 GPUs; gloo on CPU) besides the object collectives
  (over gloo) the features stage uses;
- epoch 2 of fine-tuning (epoch 1 holds worker start and kernel selection) against its floor
  (forward + backward + step on in-memory tensors);
- fine-tuning in fp16 with a GradScaler, forced once (auto picks it only below sm80);
- resume: 1 epoch + 1 resumed against 2 straight epochs under deterministic algorithms:
  parameters must be equal.
- a 2-GPU DistributedDataParallel fine-tuning epoch (``torchrun``, NCCL, SyncBatchNorm) against
  1 GPU at the same global batch: train images/s, scaling efficiency, first-epoch train loss.
  It runs where 2 GPUs are visible and says "skipped" where not (gloo on CPU in a dry run).

Weights are random (nothing is downloaded; speed does not depend on weight values), so no
accuracy here is a transfer-learning result. Without ``--data`` a synthetic ImageFolder of
JPEGs the size of hymenoptera's (500x375) is written to a temporary folder first.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings

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

# steady_batches: forward batches of the steady-state extraction (2 of them warm-up); the loader
# batches of each (batch // workers images) keep every loader process busy.
FULL = {"train": 600, "val": 200, "size": (500, 375), "epochs": 2, "bare_images": 2048, "steady_batches": 18,
        "decode_sample": 64}
DRY = {"train": 6, "val": 3, "size": (48, 40), "epochs": 2, "bare_images": 16, "steady_batches": 4,
       "decode_sample": 6, "preprocess": {"resize": 40, "crop": 32}}
# Bounds of the rows that can fail. Steady-state extraction against the decode + forward floor;
# --decode gpu against the bare forward (nvJPEG and the forward share the GPU); epoch 2 against
# its floor; low precision against fp32. Not yet checked on a GPU: the first run says whether
# they are right.
BOUNDS = {"extraction": 0.8, "extraction_gpu_decode": 0.5, "epoch": 1.3, "agreement": 0.98,
          "rel_err_median": 0.02, "rel_err_max": 0.1}


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


def extract(data_dir: str, cache: str, device: str, precision: str, batch_size: int, decode: str = "auto"):
    cfg = FeaturesConfig(data=data_dir, cache=cache, weights="random", device=device, precision=precision,
                         batch_size=batch_size, progress=False, rebuild=True, decode=decode)
    return features.run(cfg)


def low_precision(device: torch.device) -> str:
    """The reduced precision this device computes natively: bf16 on sm80+ (and on CPU, where it runs
    either way), else fp16 (sm75 and older: cuDNN has no bf16 convolutions there)."""
    if device.type == "cuda":
        return "bf16" if backbones.native_bf16(device) else "fp16"
    return "bf16"


def image_paths(data_dir: str):
    out = []
    for split in ("train", "val"):
        for dirpath, _, names in sorted(os.walk(os.path.join(data_dir, split))):
            out += sorted(os.path.relpath(os.path.join(dirpath, n), data_dir) for n in names)
    return out


def steady_extraction(weights, device: torch.device, precision: str, batch: int, data_dir: str, n_images: int,
                      decode: str = "pil", warm_batches: int = 2) -> dict:
    """Images/s of the extraction engine (loader processes, decode, forward) in steady state.

    The data set's images, repeated up to ``n_images``, go through one ``Extractor``; the clock
    starts when ``warm_batches`` forward batches are done (loader processes started, kernels
    chosen, prefetch queues full) and stops at the last.
    """
    engine = extraction.Extractor(weights, device, precision, batch_size=batch, decode=decode)
    paths = image_paths(data_dir)
    relpaths = (paths * (-(-n_images // len(paths))))[:n_images]
    done, counted, start = 0, 0, None
    for b in engine.batches(data_dir, relpaths, draft=True):
        done += 1
        if done == warm_batches:
            extraction.sync(device)
            start = time.perf_counter()
        elif done > warm_batches:
            counted += len(b.index)
    extraction.sync(device)
    seconds = time.perf_counter() - start if start is not None else float("nan")
    workers = extraction.default_workers(device, images=len(relpaths))
    return {"images_per_s": counted / seconds if counted else float("nan"), "timed_images": counted,
            "workers": workers, "forward_batches": done}


def extraction_row(name: str, got: dict, bare: float, floor: float, bound: float, strict: bool) -> dict:
    rate = got["images_per_s"]
    ratio = rate / floor
    return {"check": name, "value": f"{rate:.1f} images/s ({got['timed_images']} timed, {got['workers']} workers)",
            "floor": f"{floor:.1f} floor, {bare:.1f} bare forward ({rate / bare:.2f}x)",
            "ratio": ratio, "ok": bool(np.isfinite(rate) and rate > 0 and (ratio >= bound or not strict)),
            "target": f">= {bound}" if strict else "", "images_per_s": rate, "floor_images_per_s": floor,
            "bare_images_per_s": bare, "workers": got["workers"], "timed_images": got["timed_images"]}


def agreement(a_path: str, b_path: str) -> dict:
    """Low precision (b) against fp32 (a): relative error per image and the val predictions of a logistic
    head fitted on a's train features (rows matched by path)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    splits = {}
    for split in ("train", "val"):
        xa, ya, pa, _ = store.read_split(a_path, split)
        xb, _, pb, _ = store.read_split(b_path, split)
        order = {p: i for i, p in enumerate(pb)}
        splits[split] = (xa, xb[[order[p] for p in pa]], ya)
    rel = np.concatenate([np.linalg.norm(xa - xb, axis=1) / np.maximum(np.linalg.norm(xa, axis=1), 1e-12)
                          for xa, xb, _ in splits.values()])
    xa, _, ya = splits["train"]
    head = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(xa, ya)
    va, vb, _ = splits["val"]
    same = head.predict(va) == head.predict(vb)
    return {"agreement": float(same.mean()), "changed": int((~same).sum()), "val": int(same.size),
            "rel_err_median": float(np.median(rel)), "rel_err_max": float(rel.max()),
            "max_abs_diff": float(max(np.abs(a - b).max() for a, b, _ in splits.values()))}


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


@contextlib.contextmanager
def deterministic():
    """torch's deterministic algorithms (cuDNN included) for the block; a nondeterministic op warns and
    is counted. cuBLAS needs ``CUBLAS_WORKSPACE_CONFIG`` set before its first use: :func:`main` sets it."""
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield caught
        finally:
            torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
            torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = previous[2], previous[3]


@contextlib.contextmanager
def counting_scaler_steps():
    """Counts ``GradScaler.step`` calls in the block: the fp16 path really ran."""
    calls = []
    real = torch.amp.GradScaler.step

    def step(self, *args, **kwargs):
        calls.append(float(self.get_scale()) if self.is_enabled() else 0.0)
        return real(self, *args, **kwargs)

    torch.amp.GradScaler.step = step
    try:
        yield calls
    finally:
        torch.amp.GradScaler.step = real
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
    strict = not args.dry_run
    weights = extraction.load_weights("random", 0)
    spec = str(device)
    low = low_precision(device)
    report["low_precision"] = low

    # 1. steady-state extraction against the bare forward and the decode + forward floor
    n_steady = sizes["steady_batches"] * batch
    decode_s = common.decode_seconds(data_dir, image_paths(data_dir)[:sizes["decode_sample"]])
    cores = extraction.allowed_cores()
    for precision in ("fp32", low):
        bare = bare_forward(weights, device, precision, batch, sizes["bare_images"])
        got = steady_extraction(weights, device, precision, batch, data_dir, n_steady)
        floor = common.decode_forward_floor(bare, decode_s, device, cores, got["workers"])
        rows.append(dict(extraction_row(f"extraction {precision}, steady state", got, bare, floor,
                                        BOUNDS["extraction"], strict), decode_ms=decode_s * 1e3))
    # the same with JPEGs decoded on the device (nvJPEG; torchvision's CPU decoder in a dry run)
    if extraction.tensor_decode_available():
        got = steady_extraction(weights, device, low, batch, data_dir, n_steady, decode="tensor")
        rows.append(extraction_row(f"extraction {low}, --decode gpu, steady state", got, bare, bare,
                                   BOUNDS["extraction_gpu_decode"], strict))
    else:
        rows.append({"check": f"extraction {low}, --decode gpu", "value": "skipped: torchvision < 0.19",
                     "floor": "", "ok": None})

    # 2. low precision against fp32: a fitted head's predictions and the relative error
    caches = {p: extract(data_dir, os.path.join(work, f"cache-{p}"), spec, p, batch).path for p in ("fp32", low)}
    agree = agreement(caches["fp32"], caches[low])
    rows.append({"check": f"{low} vs fp32 features", "value":
                 f"head predictions agree {agree['agreement']:.3f} ({agree['changed']}/{agree['val']} val changed), "
                 f"relative error median {agree['rel_err_median']:.2e} max {agree['rel_err_max']:.2e}",
                 "floor": f"agree >= {BOUNDS['agreement']}, rel. error median <= {BOUNDS['rel_err_median']}, "
                          f"max <= {BOUNDS['rel_err_max']}",
                 "ok": bool(agree["rel_err_max"] <= BOUNDS["rel_err_max"]
                            and agree["rel_err_median"] <= BOUNDS["rel_err_median"]
                            and (agree["agreement"] >= BOUNDS["agreement"] or not strict)), **agree})

    # 3. two ranks against one, with a tensor collective on the device between them
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    collective = "NCCL" if gpus else "gloo"
    name = f"2 ranks vs 1 rank, fp32 (tensor all_reduce over {collective}; object collectives over gloo)"
    if device.type == "cuda" and gpus < 2:
        rows.append({"check": name, "value": f"skipped: {gpus} GPU visible", "floor": "", "ok": None})
    elif args.no_distributed:
        rows.append({"check": name, "value": "skipped (--no-distributed)", "floor": "", "ok": None})
    else:
        cache2 = os.path.join(work, "cache-2ranks")
        (proc, seconds) = timed(device, lambda: two_ranks(data_dir, cache2, "cuda" if gpus else "cpu", batch,
                                                          args.dry_run))
        reduced = re.findall(r"all_reduce rank \d+: [^\n]*? (?:ok|WRONG)", proc.stdout)
        if proc.returncode != 0:
            rows.append({"check": name, "value": f"FAILED (exit {proc.returncode})",
                         "floor": "", "ok": False, "stderr": proc.stderr[-2000:]})
        else:
            path2 = os.path.join(cache2, "features", os.path.basename(caches["fp32"]))
            same_key = os.path.isfile(path2) and \
                store.read_meta(path2)["content_key"] == store.read_meta(caches["fp32"])["content_key"]
            diff = agreement(caches["fp32"], path2)["max_abs_diff"] if same_key else float("nan")
            backend_ok = bool(reduced) and all(line.endswith(f"backend {collective.lower()} ok") for line in reduced)
            rows.append({"check": name, "value": f"same cache key: {same_key}, max |diff| {diff:.2e}; "
                         f"{'; '.join(reduced) or 'no all_reduce reported'}", "floor": "<= 1e-4",
                         "ok": bool(same_key and diff <= 1e-4 and backend_ok), "seconds": seconds,
                         "max_abs_diff": diff})

    # 4. epoch 2 of fine-tuning against its floor (epoch 1 holds worker start and kernel selection)
    precision = backbones.choose_precision("auto", device)
    two = finetune_run(data_dir, os.path.join(work, "ft-speed"), spec, precision, 2)
    epoch_s = two.metrics["epoch_seconds"][1]
    floor = epoch_floor(device, precision, n_train, n_val, FinetuneConfig.batch_size,
                        two.metrics["config"]["threads"])
    ratio = epoch_s / floor
    rows.append({"check": f"fine-tune epoch 2 ({precision}, batch {FinetuneConfig.batch_size})",
                 "value": f"{epoch_s:.2f} s (epoch 1: {two.metrics['epoch_seconds'][0]:.2f} s)",
                 "floor": f"{floor:.2f} s arithmetic alone", "ratio": ratio,
                 "ok": bool(epoch_s > 0 and (ratio <= BOUNDS["epoch"] or not strict)),
                 "target": f"<= {BOUNDS['epoch']}" if strict else "", "epoch_seconds": epoch_s,
                 "floor_seconds": floor})

    # 5. fp16 + GradScaler, forced once (auto picks it only on GPUs without native bf16)
    with counting_scaler_steps() as scales:
        half = finetune_run(data_dir, os.path.join(work, "ft-fp16"), spec, "fp16", 1)
    losses = [e["train_loss"] for e in json.load(open(os.path.join(half.path, "history.json")))["epochs"]]
    rows.append({"check": "fine-tune fp16 + GradScaler, 1 epoch", "value":
                 f"{len(scales)} scaled steps, scale {scales[-1] if scales else float('nan'):.0f}, "
                 f"train loss {losses[-1]:.4f}", "floor": "every step scaled, finite loss",
                 "ok": bool(scales and len(scales) >= -(-n_train // FinetuneConfig.batch_size)
                            and np.isfinite(losses).all()), "scaled_steps": len(scales)})

    # 6. resume: 1 + 1 epochs against 2 straight, under deterministic algorithms: equal
    epochs = sizes["epochs"]
    with deterministic() as caught:
        straight = finetune_run(data_dir, os.path.join(work, "ft-a"), spec, precision, epochs)
        finetune_run(data_dir, os.path.join(work, "ft-r"), spec, precision, 1)
        resumed = finetune_run(data_dir, os.path.join(work, "ft-r"), spec, precision, epochs)
    alerts = sorted({str(w.message).splitlines()[0][:100] for w in caught if "deterministic" in str(w.message)})
    d_resume = max_param_diff(straight.path, resumed.path)
    rows.append({"check": f"resume 1+{epochs - 1} vs {epochs} straight epochs (deterministic algorithms)",
                 "value": f"max |diff| {d_resume:.2e} (resumed after epoch {resumed.resumed_from})"
                          + (f"; nondeterministic ops: {alerts}" if alerts else ""),
                 "floor": "== 0", "ok": resumed.resumed_from == 1 and d_resume == 0.0, "max_abs_diff": d_resume,
                 "nondeterministic_ops": alerts})

    # a 2-GPU DDP fine-tuning epoch against 1 GPU, the same global batch
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
    single = finetune.run(ddp_config(data_dir, os.path.join(work, "ddp-one"), str(device), precision,
                                     args.dry_run)).runs[0]
    one = single.metrics
    proc = ddp_run(data_dir, os.path.join(work, "ddp-two"), "cuda" if gpus else "cpu", precision, args.dry_run)
    if proc.returncode != 0:
        return {"check": name, "value": f"FAILED (exit {proc.returncode})", "floor": "", "ok": False,
                "stderr": proc.stderr[-2000:]}
    # The same settings name the same run folder (an explicit --precision adds its settings hash).
    run_name = os.path.basename(single.path)
    with open(os.path.join(work, "ddp-two", "runs", run_name, "metrics.json")) as fh:
        two = json.load(fh)
    loss = [finetune_loss(os.path.join(work, d, "runs", run_name)) for d in ("ddp-one", "ddp-two")]
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
    rows = [("check", "measured", "against", "ratio", "target", "ok")]
    for r in report["rows"]:
        ok = "-" if r["ok"] is None else ("yes" if r["ok"] else "NO")
        rows.append((r["check"], r["value"], r["floor"], f"{r['ratio']:.2f}" if "ratio" in r else "",
                     r.get("target", ""), ok))
    lines = [head] + format_table(rows[0], rows[1:]).splitlines()
    for r in report["rows"]:
        if r.get("stderr"):
            lines.append(f"  {r['check']} stderr:\n{r['stderr']}")
    return "\n".join(lines)


def rank_entry(argv) -> int:
    """``_features``: one rank of the 2-rank extraction (torchrun starts two of these), then one tensor
    ``all_reduce`` on the rank's device: over NCCL on GPUs (the features stage itself exchanges only
    small objects, over gloo)."""
    import torch.distributed as dist

    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--cache", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch-size", type=int, default=0)
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    apply_sizes(args.dry_run)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if args.device.startswith("cuda") else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
    try:
        features.run(FeaturesConfig(data=args.data, cache=args.cache, weights="random", device=args.device,
                                    precision="fp32", batch_size=args.batch_size, progress=False))
        x = torch.full((1 << 20,), float(dist.get_rank() + 1), device=device)
        dist.all_reduce(x)
        expected = dist.get_world_size() * (dist.get_world_size() + 1) / 2
        ok = bool((x == expected).all())
        backend = "nccl" if device.type == "cuda" else "gloo"  # what "cpu:gloo,cuda:nccl" uses for this tensor
        sys.stdout.write(f"all_reduce rank {dist.get_rank()}: 1M floats on {device}, backend {backend} "
                         f"{'ok' if ok else 'WRONG'}\n")
        sys.stdout.flush()
    finally:
        dist.destroy_process_group()
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
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (the resume row)
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
