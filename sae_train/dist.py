"""Data-parallel training over ``torch.distributed`` (started by ``torchrun``): NCCL when the run's device is CUDA,
gloo when it is the CPU (decided by the configured device, not by whether the machine has a GPU: NCCL cannot
all-reduce CPU tensors).

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


def backend_for(device: torch.device) -> str:
    """The collective backend for tensors on ``device``."""
    return "nccl" if device.type == "cuda" else "gloo"


def process_device(device: torch.device) -> torch.device:
    """This process's device: under torchrun on CUDA, ``cuda:LOCAL_RANK`` unless an index was given."""
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def init_from_env(device: torch.device | None = None) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment; a single process otherwise.

    ``device`` is where this process's tensors live (default: the CPU); it picks the backend."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistInfo()
    dev = torch.device("cpu") if device is None else device
    if not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend_for(dev))
    info = DistInfo(dist.get_rank(), dist.get_world_size())
    logger.info("data-parallel rank %d of %d", info.rank, info.world)
    return info


def broadcast_parameters(module: nn.Module, info: DistInfo) -> None:
    if info.world > 1:
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=0)


def broadcast_tensor(t: Tensor, info: DistInfo) -> None:
    """Overwrite ``t`` with rank 0's (in place)."""
    if info.world > 1:
        dist.broadcast(t, src=0)


def all_reduce_grads(module: nn.Module, info: DistInfo) -> None:
    """Sum every gradient over processes (losses are already divided by the global token count)."""
    if info.world == 1:
        return
    for p in module.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)  # same device as the parameter
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
