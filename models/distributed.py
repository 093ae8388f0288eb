"""Data-parallel training on torch.distributed, started by torchrun (or not at all).

    torchrun --standalone --nproc-per-node N --no-python cxrnode train DATASET --out W ...
    torchrun --nnodes M --node-rank R --rdzv-endpoint HOST:PORT --nproc-per-node N --no-python cxrnode train ...

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them training runs in one process as before. The backend is
NCCL when the processes use CUDA GPUs (one per local rank) and gloo on CPU. Every rank trains on its own shard
of each epoch (DistributedSampler) and DistributedDataParallel averages the gradients; rank 0 alone validates and
writes checkpoints, logs and weights, the others wait for it at a barrier.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        """Rank 0: the process that validates and writes files."""
        return self.rank == 0


def start(device: str) -> tuple[World, str]:
    """Join the process group when torchrun started us; returns the world and the device this rank uses
    ('cuda:<local rank>' for NCCL)."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return World(), device
    world = World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")))
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(world.local_rank)
        device = f"cuda:{world.local_rank}"
    # validation on rank 0 can take minutes while the others wait at a barrier
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(hours=2))
    log.info("rank %d of %d (%s, device %s)", world.rank, world.size, dist.get_backend(), device)
    return world, device


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def stop(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
