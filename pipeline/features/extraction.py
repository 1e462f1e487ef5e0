"""The extraction engine: image files -> frozen ResNet18 features, one loop for every caller.

The features stage, :class:`~pipeline.heads.sklearn_api.ResNet18Features` and ``predict`` (through
the transformer) all extract with :class:`Extractor`. This module is also the one place for:

- **batch size and loader processes** by default (``finetune`` reads them here too), sized by
  the cores this process may run on (``os.sched_getaffinity``: a SLURM or ``taskset``
  allocation), not by every core of the machine;
- **the weights, resolved and checked (sha256) once per process** (:func:`load_weights`);
- **the forward pass**: at most ``batch_size`` images per forward, augmented views included;
  pinned loader batches go to the device without an intermediate host copy; ``fp32`` on a
  GPU means IEEE fp32 (TF32 off, so GPU and CPU fp32 rows agree to rounding); bf16/fp16
  through autocast (see :func:`exact_fp32`); a CUDA out-of-memory error becomes one line naming ``--batch-size``.
"""
from __future__ import annotations

import contextlib
import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import backbones, data
from ..errors import UserError

__all__ = [
    "BATCH_SIZE",
    "SMALL_JOB",
    "allowed_cores",
    "cpu_quota",
    "loader_batch_size",
    "default_batch_size",
    "default_workers",
    "sync",
    "exact_fp32",
    "numerics",
    "out_of_memory_hint",
    "choose_decode",
    "tensor_decode_available",
    "weights_identity",
    "load_weights",
    "forget_weights",
    "Batch",
    "Extractor",
]

BATCH_SIZE = {"cpu": 32, "cuda": 256}  # images per forward pass by default, per device type
SMALL_JOB = 64  # fewer images than this: no loader processes (starting them costs more)
# The top-level torch.OutOfMemoryError is recent; older torch names the same class torch.cuda.OutOfMemoryError.
_OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
_WEIGHTS_KEPT = 2  # resolved weights kept per process (a ResNet18 state_dict is 45 MB)


# --------------------------------------------------------------------------- defaults


# cgroup v2 (cpu.max) and v1 (cpu.cfs_quota_us / cpu.cfs_period_us) CPU quotas, as a container
# sees them: `docker --cpus`, Kubernetes CPU limits.
CGROUP_ROOT = "/sys/fs/cgroup"
_CGROUP_V1_DIRS = ("cpu", "cpu,cpuacct", "cpuacct,cpu", "")


def _read_first_line(path: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as fh:
            return fh.readline().strip()
    except OSError:
        return ""


def cpu_quota() -> Optional[float]:
    """The CFS quota in cores (e.g. 2.5 for ``docker --cpus 2.5``), or None when there is none."""
    quota, _, period = _read_first_line(os.path.join(CGROUP_ROOT, "cpu.max")).partition(" ")
    if not quota:  # cgroup v1
        for sub in _CGROUP_V1_DIRS:
            quota = _read_first_line(os.path.join(CGROUP_ROOT, sub, "cpu.cfs_quota_us"))
            period = _read_first_line(os.path.join(CGROUP_ROOT, sub, "cpu.cfs_period_us"))
            if quota:
                break
    try:
        q, p = int(quota), int(period)
    except ValueError:  # "max", missing or unreadable: no quota
        return None
    return q / p if q > 0 and p > 0 else None


def allowed_cores() -> int:
    """Cores this process may use: its CPU affinity (a SLURM or ``taskset`` allocation) capped by a CFS
    quota (:func:`cpu_quota`, rounded up), falling back to the machine's count."""
    try:
        cores = max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        cores = max(1, os.cpu_count() or 1)
    quota = cpu_quota()
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def loader_batch_size(forward_images: int, workers: int, images: Optional[int] = None) -> int:
    """Images per loader batch, so that ``workers`` processes decode one forward batch together.

    One worker assembles one loader batch. Were a loader batch the forward batch (256 on a GPU),
    a split of at most 256 images would decode on one core while the others idle; a loader
    batch of ``forward_images // workers`` (and at most ``images / workers``, for a job smaller
    than that) spreads every forward batch over all the workers.
    """
    workers = max(1, workers)
    size = forward_images // workers
    if images:
        size = min(size, math.ceil(images / workers))
    return max(1, size)


def default_batch_size(device: torch.device) -> int:
    """Images per forward pass: 32 on CPU, 256 on a GPU."""
    return BATCH_SIZE["cuda" if device.type == "cuda" else "cpu"]


def default_workers(device: torch.device, processes: int = 1, images: Optional[int] = None) -> int:
    """Loader processes: feed a GPU generously, leave a CPU's cores to the forward pass.

    ``processes``: extraction processes sharing this machine (torchrun ranks per node), which
    share the allowed cores. ``images``: the job's size; a small job gets no loader processes.
    """
    if images is not None and images < SMALL_JOB:
        return 0
    cores = max(1, allowed_cores() // max(1, processes))
    if device.type == "cuda":
        return max(1, min(cores - 1, 12))
    return max(1, min(cores // 2, 4))


def sync(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (CUDA is asynchronous): call it before reading a timer."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def exact_fp32(device: torch.device, precision: str) -> Iterator[None]:
    """For ``fp32`` on CUDA: TF32 off for convolutions and matrix products while the block runs.

    torch allows TF32 convolutions on Ampere and later GPUs by default
    (``torch.backends.cudnn.conv.fp32_precision == "tf32"``), so "fp32" would silently be
    TF32 (10-bit mantissa) and GPU fp32 features would differ from CPU fp32 ones beyond
    rounding, under the same cache key. The previous settings come back after the last
    concurrent block (:func:`pipeline.backbones.device.ieee_fp32`).
    A no-op on CPU and for the other precisions.
    """
    if precision != "fp32" or device.type != "cuda":
        yield
        return
    with backbones.ieee_fp32():  # guarded per torch version, thread-safe
        yield


@contextlib.contextmanager
def numerics(device: torch.device, precision: str) -> Iterator[None]:
    """The arithmetic ``precision`` names on ``device``: autocast for bf16/fp16, :func:`exact_fp32` for fp32."""
    if precision == "fp32":
        with exact_fp32(device, precision):
            yield
    else:
        with backbones.autocast(device, precision):
            yield


@contextlib.contextmanager
def out_of_memory_hint(device: torch.device, batch_size: int, option: str = "--batch-size") -> Iterator[None]:
    """A device out-of-memory error inside the block becomes one user error naming ``option``."""
    try:
        yield
    except _OUT_OF_MEMORY:
        lower = max(1, batch_size // 2)
        raise UserError(f"out of memory on {device} with {option} {batch_size}; lower it (e.g. {option} "
                        f"{lower}) or free the device") from None


def tensor_decode_available() -> bool:
    """torchvision's batched ``decode_jpeg`` with ``apply_exif_orientation`` (torchvision >= 0.19)."""
    import inspect

    from torchvision.io import decode_jpeg

    return "apply_exif_orientation" in inspect.signature(decode_jpeg).parameters


def choose_decode(spec: str, device: torch.device, engine: str = "torch") -> str:
    """``pil`` or ``tensor`` (JPEGs decoded by ``torchvision.io.decode_jpeg`` on ``device``) for ``--decode``.

    ``auto``: tensor where extraction runs on CUDA (nvJPEG) and torchvision has the decoder, else
    PIL. ``gpu`` elsewhere is a user error.
    """
    if spec == "pil" or (spec == "auto" and (device.type != "cuda" or engine != "torch")):
        return "pil"
    if spec not in ("auto", "gpu"):
        raise UserError(f"--decode {spec!r} is not recognised; use auto, pil or gpu")
    if spec == "gpu" and (device.type != "cuda" or engine != "torch"):
        raise UserError(f"--decode gpu decodes on the CUDA device that extracts, not on {device} ({engine} engine); "
                        "use --device cuda, or --decode pil or auto")
    if not tensor_decode_available():
        if spec == "gpu":
            raise UserError("--decode gpu needs torchvision >= 0.19 (decode_jpeg with apply_exif_orientation); "
                            "upgrade torchvision or use --decode pil")
        return "pil"
    return "tensor"


# --------------------------------------------------------------------------- weights


_WEIGHTS: "OrderedDict[tuple, backbones.Weights]" = OrderedDict()
_WEIGHTS_LOCK = threading.Lock()


def weights_identity(spec: str, seed: int = 0) -> tuple:
    """What names a weights source without reading it: spec and seed, or a file's path and stat."""
    if spec == "random":
        return ("random", int(seed))
    if spec == "imagenet":
        return ("imagenet",)
    try:
        st = os.stat(spec)
    except OSError:
        return ("file", os.path.abspath(spec))
    return ("file", os.path.abspath(spec), st.st_size, st.st_mtime_ns, st.st_ino)


def load_weights(spec: str, seed: int = 0, backbone: Optional[str] = None) -> backbones.Weights:
    """``backbones.resolve_weights``, checked (hashed) once per process for each source and backbone.

    A file is read again when its size, mtime or inode changed. Raises ``UserError`` as
    ``resolve_weights`` does.
    """
    key = (backbone or backbones.DEFAULT,) + weights_identity(spec, seed)
    with _WEIGHTS_LOCK:
        if key in _WEIGHTS:
            _WEIGHTS.move_to_end(key)
            return _WEIGHTS[key]
    weights = backbones.resolve_weights(spec, seed, backbone)
    with _WEIGHTS_LOCK:
        _WEIGHTS[key] = weights
        while len(_WEIGHTS) > _WEIGHTS_KEPT:
            _WEIGHTS.popitem(last=False)
    return weights


def forget_weights() -> None:
    """Drop the weights :func:`load_weights` kept (frees memory; the next call reads and checks again)."""
    with _WEIGHTS_LOCK:
        _WEIGHTS.clear()


# --------------------------------------------------------------------------- the engine


@dataclass
class Batch:
    """One loader batch's results, in the order of ``index`` (positions in the paths given).

    ``features`` (n, D) float32 and ``views`` (n, K, D) or None (D: the backbone's feature size); rows whose ``error`` is
    not empty could not be decoded and hold zeros.
    """

    index: List[int]
    sha1: List[str]
    error: List[str]
    features: np.ndarray
    views: Optional[np.ndarray]


def _runs(flags: Sequence[bool]) -> Iterator[Tuple[int, int]]:
    """``(start, stop)`` of each run of consecutive True values."""
    start = None
    for i, flag in enumerate(list(flags) + [False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            yield start, i
            start = None


class Extractor:
    """The frozen backbone on ``device``, forwarding image files in batches.

    ``batch_size`` (0: :func:`default_batch_size`) bounds the images in any one forward pass,
    augmented views included; ``workers`` (-1: :func:`default_workers`) loader processes;
    ``processes``: extraction processes sharing this machine (for the worker default).
    """

    decode = "pil"  # or "tensor": JPEGs decoded on ``device`` by torchvision (:func:`choose_decode`)

    def __init__(self, weights: backbones.Weights, device: torch.device, precision: str, batch_size: int = 0,
                 workers: int = -1, channels_last: bool = True, processes: int = 1, decode: str = "pil"):
        self.decode = decode
        self.device = device
        self.precision = precision
        self.batch_size = batch_size or default_batch_size(device)
        self.workers = workers
        self.channels_last = channels_last
        self.processes = processes
        self.preprocess = weights.backbone.preprocess()
        self.dim = backbones.feature_dim(weights.backbone.name)
        self.model = backbones.feature_extractor(weights, device, channels_last)

    def loader(self, root: str, relpaths: Sequence[str], views: int = 0, seed: int = 0,
               draft: bool = True) -> torch.utils.data.DataLoader:
        """Batches of ``data.ExtractionDataset`` samples, :func:`loader_batch_size` of one forward batch each."""
        workers = default_workers(self.device, self.processes, len(relpaths)) if self.workers < 0 else self.workers
        return torch.utils.data.DataLoader(
            self._dataset(root, relpaths, views, seed, draft),
            batch_size=loader_batch_size(self._forward_images(views), workers, len(relpaths)),
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if workers else None,
        )

    def decodes_in_process(self, views: int = 0) -> bool:
        """CPU extraction with ``workers=-1`` and no augmented views (their seeding uses torch's global
        generator, which threads would share): decode in this process, on one thread per allowed core,
        between forward passes (:meth:`_decoded_in_threads`), instead of in loader processes.

        On a CPU the forward already runs one thread per core; a loader process beside it takes a
        core from one compute thread in the middle of a parallel region, and every other thread
        waits for it at the region's end. Decoding and computing in turn, each on every core,
        costs the sum of the two and no more: the decode + forward floor.
        """
        return self.device.type == "cpu" and self.workers < 0 and not views

    def _decoded_in_threads(self, root: str, relpaths: Sequence[str], views: int, seed: int,
                            draft: bool) -> Iterator[dict]:
        """Loader-style batches of one forward batch each, decoded by a thread pool (PIL and the
        transforms release the GIL for their C work) while the forward waits."""
        from concurrent.futures import ThreadPoolExecutor

        dataset = self._dataset(root, relpaths, views, seed, draft)
        step = self._forward_images(views)
        threads = max(1, allowed_cores() // max(1, self.processes))
        with ThreadPoolExecutor(threads, thread_name_prefix="decode") as pool:
            for start in range(0, len(dataset), step):
                samples = list(pool.map(dataset.__getitem__, range(start, min(len(dataset), start + step))))
                yield torch.utils.data.default_collate(samples)

    def _dataset(self, root: str, relpaths: Sequence[str], views: int, seed: int,
                 draft: bool) -> "data.ExtractionDataset":
        """The images as this engine reads them: its backbone's preprocessing, its decode path."""
        return data.ExtractionDataset(root, relpaths, views=views, seed=seed, draft=draft,
                                      raw_jpeg=self.decode == "tensor", preprocess=self.preprocess)

    def _forward_images(self, views: int) -> int:
        """Files per forward batch: ``batch_size`` images with their views."""
        return max(1, self.batch_size // (1 + views))

    def batches(self, root: str, relpaths: Sequence[str], views: int = 0, seed: int = 0,
                draft: bool = True) -> Iterator[Batch]:
        """Features (and ``views`` augmented views) of every image, one :class:`Batch` per forward batch
        (the loader batches the workers decoded together)."""
        per_forward = self._forward_images(views)
        if self.decodes_in_process(views):
            source = self._decoded_in_threads(root, relpaths, views, seed, draft)
        else:
            source = self.loader(root, relpaths, views, seed, draft)
        with torch.inference_mode():
            group, count = [], 0
            for batch in source:
                group.append(batch)
                count += len(batch["error"])
                if count + len(batch["error"]) > per_forward:
                    yield self._batch(group, views)
                    group, count = [], 0
            if group:
                yield self._batch(group, views)

    def _batch(self, group: List[dict], views: int) -> Batch:
        errors = [e for batch in group for e in batch["error"]]
        n = len(errors)
        feats = np.zeros((n, self.dim), np.float32)
        view_feats = np.zeros((n, views, self.dim), np.float32) if views else None
        # Consecutive decodable rows are slices of the (pinned) loader batches: views, not copies.
        rows, images, flat_views, offset = [], [], [], 0
        jpeg_rows, jpegs = [], []
        for batch in group:
            raw = batch.get("jpeg") or [b""] * len(batch["error"])
            for j, blob in enumerate(raw):
                if blob and not batch["error"][j]:
                    jpeg_rows.append(offset + j)
                    jpegs.append(blob)
            for start, stop in _runs([not e and not b for e, b in zip(batch["error"], raw)]):
                rows.extend(range(offset + start, offset + stop))
                images.append(batch["image"][start:stop])
                if views:
                    flat_views.append(batch["views"][start:stop].flatten(0, 1))
            offset += len(batch["error"])
        if jpegs:
            decoded, failed = self._decode_jpegs(jpegs)
            for row, error in zip(jpeg_rows, failed):
                errors[row] = error
            ok = [row for row, error in zip(jpeg_rows, failed) if not error]
            if ok:
                rows.extend(ok)
                images.append(decoded)
        if rows:
            feats[rows] = self.forward(images)
            if views:
                view_feats[rows] = self.forward(flat_views).reshape(len(rows), views, self.dim)
        index = [i for batch in group for i in batch["index"].tolist()]
        return Batch(index, [h for batch in group for h in batch["sha1"]], errors, feats, view_feats)

    def _decode_jpegs(self, blobs: List[bytes]) -> Tuple[torch.Tensor, List[str]]:
        """JPEG bytes -> normalised (m, 3, crop, crop) on the device, and an error per file ("" when decoded).

        One batched ``decode_jpeg`` call; if it fails, file by file, and a file the tensor
        decoder rejects goes through PIL (:func:`pipeline.data.decode_image`: EXIF, CMYK, ...).
        """
        try:
            tensors = data.decode_jpegs(blobs, self.device)
        except Exception:  # one file spoils the batch call: find it
            tensors = []
            for blob in blobs:
                try:
                    tensors.append(data.decode_jpegs([blob], self.device)[0])
                except Exception:
                    tensors.append(None)
        out, errors = [], []
        eval_tf = None
        for blob, tensor in zip(blobs, tensors):
            try:
                if tensor is None:  # PIL's robust path, on the host
                    eval_tf = eval_tf or data.eval_transform(self.preprocess)
                    out.append(eval_tf(data.decode_image(blob)).to(self.device))
                else:
                    out.append(data.tensor_eval_transform(tensor, self.preprocess))
                errors.append("")
            except Exception as exc:  # a bad image is data, not a crash
                errors.append(f"{type(exc).__name__}: {exc}".splitlines()[0][:200])
        return (torch.stack(out) if out else torch.zeros(0)), errors

    def forward(self, images) -> np.ndarray:
        """Features of ``images`` (n, 3, H, W), or a list of such tensors taken as one, as float32 (n, D);
        at most ``batch_size`` per pass. Each tensor is copied to the device as it is (pinned loader
        batches, no host copy first) and joined there."""
        parts = list(images) if isinstance(images, (list, tuple)) else [images]
        out = []
        with out_of_memory_hint(self.device, self.batch_size), torch.inference_mode():
            parts = [p.to(self.device, non_blocking=True) for p in parts if len(p)]
            joined = (torch.cat(parts) if len(parts) > 1 else parts[0]) if parts else None
            for start in range(0, len(joined) if joined is not None else 0, self.batch_size):
                x = joined[start:start + self.batch_size]
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with numerics(self.device, self.precision):
                    out.append(self.model(x).float())
            result = torch.cat(out) if out else torch.zeros(0, self.dim)
            return result.cpu().numpy()
