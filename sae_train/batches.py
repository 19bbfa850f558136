"""Deterministic training batches: batch ``i`` is a function of ``(seed, i)`` only, so a resumed run sees the same data.

Each epoch visits every row once in an order drawn from ``(seed, epoch)``. In data-parallel training every process
computes the same global batch indices and takes its own contiguous share of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from sae_train.activations import ActivationCache


class RowSource(Protocol):
    """Rows of training activations: input and target site (the same for an SAE, mlp_in/mlp_out for a transcoder)."""

    def __len__(self) -> int: ...

    def rows(self, index_N: Tensor) -> tuple[Tensor, Tensor]: ...


@dataclass(frozen=True)
class TensorRows:
    """Rows held in memory (tests, small runs)."""

    x_in_ND: Tensor
    x_out_ND: Tensor

    def __len__(self) -> int:
        return int(self.x_in_ND.shape[0])

    def rows(self, index_N: Tensor) -> tuple[Tensor, Tensor]:
        return self.x_in_ND[index_N].float(), self.x_out_ND[index_N].float()


@dataclass(frozen=True)
class CacheRows:
    """Rows of one or two sites of an :class:`ActivationCache`, optionally only the rows listed in ``keep_M``."""

    cache: ActivationCache
    input_site: str
    output_site: str
    keep_M: Tensor | None = None

    def __len__(self) -> int:
        return len(self.cache) if self.keep_M is None else int(self.keep_M.shape[0])

    def rows(self, index_N: Tensor) -> tuple[Tensor, Tensor]:
        if self.keep_M is not None:
            index_N = self.keep_M[index_N]
        # Sorted gathers read the memmap front to back; the order inside a batch does not matter to the loss.
        index_N = index_N.sort().values
        x_in = self.cache.rows(self.input_site, index_N)
        x_out = x_in if self.output_site == self.input_site else self.cache.rows(self.output_site, index_N)
        return x_in, x_out


def batch_indices(step: int, batch_size: int, n_rows: int, seed: int) -> Tensor:
    """Row indices ``(batch_size,)`` of global batch ``step``; batches never straddle an epoch boundary."""
    per_epoch = n_rows // batch_size
    if per_epoch == 0:
        raise ValueError(f"batch size {batch_size} is larger than the {n_rows} rows of training data")
    epoch, i = divmod(step, per_epoch)
    gen = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n_rows, generator=gen, device="cpu")
    return perm[i * batch_size : (i + 1) * batch_size]


def shard(index_N: Tensor, rank: int, world: int) -> Tensor:
    """This process's contiguous share of a global batch (the batch size must divide by the world size)."""
    n = index_N.shape[0]
    if n % world:
        raise ValueError(f"batch size {n} does not divide across {world} processes")
    per = n // world
    return index_N[rank * per : (rank + 1) * per]
