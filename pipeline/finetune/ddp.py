"""End-to-end runs under ``torchrun``: DistributedDataParallel, sharded data and gathered evaluation.

One run, several ranks (``pipeline.distributed`` reads the launch and joins the process group):

- ``--batch-size`` stays the **global** batch: each optimiser step takes ``batch_size`` images of
  the seeded epoch order (:class:`ShardedEpochSampler`), split into ``world_size`` contiguous
  parts, one per rank. The loss of a rank is its images' summed loss times
  ``world_size / images in the step``, so DistributedDataParallel's gradient average is the
  gradient of the step's mean loss, exactly as one process computes it, the last (short) step
  included: a rank with no image in it still takes part, with an empty batch.
- Where BatchNorm trains, its batch statistics are synchronised over the ranks
  (:func:`sync_batchnorm`): ``torch.nn.SyncBatchNorm`` on GPUs, :class:`CpuSyncBatchNorm2d`
  (the same statistics through a differentiable all-reduce over gloo) on CPU.
- Val, holdout and test passes are sharded with ``torch.utils.data.DistributedSampler``
  semantics (every ``world_size``-th image, the last ones padded by wrapping around) and the
  logits gathered back into data-set order with the padding dropped (:func:`gather_rows`), so
  every metric is the one a single process computes.

Nothing here runs without ``torchrun``: with world size 1 each helper returns what a single
process uses.
"""
from __future__ import annotations

import logging
import warnings
from typing import Iterable, List, Optional

import torch
from torch import nn

from .. import distributed
from ..config import FinetuneConfig
from ..errors import UserError
from .loaders import EpochSampler

__all__ = [
    "bn_trains",
    "check_launch",
    "check_train_size",
    "check_resume",
    "per_rank_batch",
    "ShardedEpochSampler",
    "train_sampler",
    "eval_sampler",
    "CpuSyncBatchNorm2d",
    "sync_batchnorm",
    "wrap",
    "gather_rows",
    "all_sum",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- launch checks


def bn_trains(cfg: FinetuneConfig) -> bool:
    """Whether some BatchNorm layer updates its statistics from training batches in this run:
    every mode but ``fixed`` trains some BatchNorm layers, and ``--bn train`` all of them."""
    return cfg.mode != "fixed" or cfg.bn == "train"


def per_rank_batch(batch_size: int, ctx: distributed.Context) -> int:
    return batch_size // ctx.world_size


def check_launch(cfg: FinetuneConfig, ctx: distributed.Context) -> None:
    """Refuse, before joining the process group, a launch that cannot train as asked.

    Raises
    ------
    UserError
        The global batch does not split evenly over the ranks; BatchNorm trains and a rank
        would get fewer than 2 images per step; ``--device`` asks for GPUs and this node has
        fewer than the ranks torchrun started on it.
    """
    world, batch = ctx.world_size, cfg.batch_size
    if not ctx.is_distributed:
        return
    if batch % world:
        raise UserError(f"--batch-size {batch} is the global batch and does not split evenly over {world} ranks; "
                        f"use a multiple of {world} (e.g. {world * max(1, round(batch / world))})")
    if bn_trains(cfg) and batch // world < 2:
        why = "--bn train" if cfg.mode == "fixed" else f"--mode {cfg.mode}"
        raise UserError(f"--batch-size {batch} over {world} ranks is {batch // world} image per rank, and BatchNorm "
                        f"trains in this run ({why}): its synchronised statistics need at least 2 images per rank; "
                        f"use --batch-size {2 * world} or more, or fewer ranks")
    spec = cfg.device
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    wants_gpu = spec.startswith("cuda") or (spec == "auto" and gpus > 0)
    if wants_gpu and spec in ("auto", "cuda") and gpus < ctx.local_world_size:
        raise UserError(f"--device {spec}: torchrun started {ctx.local_world_size} processes on this node but "
                        f"{gpus} GPU(s) are visible; use --nproc_per_node={gpus} or fewer"
                        + (", or --device cpu" if spec == "cuda" else ""))
    if spec == "cuda" and gpus == 0:
        raise UserError("--device cuda: no GPU is visible on this node; use --device cpu")


def check_train_size(n_train: int, ctx: distributed.Context) -> None:
    """Every rank must have an image in the first step (its shape starts an empty last step)."""
    if n_train < ctx.world_size:
        raise UserError(f"{n_train} train image(s) for {ctx.world_size} ranks: every rank needs at least one; "
                        "use fewer ranks (or none: a single process)")


def check_resume(ckpt: Optional[dict], ctx: distributed.Context, path: str) -> None:
    """A ``last.pt`` resumes only under the world size that wrote it (the sharding of every
    step, and the summation order of its gradients, depend on it).

    Raises
    ------
    UserError
        One line naming both world sizes and the two ways on.
    """
    if ckpt is None:
        return
    saved = int(ckpt.get("config", {}).get("world_size", 1))
    if saved != ctx.world_size:
        def launch(n: int) -> str:
            return "a single process (no torchrun)" if n == 1 else f"torchrun --nproc_per_node={n} (in all {n} ranks)"
        raise UserError(f"{path} was written by a run of {saved} rank(s) and this launch has {ctx.world_size}: "
                        f"resume it with {launch(saved)}, or pass --rebuild to start over with {ctx.world_size}")


# --------------------------------------------------------------------------- which images each rank takes


def _share(m: int, rank: int, world: int) -> slice:
    """Rank ``rank``'s contiguous part of ``m`` items split over ``world`` (sizes differ by at most one)."""
    q, r = divmod(m, world)
    start = rank * q + min(rank, r)
    return slice(start, start + q + (rank < r))


class ShardedEpochSampler(EpochSampler):
    """:class:`EpochSampler` for one rank: the same seeded order and augmentation seeds on every
    rank (``set_epoch`` as ``DistributedSampler``'s), and of each global batch of
    ``batch_size`` images this rank's contiguous part (at most one image more than another's).

    Parameters
    ----------
    n : int
        Train images.
    seed : int
        The run's seed; the order of epoch ``e`` is a function of (seed, e) alone.
    batch_size : int
        The global batch (images per optimiser step, all ranks together).
    rank, world_size : int
        This rank and the number of ranks.
    """

    def __init__(self, n: int, seed: int, batch_size: int, rank: int, world_size: int):
        super().__init__(n, seed)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size

    def step_sizes(self) -> List[int]:
        """Images per optimiser step, all ranks together."""
        full, last = divmod(self.n, self.batch_size)
        return [self.batch_size] * full + ([last] if last else [])

    def __len__(self) -> int:
        return sum(len(range(self.n)[_share(m, self.rank, self.world_size)]) for m in self.step_sizes())

    def __iter__(self):
        order = list(super().__iter__())
        for start in range(0, self.n, self.batch_size):
            step = order[start:start + self.batch_size]
            yield from step[_share(len(step), self.rank, self.world_size)]


def train_sampler(n: int, seed: int, batch_size: int, ctx: distributed.Context) -> EpochSampler:
    if not ctx.is_distributed:
        return EpochSampler(n, seed)
    return ShardedEpochSampler(n, seed, batch_size, ctx.rank, ctx.world_size)


def eval_sampler(dataset, ctx: distributed.Context):
    """``DistributedSampler`` in data-set order (no shuffling): rank r takes images r, r + w, …,
    the total padded to a multiple of w by wrapping around; None for a single process."""
    if not ctx.is_distributed:
        return None
    return torch.utils.data.DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank,
                                               shuffle=False, drop_last=False)


def gather_rows(local: torch.Tensor, n: int, ctx: distributed.Context) -> torch.Tensor:
    """The rows of every rank's :func:`eval_sampler` share back in data-set order, padding dropped.

    Parameters
    ----------
    local : Tensor of shape (ceil(n / world_size), ...)
        This rank's rows, in its sampler's order.
    n : int
        Rows of the whole split.

    Returns
    -------
    Tensor of shape (n, ...)
    """
    if not ctx.is_distributed:
        return local
    import torch.distributed as dist

    parts = [torch.empty_like(local) for _ in range(ctx.world_size)]
    dist.all_gather(parts, local.contiguous())
    # Rank r's j-th row is image j * world_size + r: interleave, then drop the wrapped-around tail.
    return torch.stack(parts, 1).flatten(0, 1)[:n]


def all_sum(value: torch.Tensor, ctx: distributed.Context) -> torch.Tensor:
    if ctx.is_distributed:
        import torch.distributed as dist

        value = value.clone()
        dist.all_reduce(value)
    return value


# --------------------------------------------------------------------------- the network


class CpuSyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the whole step, over every rank.

    ``torch.nn.SyncBatchNorm`` runs on GPUs only; this is the same computation for gloo: the
    per-channel sums and counts of every rank, then their squared deviations from the mean,
    are added by a differentiable all-reduce (``torch.distributed.nn.functional.all_reduce``, whose backward sums the
    gradients of every rank), so the forward pass and the gradients are those of one batch
    holding every rank's images. The state_dict is BatchNorm2d's. A rank with no image in a step
    contributes zeros. Outside training, or without a process group, it is BatchNorm2d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        with warnings.catch_warnings():  # torch 2.10+ calls it deprecated; it still works, and its backward is documented
            warnings.simplefilter("ignore", FutureWarning)
            return self._synchronised(x)

    def _synchronised(self, x: torch.Tensor) -> torch.Tensor:
        from torch.distributed.nn.functional import all_reduce

        channels = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        shape = [1, channels] + [1] * (x.dim() - 2)
        x32 = x.float()
        count = x32.new_full((1,), x32.numel() // max(1, channels))
        # Two passes (mean, then squared deviations), as BatchNorm computes them: E[x^2] - E[x]^2
        # loses the variance to cancellation when a channel's spread is small against its mean.
        totals = all_reduce(torch.cat([x32.sum(dims), count]))
        n = totals[-1]
        mean = totals[:channels] / n
        centred = x32 - mean.view(shape)
        var = all_reduce((centred * centred).sum(dims)) / n
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
                unbiased = var * (n / (n - 1).clamp_min(1))
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.detach(), alpha=factor)
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def sync_batchnorm(modules: Iterable[nn.Module], device: torch.device, ctx: distributed.Context) -> int:
    """Make every BatchNorm2d under ``modules`` synchronise its statistics over the ranks, in place
    (the module objects, parameters and state_dict keys stay: only their class changes, so
    references held elsewhere stay valid). Returns how many layers were converted (0 without
    torchrun)."""
    if not ctx.is_distributed:
        return 0
    converted = 0
    for root in modules:
        for m in root.modules():
            if type(m) is not nn.BatchNorm2d:
                continue
            if device.type == "cuda":
                m.__class__ = nn.SyncBatchNorm
                m.process_group = None  # the default group: every rank
            else:
                m.__class__ = CpuSyncBatchNorm2d
            converted += 1
    return converted


def wrap(module: nn.Module, device: torch.device, ctx: distributed.Context) -> nn.Module:
    """``module`` (the trainable part) under DistributedDataParallel; itself without torchrun.

    Buffers are not broadcast at each forward pass: synchronised BatchNorm keeps them equal on
    every rank already, and frozen BatchNorm never changes them.
    """
    if not ctx.is_distributed:
        return module
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    # broadcast_buffers was renamed forward_sync_buffers (torch 2.10+); both keep init's broadcast.
    newer = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    return DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None,
                                   **{"forward_sync_buffers" if newer else "broadcast_buffers": False})
