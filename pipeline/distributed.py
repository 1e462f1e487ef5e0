"""torch.distributed for the feature and fine-tuning stages: launch detection, the process group, meeting points.

``torchrun`` starts one process per rank and exports ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``; that environment is the only signal
used here. Without it (or with ``WORLD_SIZE=1``) nothing is initialised and every helper is
a no-op, so a single process needs neither torchrun nor a process group.

The feature stage's ranks exchange only small Python objects (plans, statuses, file names),
never tensors: each rank writes its own results to the shared file system. The fine-tuning
stage adds DistributedDataParallel's gradients (``pipeline/finetune/ddp.py``). Every exchange goes through
:meth:`Context.meet`, which also carries each rank's error, so a failure on one rank stops
every rank at its next meeting point instead of leaving the others waiting.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional, TypeVar

import torch

from .errors import UserError

__all__ = ["Context", "PeerError", "from_env", "device_spec", "session"]

log = logging.getLogger(__name__)
T = TypeVar("T")


class PeerError(UserError):
    """Another rank failed; this one stops too (the cause is printed by that rank)."""


@dataclass(frozen=True)
class Context:
    """Where this process stands in the job; the single-process default has world_size 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str = ""
    timeout_s: float = 1800.0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_primary(self) -> bool:
        return self.rank == 0

    def meet(self, step: str, error: Optional[BaseException] = None, value: Any = None) -> List[Any]:
        """Wait for every rank, exchange ``value``; returns every rank's value, by rank.

        ``error``: what failed on this rank since the last meeting (re-raised here after the
        others have heard of it). If another rank failed, raises :class:`PeerError` (a
        ``UserError`` from that rank keeps its message). If a rank died or never arrives
        within the timeout, the collective fails and so does this call.
        """
        if not self.is_distributed:
            if error is not None:
                raise error
            return [value]
        import torch.distributed as dist

        status = None if error is None else (isinstance(error, UserError), f"{type(error).__name__}: {error}")
        gathered: List[Any] = [None] * self.world_size
        try:
            dist.all_gather_object(gathered, (status, value))
        except Exception as exc:  # a peer died (connection closed) or the timeout passed
            if error is not None:
                raise error
            raise PeerError(
                f"rank {self.rank}: lost the other ranks during {step} ({type(exc).__name__}); "
                "the rank that stopped first says why"
            ) from None
        if error is not None:
            raise error
        for rank, (peer_status, _) in enumerate(gathered):
            if peer_status is not None:
                user_error, message = peer_status
                if user_error:
                    message = message.split(": ", 1)[-1]
                raise PeerError(f"rank {rank} of {self.world_size} stopped during {step}: {message}")
        return [v for _, v in gathered]

    def collective(self, step: str, fn: Callable[[], T], run: bool = True) -> Optional[T]:
        """Call ``fn`` on this rank when ``run``, then meet: any rank's error stops them all."""
        result, error = None, None
        if run:
            try:
                result = fn()
            except Exception as exc:  # handed to every rank by meet, then raised here
                error = exc
        self.meet(step, error)
        return result

    def primary_first(self, step: str, fn: Callable[[], T]) -> T:
        """``fn`` on rank 0 first (it may download or create), then on the other ranks."""
        first = self.collective(step, fn, run=self.is_primary)
        rest = self.collective(step, fn, run=not self.is_primary)
        return first if self.is_primary else rest


def from_env() -> Context:
    """The job as ``torchrun`` describes it in the environment (world size 1 without it)."""
    def number(name: str, default: int) -> int:
        value = os.environ.get(name, "")
        try:
            return int(value) if value else default
        except ValueError:
            raise UserError(f"environment variable {name}={value!r} is not an integer; "
                            "launch with torchrun, which sets it") from None

    world = number("WORLD_SIZE", 1)
    if world <= 1:
        return Context()
    rank = number("RANK", 0)
    if not 0 <= rank < world:
        raise UserError(f"RANK={rank} is outside 0..{world - 1} (WORLD_SIZE={world}); launch with torchrun")
    return Context(rank=rank, world_size=world, local_rank=number("LOCAL_RANK", 0),
                   local_world_size=number("LOCAL_WORLD_SIZE", 1))


def device_spec(spec: str, ctx: Context) -> str:
    """``--device`` for this rank: ``auto`` and ``cuda`` mean the GPU ``cuda:LOCAL_RANK``.

    ``cuda:N`` and ``cpu`` are taken as given (several ranks may then share one device).
    """
    if not ctx.is_distributed:
        return spec
    if spec == "auto":
        return f"cuda:{ctx.local_rank}" if torch.cuda.is_available() else "cpu"
    if spec == "cuda":
        return f"cuda:{ctx.local_rank}"
    return spec


@contextlib.contextmanager
def session(ctx: Context, device: torch.device, timeout_s: float) -> Iterator[Context]:
    """Join the process group for the duration of the block (and leave it after).

    Backend: NCCL for a CUDA device, with gloo beside it for the small CPU objects the ranks
    exchange (``"cpu:gloo,cuda:nccl"``); gloo alone on CPU. ``timeout_s`` bounds every wait at
    a meeting point. A process group the caller already initialised is used and left open
    (this rank's GPU is made the current device all the same).
    """
    if not ctx.is_distributed:
        yield ctx
        return
    import torch.distributed as dist

    if not dist.is_available():
        raise UserError("this PyTorch build has no torch.distributed; run a single process (without torchrun)")
    if device.type == "cuda":  # NCCL collectives run on the current device: this rank's GPU
        torch.cuda.set_device(device)
    if dist.is_initialized():
        if dist.get_world_size() != ctx.world_size:
            raise UserError(f"the process group has {dist.get_world_size()} ranks, WORLD_SIZE says {ctx.world_size}")
        yield Context(ctx.rank, ctx.world_size, ctx.local_rank, ctx.local_world_size,
                      str(dist.get_backend()), timeout_s)
        return
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    except Exception as exc:  # rendezvous failures: unreachable address, port in use, timeout
        raise UserError(
            f"rank {ctx.rank}: torch.distributed could not start ({type(exc).__name__}: {str(exc)[:120]}); "
            "check --rdzv-endpoint (or MASTER_ADDR/MASTER_PORT) and that every node can reach it"
        ) from None
    log.info("rank %d of %d joined (%s, %s)", ctx.rank, ctx.world_size, backend, device)
    try:
        yield Context(ctx.rank, ctx.world_size, ctx.local_rank, ctx.local_world_size, backend, timeout_s)
    finally:
        dist.destroy_process_group()
