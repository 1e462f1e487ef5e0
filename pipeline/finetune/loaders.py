"""The images of an end-to-end run and how they are drawn: which decode (:func:`decodable`), which
a run trains, selects and is scored on (:func:`plan`), and the seeded order and augmentation of
each epoch (:class:`EpochSampler`, :class:`AugmentedDataset`): a pure function of (seed, epoch,
position), so a resumed run sees the same images whatever the number of loader processes.
"""
from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from .. import data
from ..data import splits as subsets
from ..config import FinetuneConfig, parse_select
from ..errors import UserError

__all__ = ["decodable", "plan", "EpochSampler", "AugmentedDataset", "worker_init", "Loaders"]

log = logging.getLogger(__name__)


def decodable(dataset: data.DataSet, strict: bool) -> Tuple[Dict[str, List[data.Item]], List[dict]]:
    """Decode every image once, up front, so a bad file can never stop training mid-epoch."""
    splits: Dict[str, List[data.Item]] = {}
    skipped: List[dict] = []
    for split, items in dataset.splits.items():
        good = []
        for item in items:
            try:
                if os.path.getsize(dataset.path(item)) == 0:
                    raise ValueError("empty file (0 bytes)")
                data.load_image(dataset.path(item))
            except Exception as exc:  # a bad image is data, not a crash
                reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
                if strict:
                    raise UserError(f"cannot decode {dataset.path(item)!r} ({reason}); remove or fix "
                                    "the file, or drop --strict to skip it") from None
                skipped.append({"split": split, "path": item.relpath, "reason": reason})
                continue
            good.append(item)
        splits[split] = good
    for split in ("train", "val"):
        if not splits[split]:
            raise UserError(f"no decodable images in {os.path.join(dataset.root, split)!r}; "
                            "add images (every file there failed to decode)")
    if skipped:
        log.warning("skipping %d undecodable image(s), e.g. %s", len(skipped), skipped[0]["path"])
    return splits, skipped


def _mix(*values: int) -> int:
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1, np.uint64)[0] >> 1)


class EpochSampler(torch.utils.data.Sampler):
    """Yields ``(index, augmentation seed)``: a permutation and seeds fixed by (seed, epoch)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(_mix(self.seed, self.epoch))
        order = torch.randperm(self.n, generator=g).tolist()
        seeds = torch.randint(0, 2 ** 62, (self.n,), generator=g).tolist()
        return iter(zip(order, seeds))


class AugmentedDataset(data.ImageDataset):
    """Training images whose random augmentation is seeded per sample (worker-count independent)."""

    def __getitem__(self, key):
        index, aug_seed = key
        with data.seeded(aug_seed):
            return super().__getitem__(index)


def worker_init(worker_id: int) -> None:
    # Augmentations are seeded per sample; seed the other libraries too, in case a
    # transform ever uses them.
    seed = torch.initial_seed() % 2 ** 32
    np.random.seed(seed)
    random.seed(seed)


@dataclass
class Loaders:
    """The loaders of one run and what resuming and scoring need of them."""

    train: torch.utils.data.DataLoader
    val: torch.utils.data.DataLoader
    sampler: EpochSampler
    generator: torch.Generator
    val_items: List[data.Item]
    val_labels: np.ndarray
    n_train: int
    holdout: Optional[torch.utils.data.DataLoader] = None  # --select holdout:F: train images held out
    holdout_labels: Optional[np.ndarray] = None


def plan(cfg: FinetuneConfig, seed: int, splits: Dict[str, List[data.Item]],
          classes: List[str]) -> Dict[str, List[data.Item]]:
    """The images one run trains on, selects on (``holdout``, from train) and is scored on (``val``).

    Every subset is drawn from train by class labels and ``seed`` alone (``pipeline.data.splits``).
    """
    train = list(splits["train"])
    labels = np.array([i.label for i in train])
    if cfg.train_per_class:
        counts = np.bincount(labels, minlength=len(classes))
        if cfg.train_per_class > counts.min():
            small = classes[int(counts.argmin())]
            raise UserError(f"--train-per-class {cfg.train_per_class} exceeds the {counts.min()} train images of "
                            f"class {small!r}; use at most {counts.min()}, or 0 for every train image")
        # The data-size curve's subset of this k and number: the heads' subset ``seed`` holds the same images.
        train = [train[i] for i in subsets.train_subset(labels, cfg.train_per_class, seed,
                                                        keys=[i.relpath for i in train])]
    plan = {"train": train, "val": list(splits["val"])}
    rule, fraction = parse_select(cfg.select)
    if rule == "holdout":
        try:
            fit, hold = subsets.holdout_split([i.label for i in train], fraction, seed)
        except ValueError as exc:
            raise UserError(f"--select {cfg.select}: {exc}; use another fraction or more train images") from None
        plan["train"], plan["holdout"] = [train[i] for i in fit], [train[i] for i in hold]
    return plan
