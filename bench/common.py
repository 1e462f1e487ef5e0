"""What every benchmark shares: the data set, the machine's description, thread pinning, and the
compute floors (the same network on random tensors, no decoding, no I/O, no bookkeeping).

A floor is measured in the same process, at the same precision, batch and thread count as the
stage it bounds, right next to it: these machines are shared, so only ratios measured side by
side mean anything.
"""
from __future__ import annotations

import os
import platform
import sys
import time
from typing import Dict, Optional

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from pipeline import backbones  # noqa: E402
from pipeline.features import extraction  # noqa: E402

# CPU flags that decide how fast this code can run (bf16 autocast is only a win with native bf16).
FLAGS_THAT_MATTER = ("avx2", "avx512_f", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "bf16")


def default_data() -> str:
    for candidate in (os.environ.get("BENCH_DATA"), os.environ.get("PIPELINE_TEST_DATA"),
                      os.path.join(REPO, "..", "shared", "data", "hymenoptera_data"),
                      os.path.join(REPO, "data", "hymenoptera_data")):
        if candidate and os.path.isdir(candidate):
            return os.path.abspath(candidate)
    sys.exit("no data set: pass --data DIR (an ImageFolder with train/ and val/), or set BENCH_DATA")


def subset_folder(data_dir: str, per_class: int, into: str) -> str:
    """``per_class`` images of every class and split (evenly spaced), as symlinks under ``into``."""
    root = os.path.join(into, "subset")
    for split in ("train", "val"):
        for cls in sorted(os.listdir(os.path.join(data_dir, split))):
            src = os.path.join(data_dir, split, cls)
            if not os.path.isdir(src):
                continue
            files = sorted(f for f in os.listdir(src) if not f.startswith("."))
            step = max(1, len(files) // per_class)
            os.makedirs(os.path.join(root, split, cls), exist_ok=True)
            for name in files[::step][:per_class]:
                os.symlink(os.path.abspath(os.path.join(src, name)), os.path.join(root, split, cls, name))
    return root


def pin_threads(threads: int) -> int:
    """Use ``threads`` intra-op threads here and in every subprocess (0: torch's default)."""
    if threads:
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)
    return torch.get_num_threads()


def machine() -> Dict[str, object]:
    """The machine, in the terms that decide these figures."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    flags = backbones.cpu_features()
    info = {"cpu": model, "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "cpu_flags": sorted(f for f in FLAGS_THAT_MATTER if f in flags),
            "native_bf16_cpu": backbones.native_bf16(torch.device("cpu")),
            "torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["load_average_1min"] = os.getloadavg()[0]
    except (AttributeError, OSError):
        pass
    return info


def forward_floor(weights, device: torch.device, precision: str, batch: int, n_images: int,
                  channels_last: bool = True, repeats: int = 1) -> float:
    """Images/s of the frozen extractor's forward alone on random tensors: the floor of extraction.

    Best of ``repeats`` timings of ``n_images`` (rounded up to whole batches), after a warm-up batch.
    """
    model = backbones.feature_extractor(weights, device, channels_last)
    crop = weights.backbone.preprocess()["crop"]  # the input size of this backbone's extraction
    x = torch.randn(batch, 3, crop, crop, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    steps = max(1, -(-n_images // batch))
    best = 0.0
    with torch.inference_mode(), extraction.numerics(device, precision):  # the extraction's arithmetic
        model(x).float()  # warm-up: oneDNN primitives, allocator
        for _ in range(max(1, repeats)):
            extraction.sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                model(x).float()
            extraction.sync(device)
            best = max(best, steps * batch / (time.perf_counter() - start))
    return best


def epoch_floor(device: torch.device, precision: str, n_train: int, n_val: int, train_batch: int,
                val_batch: int, num_classes: int = 2, channels_last: bool = True,
                backbone: str = "resnet18") -> Dict[str, float]:
    """Seconds of one end-to-end epoch's compute on random tensors: forward + backward + SGD step
    of the whole network (what ``finetune``/``scratch`` train) at ``train_batch`` over ``n_train``
    images, plus the val forward at ``val_batch`` over ``n_val`` images. A warm-up step first."""
    model = backbones.build_model(None, num_classes=num_classes, backbone=backbone).to(device)
    crop = backbones.get_backbone(backbone).preprocess()["crop"]
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, foreach=True)
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def images(n):
        return torch.randn(n, 3, crop, crop, device=device).contiguous(memory_format=fmt)

    def sizes(n, batch):  # the loader's batches: full ones, then the remainder
        return [batch] * (n // batch) + ([n % batch] if n % batch else [])

    train_batches = [(images(b), torch.randint(0, num_classes, (b,), device=device))
                     for b in sorted(set(sizes(n_train, train_batch)))]
    val_batches = {b: images(b) for b in set(sizes(n_val, val_batch))}
    by_size = {x.shape[0]: (x, y) for x, y in train_batches}

    def step(x, y):
        with backbones.autocast(device, precision):
            out = model(x)
        loss = F.cross_entropy(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    model.train()
    step(*train_batches[-1])  # warm-up
    extraction.sync(device)
    start = time.perf_counter()
    for b in sizes(n_train, train_batch):
        step(*by_size[b])
    extraction.sync(device)
    train = time.perf_counter() - start
    model.eval()
    with torch.inference_mode(), backbones.autocast(device, precision):
        for x in val_batches.values():
            model(x).float()  # warm-up
        extraction.sync(device)
        start = time.perf_counter()
        for b in sizes(n_val, val_batch):
            model(val_batches[b]).float()
        extraction.sync(device)
    val = time.perf_counter() - start
    return {"train_s": train, "val_s": val, "epoch_s": train + val}


def decode_seconds(root: str, relpaths, draft: bool = True, repeats: int = 1) -> float:
    """Seconds of one core per image to read, decode and transform it exactly as the extraction's loader
    does (``ExtractionDataset.__getitem__``: PIL, draft mode, Resize + CenterCrop + Normalize), in this
    process with one intra-op thread; best of ``repeats`` passes over ``relpaths`` after one warm-up image."""
    from pipeline import data

    dataset = data.ExtractionDataset(root, list(relpaths), draft=draft)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dataset[0]
        best = float("inf")
        for _ in range(max(1, repeats)):
            start = time.perf_counter()
            for i in range(len(dataset)):
                dataset[i]
            best = min(best, (time.perf_counter() - start) / len(dataset))
    finally:
        torch.set_num_threads(previous)
    return best


def decode_forward_floor(forward_rate: float, decode_s: float, device: torch.device, cores: int,
                         workers: int) -> float:
    """Images/s that decoding and the forward together allow: extraction's true floor.

    CPU: decoding and the forward share the same cores, so their costs add: per image the
    forward's wall time plus ``decode_s`` of core time spread over ``cores``. CUDA: ``workers``
    cores decode while the GPU computes, so the slower of the two bounds the rate.
    """
    if device.type == "cuda":
        return min(forward_rate, max(1, workers) / decode_s)
    return 1.0 / (1.0 / forward_rate + decode_s / max(1, cores))


def ratio_row(name: str, value: Optional[float], target: Optional[str], detail: str = "",
              unit: str = "x") -> Dict[str, object]:
    """One row of the table: ``value`` against ``target`` (``">= 0.9"``, ``"<= 1.15"``; None: information)."""
    met = None
    if value is not None and target:
        op, bound = target.split()
        met = value >= float(bound) if op == ">=" else value <= float(bound)
    return {"name": name, "value": value, "unit": unit, "target": target, "met": met, "detail": detail}
