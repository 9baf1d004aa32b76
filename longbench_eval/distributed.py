"""torchrun data parallelism: every rank predicts a disjoint shard; collectives are barriers and
one exchange of setup errors (so that all ranks stop when one cannot start)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# A barrier waits for the slowest rank's share of a dataset, which with long prompts and a 7B
# model can take hours: the default 30-minute collective timeout would kill healthy runs.
BARRIER_TIMEOUT = timedelta(hours=48)


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistContext:
    """Join the torchrun group when WORLD_SIZE > 1 (nccl on GPUs, gloo on CPU); a plain process
    gets a one-rank context and no process group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl", timeout=BARRIER_TIMEOUT, device_id=torch.device("cuda", local_rank))
        else:
            dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
    return DistContext(rank, world_size, local_rank, True)


def barrier(ctx: DistContext) -> None:
    if ctx.initialized:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[ctx.local_rank])
        else:
            dist.barrier()


def first_error(ctx: DistContext, error: str | None) -> str | None:
    """The first rank's error among every rank's ``error`` (None: no error), on every rank: a check
    made by one rank (rank 0 locks the output directories) stops all of them together."""
    if not ctx.initialized:
        return error
    errors = [None] * ctx.world_size
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e), None)


def shutdown(ctx: DistContext) -> None:
    if ctx.initialized and dist.is_initialized():
        dist.destroy_process_group()
