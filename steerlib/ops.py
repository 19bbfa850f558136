"""The tensor operations of each intervention kind, on a step's flat activations ``x_ND``.

Every op is ``op(x_ND, cache, mask_N) -> x_ND`` and leaves tokens outside ``mask_N`` bit-identical. ``cache`` holds
the SAE input (the same activation, or ``mlp_in`` for a transcoder that writes ``mlp_out``) and latents computed once
per site and step.

References: activation addition (Turner et al., arXiv 2308.10248), contrastive activation addition (Rimsky et al.,
arXiv 2312.06681), directional ablation (Arditi et al., arXiv 2406.11717), SAE feature steering with the error term
kept (Templeton et al., "Scaling Monosemanticity", 2024).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from steerlib.policy import LatentCache
from steerlib.sae import Sae


def _blend(x_ND: Tensor, new_ND: Tensor, mask_N: Tensor) -> Tensor:
    return torch.where(mask_N[:, None], new_ND.to(x_ND.dtype), x_ND)


@dataclass(frozen=True)
class AddVector:
    """``x + coefficient * v``; ``relative``: ``x + coefficient * ||x|| * v/||v||``; ``norm_match`` keeps ``||x||``."""

    vector_D: Tensor
    coefficient: float
    relative: bool = False
    norm_match: bool = False

    def __call__(self, x_ND: Tensor, cache: LatentCache, mask_N: Tensor) -> Tensor:
        v = self.vector_D.to(x_ND.dtype)
        if self.relative:
            new = x_ND + self.coefficient * x_ND.norm(dim=-1, keepdim=True) * (v / v.norm())
        else:
            new = x_ND + self.coefficient * v
        if self.norm_match:
            new = new * (x_ND.norm(dim=-1, keepdim=True) / new.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        return _blend(x_ND, new, mask_N)


@dataclass(frozen=True)
class AblateDirections:
    """Project out the span of the rows of ``basis_KD`` (orthonormal): ``x - (x Qᵀ) Q``."""

    basis_KD: Tensor

    def __call__(self, x_ND: Tensor, cache: LatentCache, mask_N: Tensor) -> Tensor:
        q = self.basis_KD.to(x_ND.dtype)
        return _blend(x_ND, x_ND - (x_ND @ q.T) @ q, mask_N)


@dataclass(frozen=True)
class SaeEdit:
    """Encode, edit latents, decode. Edits are ``(feature, mode, value)`` with mode in set | scale | add.

    With ``keep_error`` the output is ``x + decode(edited) - decode(original)``; biases and a skip path cancel, so
    that is ``x + (z_edited - z)[F_edit] @ W_dec[F_edit]``, touching only the edited latents' decoder rows.
    """

    sae: Sae
    features: tuple[int, ...]
    modes: tuple[str, ...]
    values: tuple[float, ...]
    keep_error: bool
    index_E: Tensor = field(init=False, repr=False, compare=False)
    """The edited latents' indices on the SAE's device, made once (a step copies nothing from the host)."""

    def __post_init__(self) -> None:
        index = torch.tensor(self.features, dtype=torch.long, device=self.sae.W_dec.device)
        object.__setattr__(self, "index_E", index)

    def edited(self, z_NF: Tensor) -> Tensor:
        z = z_NF.clone()
        for f, mode, value in zip(self.features, self.modes, self.values, strict=True):
            if mode == "set":
                z[:, f] = value
            elif mode == "scale":
                z[:, f] = z[:, f] * value
            else:
                z[:, f] = z[:, f] + value
        return z

    def __call__(self, x_ND: Tensor, cache: LatentCache, mask_N: Tensor) -> Tensor:
        z = cache.latents(self.sae)
        if self.keep_error:
            if not self.features:
                return x_ND
            idx = self.index_E
            dz_NE = self.edited(z)[:, idx] - z[:, idx]
            return _blend(x_ND, x_ND + (dz_NE @ self.sae.W_dec[idx]).to(x_ND.dtype), mask_N)
        return _blend(x_ND, self.sae.decode(self.edited(z), cache.x_in_ND), mask_N)


@dataclass(frozen=True)
class SaeReplace:
    """Replace the activation with the SAE's reconstruction."""

    sae: Sae

    def __call__(self, x_ND: Tensor, cache: LatentCache, mask_N: Tensor) -> Tensor:
        return _blend(x_ND, self.sae.decode(cache.latents(self.sae), cache.x_in_ND), mask_N)


def orthonormal_rows(v_KD: Tensor) -> Tensor:
    """An orthonormal basis (rows) of the span of ``v_KD``'s rows."""
    q, _ = torch.linalg.qr(v_KD.double().T)
    return q.T.to(v_KD.dtype)
