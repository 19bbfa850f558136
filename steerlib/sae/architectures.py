"""The SAE architectures steerlib runs, one class each over :class:`~steerlib.sae.base.Sae`, and their registry.

Each class defines only how pre-activations ``pre_F = (x - b_dec?) @ W_enc + b_enc`` become latents:

- ``relu``      ``z = relu(pre)``  (Bricken et al., "Towards Monosemanticity", 2023)
- ``topk``      keep the k largest of ``relu(pre)`` per token  (Gao et al., arXiv 2406.04093)
- ``batchtopk`` at inference ``z = relu(pre) * (relu(pre) > θ)`` with one learned global θ, as
                dictionary_learning's ``BatchTopKSAE.encode(use_threshold=True)`` does; without a stored θ, per-token
                top-k  (Bussmann et al., arXiv 2412.06410)
- ``jumprelu``  ``z = relu(pre) * (pre > θ_F)`` with one threshold per latent  (Rajamanoharan et al., arXiv 2407.14435;
                Gemma Scope, arXiv 2408.05147)
- ``gated``     ``x_enc = (x - b_dec) @ W_enc``; ``z = (x_enc + b_gate > 0) * relu(exp(r_mag) * x_enc + b_mag)``
                (Rajamanoharan et al., arXiv 2404.16014)
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import TypeVar

import torch
from torch import Tensor, nn

from steerlib.registry import class_register, lookup
from steerlib.sae.base import Sae, SaeMeta, SparseLatents

SaeClass = TypeVar("SaeClass", bound=type[Sae])

ARCHITECTURES: dict[str, type[Sae]] = {}
"""Architecture name -> class, filled by :func:`register`."""


def register(name: str) -> Callable[[SaeClass], SaeClass]:
    """Class decorator: make ``cls`` the architecture called ``name``."""
    return class_register(ARCHITECTURES, "SAE architecture", "architecture", name)


def get_architecture(name: str) -> type[Sae]:
    """The class registered as ``name``; an unknown name raises a ValueError listing the valid ones."""
    return lookup(ARCHITECTURES, "SAE architecture", name)


def topk_latents(pre_BF: Tensor, k: int) -> SparseLatents:
    """The ``k`` largest of ``relu(pre)`` per token, unsorted (sparsify's ``fused_encoder`` semantics).

    Where fewer than k pre-activations are positive the rest of the K slots hold zeros, so the dense result equals
    SAELens' ``relu(topk(pre))``.
    """
    values_BK, indices_BK = pre_BF.relu().topk(k, dim=-1, sorted=False)
    return SparseLatents(values_BK, indices_BK)


def to_dense(latents: SparseLatents, d_sae: int) -> Tensor:
    """Scatter top-k latents into a dense ``(..., F)`` tensor of zeros."""
    values, indices = latents
    dense = values.new_zeros(*indices.shape[:-1], d_sae)
    return dense.scatter_(-1, indices, values)


def _checked_k(meta: SaeMeta) -> int:
    if meta.k is None or not 1 <= meta.k <= meta.d_sae:
        raise ValueError(f"{meta.architecture} SAE needs k in 1..{meta.d_sae} (d_sae), got k={meta.k}")
    return meta.k


@register("relu")
class ReluSae(Sae):
    """The standard SAE: ``z = relu(pre)``."""

    def activate(self, pre_BF: Tensor) -> Tensor:
        return pre_BF.relu()


@register("topk")
class TopKSae(Sae):
    """Exactly ``k`` slots per token (``meta.k``); the forward pass decodes sparsely from the top-k indices."""

    def _own_parameters(self, meta: SaeMeta, dtype: torch.dtype, device: str | torch.device) -> None:
        self.k = _checked_k(meta)

    def encode_sparse(self, x_BD: Tensor) -> SparseLatents:
        """Top-k latent values and indices ``(..., K)``."""
        return topk_latents(self.pre_acts(x_BD), self.k)

    def activate(self, pre_BF: Tensor) -> Tensor:
        return to_dense(topk_latents(pre_BF, self.k), self.d_sae)

    def forward(self, x_BD: Tensor) -> Tensor:
        """``decode(encode(x))``, computed from the k indices without a dense ``(..., F)`` tensor."""
        return self.decode_sparse(self.encode_sparse(x_BD), x_BD)


@register("batchtopk")
class BatchTopKSae(Sae):
    """BatchTopK at inference: a global threshold ``θ`` (scalar ``threshold``), or per-token top-k when there is none.

    dictionary_learning compares ``relu(pre) > θ``; for ``θ >= 0`` that is the same as ``pre > θ``.
    """

    def __init__(
        self,
        meta: SaeMeta,
        *,
        subtract_b_dec: bool = False,
        skip: bool = False,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        global_threshold: bool = True,
    ) -> None:
        super().__init__(meta, subtract_b_dec=subtract_b_dec, skip=skip, dtype=dtype, device=device)
        self.threshold: nn.Parameter | None = (
            nn.Parameter(torch.zeros((), dtype=dtype, device=device)) if global_threshold else None
        )
        # k is only needed for the top-k fallback; when given it must still be valid.
        self.k: int | None = None if global_threshold and meta.k is None else _checked_k(meta)

    @classmethod
    def for_tensors(
        cls,
        meta: SaeMeta,
        names: Collection[str],
        *,
        subtract_b_dec: bool,
        dtype: torch.dtype,
    ) -> BatchTopKSae:
        return cls(
            meta,
            subtract_b_dec=subtract_b_dec,
            skip="W_skip" in names,
            dtype=dtype,
            global_threshold="threshold" in names,
        )

    def activate(self, pre_BF: Tensor) -> Tensor:
        if self.threshold is None:
            assert self.k is not None  # checked in __init__
            return to_dense(topk_latents(pre_BF, self.k), self.d_sae)
        post_BF = pre_BF.relu()
        return post_BF * (post_BF > self.threshold)

    def forward(self, x_BD: Tensor) -> Tensor:
        if self.threshold is None:
            assert self.k is not None
            return self.decode_sparse(topk_latents(self.pre_acts(x_BD), self.k), x_BD)
        return super().forward(x_BD)


@register("jumprelu")
class JumpReluSae(Sae):
    """JumpReLU: ``z = relu(pre) * (pre > threshold_F)``; a latent at or below its threshold is zero."""

    def _own_parameters(self, meta: SaeMeta, dtype: torch.dtype, device: str | torch.device) -> None:
        self.threshold = nn.Parameter(torch.zeros(meta.d_sae, dtype=dtype, device=device))

    def activate(self, pre_BF: Tensor) -> Tensor:
        return pre_BF.relu() * (pre_BF > self.threshold)


@register("gated")
class GatedSae(Sae):
    """Gated SAE. Its :meth:`pre_acts` is the shared projection ``x_enc`` (no bias); both paths start from it."""

    has_b_enc = False

    def _own_parameters(self, meta: SaeMeta, dtype: torch.dtype, device: str | torch.device) -> None:
        self.b_gate = nn.Parameter(torch.zeros(meta.d_sae, dtype=dtype, device=device))
        self.r_mag = nn.Parameter(torch.zeros(meta.d_sae, dtype=dtype, device=device))
        self.b_mag = nn.Parameter(torch.zeros(meta.d_sae, dtype=dtype, device=device))

    def activate(self, pre_BF: Tensor) -> Tensor:
        gate_BF = (pre_BF + self.b_gate) > 0
        mag_BF = (self.r_mag.exp() * pre_BF + self.b_mag).relu()
        return mag_BF * gate_BF
