"""Data-parallel training over ``torch.distributed`` (started by ``torchrun``; gloo on CPU, nccl on GPUs).

Each process computes the loss terms of its share of the global batch as sums over tokens divided by the *global*
token count, so summing the gradients over processes (one all-reduce per parameter: what DDP's buckets do) gives
exactly the gradient of the whole batch in one process. Parameters start equal (rank 0's are broadcast).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env() -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment; a single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
    info = DistInfo(dist.get_rank(), dist.get_world_size())
    logger.info("data-parallel rank %d of %d", info.rank, info.world)
    return info


def broadcast_parameters(module: nn.Module, info: DistInfo) -> None:
    if info.world > 1:
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=0)


def all_reduce_grads(module: nn.Module, info: DistInfo) -> None:
    """Sum every gradient over processes (losses are already divided by the global token count)."""
    if info.world == 1:
        return
    for p in module.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)


def any_over_ranks(mask: Tensor, info: DistInfo) -> Tensor:
    """Elementwise OR of a bool tensor over processes."""
    if info.world == 1:
        return mask
    as_int = mask.to(torch.int32)
    dist.all_reduce(as_int, op=dist.ReduceOp.MAX)
    return as_int.bool()


def sum_over_ranks(value: Tensor, info: DistInfo) -> Tensor:
    if info.world == 1:
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out
