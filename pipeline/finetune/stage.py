"""Stage 3: end-to-end training of ResNet18 (the reference protocol's comparison modes).

Modes (``--mode``):

``finetune``  every layer trains, starting from ``--weights``.
``scratch``   every layer trains from a seeded random init (``--weights`` is ignored).
``fixed``     the backbone is frozen, only ``fc`` trains, on augmented images every epoch:
              the tutorial's slow "fixed feature extractor" that the feature cache replaces.
``partial``   the stem and the residual stages before ``--trainable-from layerN`` are frozen.

Nothing is chosen on val. The reported model and accuracy are the final epoch's (the
protocol is a fixed schedule: ``--epochs`` with StepLR), or, with ``--select holdout:F``, the
best epoch on a stratified, seeded fraction ``F`` of *train* held out from training; either
model is then scored once on val and saved as ``model.pt``, the file to reuse. The
tutorial's best-val epoch is still measured each epoch (``history.json``) and recorded as
``best_val_epoch``/``best_val_acc``: chosen on val, so optimistic, and never the result.
``--train-per-class K`` trains on ``K`` seeded images per class (a data-size curve point).

Reproducible and resumable by construction: the shuffling and every augmentation are a pure
function of (seed, epoch, position in the epoch), so a run resumed from ``last.pt`` (saved
after every epoch) ends bit-identical on CPU to an uninterrupted one, whatever the number of
loader processes. Outputs live in ``<cache>/runs/<run name>/`` (see :func:`run_name`); ``metrics.json`` is
written last, so a run without it is unfinished.

Under ``torchrun`` one run trains on every rank (DistributedDataParallel; ``--batch-size`` is the
global batch): the wrapping, each rank's share, synchronised BatchNorm and the gathered
evaluation are ``ddp``; here only rank 0 locks and writes the run folder.

Read top to bottom: :func:`run` makes one :class:`FinetuneRun` per seed; ``_train`` sets up
(or restores) the network and optimiser, then each epoch is :func:`train_one_epoch` and
:func:`evaluate`, saved; ``_finish`` scores the reported model once and writes the record.
Elsewhere: the images and their seeded order (``loaders``), the run folder's files and
checkpoints (``checkpoints``), what the stage returns and prints (``result``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from filelock import FileLock
from torch import nn
from tqdm.auto import tqdm

from .. import backbones, data, distributed, files, metrics, paths
from . import checkpoints, ddp
from .loaders import AugmentedDataset, Loaders, decodable, plan, worker_init
from ..backbones.registry import set_submodule
from ..errors import UserError
from ..features import extraction, store
from ..config import BN_CHOICES, MODES, TRAINABLE_FROM, FinetuneConfig, parse_select
from .checkpoints import RUN_FORMAT, verify_checkpoint  # noqa: F401 (re-exported: tests and export read them here)
from ..features.extraction import default_batch_size, default_workers, loader_batch_size
from .result import FinetuneResult, RunResult
from ..records import RUN_SETTING_KEYS, RunRecord, read_json, setting_digest
from ..versions import TORCH_STACK, library_versions

__all__ = [
    "MODES",
    "BN_CHOICES",
    "TRAINABLE_FROM",
    "RunResult",
    "FinetuneResult",
    "run",
    "run_name",
    "setting_tag",
    "run_dir",
    "Step",
    "train_one_epoch",
    "evaluate",
    "verify_checkpoint",
]

log = logging.getLogger(__name__)

# The network as an ordered list of stages; a mode freezes a prefix of it.
_STAGES = ("stem", "layer1", "layer2", "layer3", "layer4", "pool", "fc")


# --------------------------------------------------------------------------- entry point


def run_name(mode: str, seed: int, select: str = "final", train_per_class: int = 0, setting: str = "",
             backbone: str = "") -> str:
    """``[<backbone>-]<mode>[-k<K>][-holdout<F>][-s<setting>][-<seed>]``: e.g. ``finetune``,
    ``scratch-3``, ``finetune-k8``, ``finetune-holdout0.2``, ``finetune-s1a2b3c4d``,
    ``efficientnet_lite0-finetune``. ``setting`` is :func:`setting_tag`: empty with the default
    training settings (so the usual folders keep their names), else a short hash of them; the
    default backbone keeps the plain names. Runs of other backbones, train subsets, selection
    rules or training settings never share a folder."""
    rule, fraction = parse_select(select)
    name = mode + (f"-k{train_per_class}" if train_per_class else "")
    name += f"-holdout{fraction:g}" if rule == "holdout" else ""
    name += f"-s{setting}" if setting else ""
    return paths.for_backbone(backbone, name if seed == 0 else f"{name}-{seed}")


def setting_tag(cfg: FinetuneConfig) -> str:
    """``""`` when every training setting of :data:`pipeline.records.RUN_SETTING_KEYS` is the
    default, else :func:`pipeline.records.setting_digest` of them (as requested on the command line).
    The backbone is not among them here: the folder name carries it as its prefix."""
    def requested(c: FinetuneConfig) -> dict:
        values = {k: getattr(c, k, None) for k in RUN_SETTING_KEYS}
        values["backbone"] = None
        values["trainable_from"] = c.trainable_from if c.mode == "partial" else None
        return values

    mine = requested(cfg)
    return "" if mine == requested(dataclasses.replace(FinetuneConfig(), mode=cfg.mode)) else setting_digest(mine)


def run_dir(cache: str, mode: str, seed: int, select: str = "final", train_per_class: int = 0,
            setting: str = "", backbone: str = "") -> str:
    return paths.run_dir(cache, run_name(mode, seed, select, train_per_class, setting, backbone))


def run(cfg: FinetuneConfig) -> FinetuneResult:
    """Train (or resume, or find up to date) one run per seed and return their results.

    Raises
    ------
    UserError
        Bad options, unusable data, unavailable weights or device.
    """
    backbone = backbones.get_backbone(cfg.backbone)
    if cfg.mode == "partial" and not _has_stages(backbone):
        raise UserError(f"--mode partial needs a backbone with named stages ({', '.join(TRAINABLE_FROM)}: the "
                        f"torchvision ResNets); {backbone.name} has none: use --mode fixed (classifier only) or "
                        "--mode finetune (every layer)")
    dist = distributed.from_env()
    if not dist.is_distributed:
        return _run_seeds(cfg, backbone, backbones.choose_device(cfg.device), dist)
    # Under torchrun: one run over every rank (DistributedDataParallel, see ddp.py).
    ddp.check_launch(cfg, dist)
    device = backbones.choose_device(distributed.device_spec(cfg.device, dist))
    with distributed.session(dist, device, cfg.dist_timeout) as dist:
        return _run_seeds(cfg, backbone, device, dist)


def _run_seeds(cfg: FinetuneConfig, backbone: backbones.Backbone, device: torch.device,
               dist: distributed.Context) -> FinetuneResult:
    dataset = data.discover(cfg.data)
    precision = backbones.choose_precision(cfg.precision, device)
    # torch's default (one thread per physical core) unless --threads says otherwise.
    threads = cfg.threads or torch.get_num_threads()
    splits, skipped = decodable(dataset, cfg.strict)
    runs = []
    for seed in tuple(cfg.seeds) or (cfg.seed,):
        planned = plan(cfg, seed, splits, dataset.classes)
        ddp.check_train_size(len(planned["train"]), dist)
        runs.append(_run_one(FinetuneRun(cfg, seed, dataset, planned, skipped, device, precision, backbone, dist),
                             threads))
    return FinetuneResult(runs, skipped, primary=dist.is_primary)


@dataclass
class FinetuneRun:
    """What one run (one mode, one seed) shares from start-up to ``metrics.json``: the settings,
    the images it trains, selects and is scored on, the device, and (from :func:`_run_one` on)
    the initial weights and the settings that key its folder."""

    cfg: FinetuneConfig
    seed: int
    dataset: data.DataSet
    splits: Dict[str, List[data.Item]]  # this run's train, val and (--select holdout:F) holdout
    skipped: List[dict]  # undecodable images of the data set (all runs)
    device: torch.device
    precision: str
    backbone: backbones.Backbone
    dist: distributed.Context = distributed.Context()  # the ranks of a torchrun launch (world size 1 without)
    weights: Optional[backbones.Weights] = None
    settings: dict = field(default_factory=dict)  # everything that shapes the trajectory
    key: str = ""  # store.settings_key(settings)

    @property
    def name(self) -> str:
        return run_name(self.cfg.mode, self.seed, self.cfg.select, self.cfg.train_per_class, setting_tag(self.cfg),
                        self.backbone.name)

    @property
    def directory(self) -> str:
        return paths.run_dir(self.cfg.cache, self.name)

    def file(self, name: str) -> str:
        return os.path.join(self.directory, name)

    @property
    def shows(self) -> bool:
        """Whether this process prints progress (under torchrun, rank 0 alone does)."""
        return self.cfg.progress and self.dist.is_primary


# --------------------------------------------------------------------------- one run


def _run_one(ctx: FinetuneRun, threads: int) -> RunResult:
    dist = ctx.dist
    # Rank 0 first: it may download the weights, then every rank finds them cached.
    ctx.weights = dist.primary_first("weights", lambda: _initial_weights(ctx.cfg, ctx.seed))
    ctx.settings = _settings(ctx)
    ctx.key = store.settings_key(ctx.settings)
    with contextlib.ExitStack() as stack:
        # Rank 0 alone locks, cleans and reads the run folder; the other ranks then read last.pt.
        found = dist.collective("resume", lambda: _previous(ctx, stack), run=dist.is_primary)
        status = dist.meet("resume", value=found and (found[0] is not None, found[1] is not None))[0]
        done, ckpt = found if dist.is_primary else _previous_of_primary(ctx, *status)
        if done is not None:
            return RunResult(ctx.name, ctx.directory, done, up_to_date=True)
        # A resumed run keeps its thread count: CPU reductions split by thread, and
        # bit-identical resumption needs the same split.
        threads = ckpt["config"].get("threads", threads) if ckpt is not None else threads
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with extraction.out_of_memory_hint(ctx.device, ctx.cfg.batch_size), \
                    extraction.exact_fp32(ctx.device, ctx.precision):
                return _train(ctx, ckpt)
        finally:
            torch.set_num_threads(previous)


def _previous(ctx: FinetuneRun, stack: contextlib.ExitStack) -> Tuple[Optional[RunRecord], Optional[dict]]:
    """(complete record, checkpoint to resume) of the run folder, under its lock (held until ``stack`` closes)."""
    os.makedirs(ctx.directory, exist_ok=True)
    stack.enter_context(FileLock(ctx.file(".lock")))
    files.remove_temporaries(ctx.directory)
    if ctx.cfg.rebuild:
        checkpoints.clear(ctx.directory)
    done, ckpt = checkpoints.previous(ctx.directory, ctx.key, ctx.cfg.epochs)
    if done is None:
        ddp.check_resume(ckpt, ctx.dist, ctx.file(paths.RUN_LAST))
    return done, ckpt


def _previous_of_primary(ctx: FinetuneRun, done: bool, resume: bool) -> Tuple[Optional[RunRecord], Optional[dict]]:
    """What rank 0 found, read back by another rank (rank 0 has checked and cleaned the folder)."""
    if done:
        return RunRecord.from_json(read_json(ctx.file(paths.RUN_METRICS))), None
    return None, checkpoints.load(ctx.file(paths.RUN_LAST)) if resume else None


@dataclass
class _Training:
    """One run's training state: what it trains with, and how far it got (what last.pt holds)."""

    net: _Net
    step: Step
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loaders: Loaders
    meta: dict = field(default_factory=dict)  # what every checkpoint of the run carries besides its state
    history: List[dict] = field(default_factory=list)
    start: int = 0  # epochs taken over from last.pt
    selected_score: float = -1.0  # --select holdout:F only
    selected_epoch: int = 0
    model_sha256: str = ""  # of model.pt as last saved


def _train(ctx: FinetuneRun, ckpt: Optional[dict]) -> RunResult:
    t = _setup(ctx, ckpt)
    dist = ctx.dist
    for epoch in range(t.start, ctx.cfg.epochs):
        t.history.append(_epoch(ctx, t, epoch))
        # Selection looks at the held-out train images only; val_acc is never read here.
        improved = t.loaders.holdout is not None and t.history[-1]["holdout_acc"] > t.selected_score
        if improved:
            t.selected_score, t.selected_epoch = t.history[-1]["holdout_acc"], epoch + 1
        # Rank 0 alone writes (every rank holds the same weights); the others wait for it.
        dist.collective("checkpoint", lambda: _save_epoch(ctx, t, epoch, improved), run=dist.is_primary)
    if t.loaders.holdout is None:  # the fixed schedule's result: the final epoch's model
        t.selected_epoch = len(t.history)
        dist.collective("model.pt", lambda: setattr(t, "model_sha256", _save_model(ctx, t, "final")),
                        run=dist.is_primary)
    return RunResult(ctx.name, ctx.directory, _finish(ctx, t), resumed_from=t.start)


def _save_epoch(ctx: FinetuneRun, t: _Training, epoch: int, improved: bool) -> None:
    """model.pt when the held-out choice improved, history.json, then last.pt (the resume point)."""
    if improved:
        t.model_sha256 = _save_model(ctx, t, "holdout")
    checkpoints.save_json({"epochs": t.history}, ctx.file(paths.RUN_HISTORY))
    checkpoints.save(dict(t.meta, model=checkpoints.cpu_state(t.net.model), optimizer=t.step.optimizer.state_dict(),
                          scheduler=t.scheduler.state_dict(),
                          scaler=t.step.scaler.state_dict() if t.step.scaler else None,
                          epoch=epoch + 1, selected_score=t.selected_score, selected_epoch=t.selected_epoch,
                          model_sha256=t.model_sha256, history=t.history,
                          rng=checkpoints.rng_state(t.loaders.generator, t.loaders.sampler)),
                     ctx.file(paths.RUN_LAST))


def _setup(ctx: FinetuneRun, ckpt: Optional[dict]) -> _Training:
    """The network, optimiser, schedule and loaders of a run, restored from ``ckpt`` (last.pt) if given."""
    cfg, device, precision = ctx.cfg, ctx.device, ctx.precision
    net = _build(ctx)
    # Under torchrun, BatchNorm that trains sees the whole step's images, over every rank.
    synced = ddp.sync_batchnorm([net.trainable] + ([] if net.bn_frozen else [net.frozen]), device, ctx.dist)
    params = [p for p in net.model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay, foreach=True)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    loaders = _loaders(ctx, net)
    step = Step(net, optimizer, scaler, device, precision, cfg.channels_last,
                ddp.per_rank_batch(cfg.batch_size, ctx.dist), pass_batch_size(cfg, device), dist=ctx.dist)
    t = _Training(net, step, scheduler, loaders)
    if ckpt is not None:
        net.model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        t.history, t.start = ckpt["history"], ckpt["epoch"]
        t.selected_score, t.selected_epoch = ckpt["selected_score"], ckpt["selected_epoch"]
        t.model_sha256 = ckpt.get("model_sha256", "")
        checkpoints.restore_rng(ckpt["rng"], loaders.generator)
        _say(f"{ctx.name}: resuming after epoch {t.start} of {cfg.epochs} from {ctx.file(paths.RUN_LAST)}",
             ctx.shows)
    net.finalize(cfg.channels_last)
    step.forward = ddp.wrap(net.trainable, device, ctx.dist)
    t.meta = {"format": RUN_FORMAT, "format_version": checkpoints.RUN_FORMAT_VERSION, "key": ctx.key,
              "name": ctx.name, "mode": cfg.mode, "classes": ctx.dataset.classes,
              "config": dict(_resolved_config(ctx, loaders), sync_batchnorm_layers=synced),
              "weights_id": ctx.weights.id, "pretrained": ctx.weights.pretrained}
    return t


def _save_model(ctx: FinetuneRun, t: _Training, selected_on: str) -> str:
    """Save the reported model (the selected epoch's) as model.pt; returns its sha256."""
    return checkpoints.save(dict(t.meta, model=checkpoints.cpu_state(t.net.model), epoch=t.selected_epoch, selected_on=selected_on),
                    ctx.file(paths.RUN_MODEL))


def _epoch(ctx: FinetuneRun, t: _Training, epoch: int) -> dict:
    cfg, step, loaders = ctx.cfg, t.step, t.loaders
    started = time.perf_counter()
    lr = step.optimizer.param_groups[0]["lr"]
    loaders.sampler.set_epoch(epoch)
    bar = tqdm(total=len(loaders.sampler), unit="img", desc=f"{ctx.name} {epoch + 1}/{cfg.epochs}", leave=False,
               disable=not ctx.shows, dynamic_ncols=True)
    try:
        train_loss, train_acc = train_one_epoch(step, loaders.train, bar)
    finally:
        bar.close()
    t.scheduler.step()
    train_seconds = time.perf_counter() - started
    record = {"epoch": epoch + 1, "train_loss": train_loss, "train_acc": train_acc, "lr": lr}
    shown = ""
    if epoch + 1 == cfg.epochs or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0):  # --eval-every
        val_started = time.perf_counter()
        with _pass_hint(ctx):
            val_loss, pred, _ = evaluate(step, loaders.val)
        record.update(val_loss=val_loss, val_acc=float((pred == loaders.val_labels).mean()),
                      val_seconds=time.perf_counter() - val_started)
        shown = f"val loss {val_loss:.4f} acc {record['val_acc']:.4f}  "
    held = ""
    if loaders.holdout is not None:
        with _pass_hint(ctx):
            hold_loss, hold_pred, _ = evaluate(step, loaders.holdout)
        record.update(holdout_loss=hold_loss, holdout_acc=float((hold_pred == loaders.holdout_labels).mean()))
        held = f"  holdout acc {record['holdout_acc']:.4f}"
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    seconds = time.perf_counter() - started
    _say(f"{ctx.name} epoch {epoch + 1}/{cfg.epochs}  train loss {train_loss:.4f} acc {train_acc:.4f}  "
         f"{shown}{held.strip()}  lr {lr:.2g}  {seconds:.1f} s", ctx.shows)
    return dict(record, seconds=seconds, train_seconds=train_seconds)


def pass_batch_size(cfg: FinetuneConfig, device: torch.device) -> int:
    """Images per pass without gradients (val, holdout, frozen-prefix chunks): ``--eval-batch-size``,
    else max(``--batch-size``, the device's extraction batch)."""
    return cfg.eval_batch_size or max(cfg.batch_size, default_batch_size(device))


def _pass_hint(ctx: FinetuneRun, applies: bool = True):
    """Out of memory in a pass of :func:`pass_batch_size` images: one line naming ``--eval-batch-size``."""
    if not applies:
        return contextlib.nullcontext()
    return extraction.out_of_memory_hint(ctx.device, pass_batch_size(ctx.cfg, ctx.device), "--eval-batch-size")


def _selection(ctx: FinetuneRun, t: _Training) -> dict:
    """How the reported model was chosen (recorded in metrics.json): never on val."""
    rule, fraction = parse_select(ctx.cfg.select)
    out = {"rule": rule, "selected_epoch": t.selected_epoch, "scored_on": "val"}
    if rule == "final":
        out["selected_on"] = "nothing: the final epoch of the fixed schedule"
    else:
        holdout = ctx.splits["holdout"]
        out.update(selected_on="held-out train images", fraction=fraction, holdout_n=len(holdout),
                   holdout=[i.relpath for i in holdout],
                   holdout_acc=t.history[t.selected_epoch - 1]["holdout_acc"])
    return out


def _finish(ctx: FinetuneRun, t: _Training) -> RunRecord:
    """Score the reported model (model.pt) once on val; write metrics.json (last: it marks the run complete)."""
    cfg, history, splits = ctx.cfg, t.history, ctx.splits
    best_path = ctx.file(paths.RUN_MODEL)

    def load_reported() -> None:
        if t.model_sha256:  # rank 0 (which wrote it) checks it
            verify_checkpoint(best_path, t.model_sha256)
        t.net.model.load_state_dict(torch.load(best_path, map_location="cpu", weights_only=True)["model"])

    ctx.dist.collective("model.pt", load_reported)
    started = time.perf_counter()
    with _pass_hint(ctx):
        _, pred, proba = evaluate(t.step, t.loaders.val)
    predict_seconds = time.perf_counter() - started
    items = t.loaders.val_items
    result = metrics.evaluate([i.label for i in items], pred, ctx.dataset.classes,
                              paths=[i.relpath for i in items], proba=proba)
    trainable, total = t.net.parameters()
    train_seconds = sum(h.get("train_seconds", h["seconds"]) for h in history)
    # The tutorial's number, for reference only: the first epoch with the highest val accuracy
    # (of the epochs with a val pass: --eval-every).
    best_val = 1 + int(np.argmax([h.get("val_acc", -1.0) for h in history]))
    record = RunRecord(
        name=ctx.name,
        mode=cfg.mode,
        seed=ctx.seed,
        metrics=result,
        selection=_selection(ctx, t),
        best_val_epoch=best_val,
        best_val_acc=history[best_val - 1]["val_acc"],
        train_per_class=cfg.train_per_class,
        backbone=ctx.backbone.name,
        train_images=len(splits["train"]) + len(splits.get("holdout", [])),
        train_subset=[i.relpath for i in splits["train"]] if cfg.train_per_class else None,
        epochs=len(history),
        total_seconds=float(sum(h["seconds"] for h in history)),
        eval_seconds=float(sum(h.get("val_seconds", 0.0) for h in history)),
        epoch_seconds=[h["seconds"] for h in history],
        images_per_s=t.loaders.n_train * len(history) / train_seconds if train_seconds else 0.0,
        predict_ms_per_image=1000.0 * predict_seconds / max(1, len(items)),
        trainable_parameters=trainable,
        total_parameters=total,
        device=str(ctx.device),
        world_size=ctx.dist.world_size,
        sync_batchnorm=bool(t.meta["config"].get("sync_batchnorm_layers")),
        precision=ctx.precision,
        weights=ctx.weights.ref,
        classes=ctx.dataset.classes,
        data_root=ctx.dataset.root,
        config=t.meta["config"],
        versions=library_versions(*TORCH_STACK),
        size_bytes=os.path.getsize(best_path),
        checkpoint=os.path.basename(best_path),
        checkpoints={paths.RUN_MODEL: t.model_sha256 or files.file_digest(best_path, "sha256"),  # hashed when saved
                     paths.RUN_LAST: files.file_digest(ctx.file(paths.RUN_LAST), "sha256")},
        skipped=ctx.skipped,
        key=ctx.key,
        settings=ctx.settings,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    ctx.dist.collective("metrics.json", lambda: checkpoints.save_json(record.to_json(), ctx.file(paths.RUN_METRICS)),
                        run=ctx.dist.is_primary)
    return record


# --------------------------------------------------------------------------- one epoch


@dataclass
class Step:
    """What one optimiser step needs (the network, optimiser, scaler and how to run them):
    the first argument of :func:`train_one_epoch` and :func:`evaluate`."""

    net: _Net
    optimizer: torch.optim.Optimizer
    scaler: Optional[torch.amp.GradScaler]
    device: torch.device
    precision: str
    channels_last: bool
    batch_size: int  # images per optimiser step on this process (under torchrun: the global batch / ranks)
    pass_batch_size: int = 0  # images per frozen-prefix chunk (chunked modes): for the out-of-memory hint
    dist: distributed.Context = distributed.Context()
    forward: Optional[nn.Module] = None  # what trains: net.trainable, under DistributedDataParallel with torchrun


def _prefix_hint(s: Step):
    """A frozen-prefix chunk holds ``--eval-batch-size`` images: an out-of-memory there names that option."""
    if not (s.net.chunked and len(s.net.frozen)):
        return contextlib.nullcontext()
    return extraction.out_of_memory_hint(s.device, s.pass_batch_size, "--eval-batch-size")


def _to_device(images: torch.Tensor, s: Step) -> torch.Tensor:
    x = images.to(s.device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if s.channels_last else x


def train_one_epoch(s: Step, loader: torch.utils.data.DataLoader, bar) -> Tuple[float, float]:
    """One pass over train; returns (mean loss, accuracy). One host sync per progress update.

    Under torchrun every rank takes the same number of optimiser steps (see ``ddp``): a rank
    whose share of the last, short step is empty steps with an empty batch. Loss and accuracy
    are over every rank's images.
    """
    s.net.train_mode()
    forward = s.forward if s.forward is not None else s.net.trainable
    sizes = loader.sampler.step_sizes() if s.dist.is_distributed else None  # images per step, all ranks
    loss_sum = torch.zeros((), device=s.device)
    correct = torch.zeros((), dtype=torch.int64, device=s.device)
    seen, shown, steps, f, t = 0, time.perf_counter(), 0, None, None
    for images, labels in loader:
        x, y = _to_device(images, s), labels.to(s.device, non_blocking=True)
        with backbones.autocast(s.device, s.precision), _prefix_hint(s):
            feats = s.net.features(x)
        for start in range(0, y.shape[0], s.batch_size):
            f, t = feats[start:start + s.batch_size], y[start:start + s.batch_size]
            loss, out = _optimise(s, forward, f, t, sizes[steps] if sizes else 0)
            loss_sum += loss
            correct += (out.argmax(1) == t).sum()
            seen += t.shape[0]
            steps += 1
        bar.update(y.shape[0])
        if not bar.disable and time.perf_counter() - shown > 0.5:
            shown = time.perf_counter()
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", acc=f"{correct.item() / seen:.3f}")
    while sizes and steps < len(sizes):  # this rank's share of the last step is empty
        _optimise(s, forward, f[:0], t[:0], sizes[steps])
        steps += 1
    if s.dist.is_distributed:
        loss_sum, correct = ddp.all_sum(loss_sum, s.dist), ddp.all_sum(correct, s.dist)
        seen = sum(sizes)
    return loss_sum.item() / seen, correct.item() / seen


def _optimise(s: Step, forward: nn.Module, f: torch.Tensor, t: torch.Tensor,
              step_images: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step on ``f``; returns (summed loss of its images, logits), detached.

    ``step_images``: images in the step over every rank (torchrun), 0 for a single process. A
    rank's loss is then its summed loss times ``world_size / step_images``: the gradient average
    of DistributedDataParallel is the gradient of the mean over the whole step.
    """
    with backbones.autocast(s.device, s.precision):
        out = forward(f)
    if step_images:
        summed = F.cross_entropy(out.float(), t, reduction="sum")
        loss = summed * (s.dist.world_size / step_images)
    else:
        loss = F.cross_entropy(out.float(), t)
        summed = loss.detach() * t.shape[0]
    s.optimizer.zero_grad(set_to_none=True)
    if s.scaler is not None:
        s.scaler.scale(loss).backward()
        s.scaler.step(s.optimizer)
        s.scaler.update()
    else:
        loss.backward()
        s.optimizer.step()
    return summed.detach(), out.detach()


def evaluate(s: Step, loader: torch.utils.data.DataLoader) -> Tuple[float, np.ndarray, np.ndarray]:
    """Mean loss, predictions and probabilities on a split, in eval mode under inference_mode.

    Under torchrun each rank evaluates its share (``ddp.eval_sampler``) and the logits of every
    rank are gathered back into data-set order, so every rank returns the whole split's.
    """
    was_training = s.net.model.training
    s.net.model.eval()
    logits, labels = [], []
    try:
        with torch.inference_mode(), backbones.autocast(s.device, s.precision):
            for images, y in loader:
                logits.append(s.net.trainable(s.net.features(_to_device(images, s))).float())
                labels.append(y.to(s.device, non_blocking=True))
    finally:
        s.net.model.train(was_training)
    out, y = torch.cat(logits), torch.cat(labels)
    if s.dist.is_distributed:
        n = len(loader.dataset)
        out, y = ddp.gather_rows(out, n, s.dist), ddp.gather_rows(y, n, s.dist)
    loss = F.cross_entropy(out, y).item()
    return loss, out.argmax(1).cpu().numpy(), out.softmax(1).cpu().numpy()


# --------------------------------------------------------------------------- the network


def _has_stages(backbone: backbones.Backbone) -> bool:
    """Torchvision's ResNets have the named stages of ``--trainable-from`` (stem, layer1..4, pool, fc)."""
    return backbone.library == "torchvision" and (backbone.arch.startswith(("resnet", "resnext", "wide_resnet")))


def _resnet_stages(model: nn.Module) -> Dict[str, List[nn.Module]]:
    return {
        "stem": [model.conv1, model.bn1, model.relu, model.maxpool],
        "layer1": [model.layer1], "layer2": [model.layer2],
        "layer3": [model.layer3], "layer4": [model.layer4],
        "pool": [model.avgpool, nn.Flatten(1)], "fc": [model.fc],
    }


class _Body(nn.Module):
    """A network up to its classifier's input (the pooled pre-logits), for backbones without named
    stages: the whole forward with the classifier bypassed. Swapping the module for the call keeps
    one network (one state_dict, the library's own forward) instead of a rebuilt copy."""

    def __init__(self, model: nn.Module, head: str):
        super().__init__()
        self.model = model
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        classifier = self.model.get_submodule(self.head)
        set_submodule(self.model, self.head, nn.Identity())
        try:
            return self.model(x)
        finally:
            set_submodule(self.model, self.head, classifier)


class _Net:
    """The network split into a frozen prefix and a trainable suffix (views of the same modules).

    ResNets split at their named stages (``stem``, ``layer1``…``layer4``, ``pool``, ``fc``); any
    other backbone at its classifier (``body``, ``fc``): ``fixed`` trains the classifier alone,
    ``finetune``/``scratch`` train everything.

    ``prefix`` is what runs the frozen part: with normalisation frozen in eval mode it is (for
    ResNets, a conv+BN-fused copy; frozen weights never change, so the copy never goes stale)
    run under ``no_grad``; its output does not depend on how images are batched, which lets it
    run on large chunks while the optimiser still steps on batches of ``batch_size``.
    """

    def __init__(self, model: nn.Module, mode: str, trainable_from: str, bn: str, backbone: backbones.Backbone):
        self.model = model
        self.fusable = _has_stages(backbone)
        if self.fusable:
            order, stages = _STAGES, _resnet_stages(model)
        else:
            head = backbones.classifier_path(backbone)
            order, stages = ("body", "fc"), {"body": [_Body(model, head)], "fc": [model.get_submodule(head)]}
        first = {"finetune": 0, "scratch": 0, "fixed": order.index("fc"),
                 "partial": order.index(trainable_from) if trainable_from in order else -1}[mode]
        if first < 0:
            raise UserError(f"--mode partial needs named stages ({', '.join(TRAINABLE_FROM)}); {backbone.name} has "
                            "none: use --mode fixed or --mode finetune")
        frozen = [m for s in order[:first] for m in stages[s]]
        self.frozen = nn.Sequential(*frozen)
        self.trainable = nn.Sequential(*[m for s in order[first:] for m in stages[s]])
        self.frozen.requires_grad_(False)
        self.trainable.requires_grad_(True)  # a body holds the classifier too: it stays trainable
        self.bn_frozen = bn == "frozen-eval"
        self.prefix: nn.Module = self.frozen
        # Chunking the prefix is exact only when its output ignores batch composition.
        self.chunked = bool(frozen) and self.bn_frozen

    def finalize(self, channels_last: bool) -> None:
        """Call after the model's weights and device are final."""
        if self.chunked and self.fusable:
            from torch.fx.experimental.optimization import fuse

            self.frozen.eval()
            self.prefix = fuse(self.frozen, inplace=False).eval().requires_grad_(False)
            if channels_last:
                self.prefix = self.prefix.to(memory_format=torch.channels_last)

    def train_mode(self) -> None:
        self.model.train()
        if self.bn_frozen:
            self.frozen.eval()  # every frozen normalisation layer keeps its running statistics

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if not len(self.frozen):
            return x
        with torch.no_grad():
            if self.bn_frozen:
                self.prefix.eval()
            return self.prefix(x)

    def parameters(self) -> Tuple[int, int]:
        total = sum(p.numel() for p in self.model.parameters())
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return trainable, total


def _initial_weights(cfg: FinetuneConfig, seed: int) -> backbones.Weights:
    # From scratch means random init whatever --weights says: the control of the protocol.
    return backbones.resolve_weights("random" if cfg.mode == "scratch" else cfg.weights, seed, cfg.backbone)


def _build(ctx: FinetuneRun) -> _Net:
    cfg = ctx.cfg
    with data.seeded(ctx.seed):  # the new fc layer's init
        model = backbones.build_model(ctx.weights, num_classes=len(ctx.dataset.classes))
    model = model.to(ctx.device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return _Net(model, cfg.mode, cfg.trainable_from, cfg.bn, ctx.backbone)


# --------------------------------------------------------------------------- data


def _loaders(ctx: FinetuneRun, net: _Net) -> Loaders:
    cfg, root, splits, seed, device = ctx.cfg, ctx.dataset.root, ctx.splits, ctx.seed, ctx.device
    preprocess = ctx.backbone.preprocess()
    workers = default_workers(device) if cfg.workers < 0 else cfg.workers
    big = pass_batch_size(cfg, device)
    # Frozen-prefix modes load chunks of whole optimiser batches, so the prefix runs batched.
    batch = ddp.per_rank_batch(cfg.batch_size, ctx.dist)  # the global batch under torchrun, split over the ranks
    train_batch = max(1, big // batch) * batch if net.chunked else batch
    sampler = ddp.train_sampler(len(splits["train"]), seed, cfg.batch_size, ctx.dist)
    generator = torch.Generator().manual_seed(seed)
    common = dict(num_workers=workers, pin_memory=device.type == "cuda", worker_init_fn=worker_init,
                  persistent_workers=workers > 0, prefetch_factor=4 if workers else None)
    train = torch.utils.data.DataLoader(
        AugmentedDataset(root, splits["train"], data.train_transform(preprocess)), batch_size=train_batch,
        sampler=sampler, generator=generator, **common)
    val_set = data.ImageDataset(root, splits["val"], data.eval_transform(preprocess))
    val = torch.utils.data.DataLoader(val_set, batch_size=loader_batch_size(big, workers, len(splits["val"])),
                                      sampler=ddp.eval_sampler(val_set, ctx.dist), **common)
    loaders = Loaders(train, val, sampler, generator, list(splits["val"]),
                       np.array([item.label for item in splits["val"]]), len(splits["train"]))
    if splits.get("holdout"):
        hold_set = data.ImageDataset(root, splits["holdout"], data.eval_transform(preprocess))
        loaders.holdout = torch.utils.data.DataLoader(
            hold_set, batch_size=loader_batch_size(big, workers, len(splits["holdout"])),
            sampler=ddp.eval_sampler(hold_set, ctx.dist), **common)
        loaders.holdout_labels = np.array([i.label for i in splits["holdout"]])
    return loaders


# --------------------------------------------------------------------------- settings


def _items_digest(root: str, items: Sequence[data.Item]) -> str:
    """Paths, labels and file stats: a changed image means a different run."""
    h = hashlib.sha256()
    for item in items:
        st = os.stat(os.path.join(root, item.relpath))
        h.update(f"{item.relpath}\0{item.label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8"))
    return h.hexdigest()


def _settings(ctx: FinetuneRun) -> dict:
    """Everything that shapes the trajectory of a run (not the epoch count, not the workers)."""
    cfg, seed, weights, dataset, splits = ctx.cfg, ctx.seed, ctx.weights, ctx.dataset, ctx.splits
    device, precision, preprocess = ctx.device, ctx.precision, ctx.backbone.preprocess()
    return {
        "format_version": checkpoints.RUN_FORMAT_VERSION,
        "backbone": ctx.backbone.name,
        "mode": cfg.mode,
        "trainable_from": cfg.trainable_from if cfg.mode == "partial" else None,
        "bn": cfg.bn,
        "seed": seed,
        "select": cfg.select,
        "train_per_class": cfg.train_per_class,
        "weights_sha256": weights.sha256,
        "batch_size": cfg.batch_size, "lr": cfg.lr, "momentum": cfg.momentum,
        "weight_decay": cfg.weight_decay, "step_size": cfg.step_size, "gamma": cfg.gamma,
        "precision": precision, "device_type": device.type, "channels_last": cfg.channels_last,
        "chunk": cfg.eval_batch_size or default_batch_size(device),
        "transform": {"train": repr(data.train_transform(preprocess)), "eval": repr(data.eval_transform(preprocess))},
        "data_root": dataset.root,
        "classes": dataset.classes,
        "data": {split: _items_digest(dataset.root, items) for split, items in splits.items()},
    }


def _resolved_config(ctx: FinetuneRun, loaders: Loaders) -> dict:
    cfg, weights = ctx.cfg, ctx.weights
    resolved = dataclasses.asdict(cfg)
    resolved.update(seed=ctx.seed, seeds=list(cfg.seeds), device=str(ctx.device), precision=ctx.precision,
                    weights=weights.spec, weights_id=weights.id, workers=loaders.train.num_workers,
                    data=os.path.abspath(cfg.data), cache=os.path.abspath(cfg.cache),
                    threads=torch.get_num_threads(), world_size=ctx.dist.world_size)
    return resolved


def _say(message: str, progress: bool) -> None:
    if progress:
        tqdm.write(message, file=sys.stderr)
    else:
        log.info(message)
