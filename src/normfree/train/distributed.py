"""Distributed set-up: under ``torchrun --nproc_per_node=N`` (RANK and
WORLD_SIZE in the environment) the run uses DistributedDataParallel, gloo on
CPU, nccl on GPU; nothing changes for a single process.

``batch_size`` stays the global batch; each process takes its slice of every
global batch (see :class:`normfree.data.Batches`), so N processes follow the
trajectory of one (up to float summation order). Metrics of the training
steps are averaged over the processes (:meth:`Dist.mean`) before they are
logged; only rank 0 writes files.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.nn as nn

from .config import TrainConfig


def dist_env():
    """(rank, world_size, local_rank) from torchrun's environment ((0, 1, 0) without)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(cfg: TrainConfig, local_rank: int = 0, world: int = 1) -> torch.device:
    """The training device of this process for ``cfg.device`` (auto, cpu, cuda, cuda:N)."""
    if cfg.device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
        return torch.device("cpu")
    if str(cfg.device).startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {cfg.device!r} requested but CUDA is not available; use 'cpu' or 'auto'")
        if cfg.device == "cuda" and world > 1:
            return torch.device("cuda", local_rank)
    return torch.device(cfg.device)


@dataclass
class Dist:
    """This process's place in the run."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def min(self, v: int) -> int:
        """The minimum of an integer over all processes (collective)."""
        if self.world == 1:
            return v
        import torch.distributed as dist
        t = torch.tensor([v], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    @property
    def mean(self) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
        """A function averaging a tensor over all processes (collective), None for one process."""
        if self.world == 1:
            return None

        def mean(t: torch.Tensor) -> torch.Tensor:
            import torch.distributed as dist
            t = t.clone()
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            return t / self.world
        return mean

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist
            dist.barrier()

    def wrap(self, model: nn.Module, say: Callable[[str], None]) -> nn.Module:
        """``model`` in DistributedDataParallel (BN -> SyncBatchNorm on GPU); itself for one process."""
        if self.world == 1:
            return model
        uses_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        net = model
        if uses_bn and self.device.type == "cuda":
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        elif uses_bn:
            say("note: PyTorch has no SyncBatchNorm on CPU; each process normalizes with its own slice of the batch")
        return nn.parallel.DistributedDataParallel(
            net, device_ids=[self.device.index] if self.device.type == "cuda" else None)


@contextlib.contextmanager
def session(cfg: TrainConfig) -> Iterator[Dist]:
    """This process's :class:`Dist`; joins (and afterwards leaves) the process
    group when started by torchrun and nobody has initialized it yet."""
    rank, world, local_rank = dist_env()
    device = resolve_device(cfg, local_rank, world)
    ours = False
    if world > 1:
        import torch.distributed as dist
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but torch.distributed is not available in this build")
        if not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            ours = True
        rank, world = dist.get_rank(), dist.get_world_size()
    try:
        yield Dist(rank, world, device)
    finally:
        if ours:
            import torch.distributed as dist
            dist.destroy_process_group()
