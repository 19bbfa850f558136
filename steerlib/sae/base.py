"""The one base class every sparse autoencoder (SAE) and transcoder architecture derives from.

An SAE reads an activation ``x`` of width ``d_in`` at ``input_site`` and writes a reconstruction of width ``d_out`` at
``output_site``. For a plain SAE the two sites are the same and ``d_in == d_out``; for a transcoder (Dunefsky et al.,
arXiv 2406.11944) the input is ``mlp_in`` and the output ``mlp_out``. Architectures differ only in how pre-activations
become latents (:meth:`Sae.activate`); encoding and decoding are shared here:

    pre_F    = (x_D - b_dec_D * subtract_b_dec) @ W_enc_DF + b_enc_F
    z_F      = activate(pre_F)
    x_hat_D  = z_F @ W_dec_FD + b_dec_D (+ x_D @ W_skip_DD for skip transcoders)

Shapes are named in suffixes: D = model width, F = number of latents (d_sae), K = active latents per token.
"""

from __future__ import annotations

import abc
from collections.abc import Collection
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

import torch
from torch import Tensor, nn

SaeT = TypeVar("SaeT", bound="Sae")


@dataclass(frozen=True)
class SaeMeta:
    """Where an SAE was trained and what it is; carried beside the weights, never needed to run them."""

    architecture: str
    """Key in :data:`steerlib.sae.ARCHITECTURES`, e.g. ``"topk"``."""
    d_in: int
    d_sae: int
    d_out: int
    input_site: str | None = None
    """TransformerLens-style site the SAE reads, e.g. ``blocks.15.hook_resid_post`` (None when unknown)."""
    output_site: str | None = None
    """Site the reconstruction is written to; differs from ``input_site`` for transcoders."""
    model: str | None = None
    """The model the SAE was trained on, as its source named it (None when unknown)."""
    k: int | None = None
    """Active latents per token for TopK (and the top-k fallback of BatchTopK); None for other architectures."""
    source_format: str = "steerlib"
    """The on-disk format the weights were first read from: steerlib, saelens, sparsify, gemma_scope, ..."""
    transcoder: bool = False
    """True when the source declared the weights a transcoder, even when its sites are unknown."""


class SparseLatents(NamedTuple):
    """The top-k active latents of each token: values and indices, both ``(..., K)``."""

    values: Tensor
    indices: Tensor


class Sae(nn.Module, abc.ABC):
    """Base SAE: parameters and shared encode/decode. Subclasses implement :meth:`activate`."""

    architecture: str = "base"
    has_b_enc: bool = True
    """False for architectures whose encoder has no plain bias (Gated uses ``b_gate`` and ``b_mag`` instead)."""

    def __init__(
        self,
        meta: SaeMeta,
        *,
        subtract_b_dec: bool = False,
        skip: bool = False,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__()
        if meta.architecture != self.architecture:
            raise ValueError(
                f"{type(self).__name__} runs architecture {self.architecture!r}, meta says {meta.architecture!r}"
            )
        if subtract_b_dec and meta.d_in != meta.d_out:
            raise ValueError(
                "subtract_b_dec needs d_in == d_out (b_dec is subtracted from the input), "
                f"got {meta.d_in} != {meta.d_out}"
            )
        self.meta = meta
        self.subtract_b_dec = subtract_b_dec
        d_in, d_sae, d_out = meta.d_in, meta.d_sae, meta.d_out
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae, dtype=dtype, device=device))
        self.b_enc: nn.Parameter | None = (
            nn.Parameter(torch.zeros(d_sae, dtype=dtype, device=device)) if self.has_b_enc else None
        )
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_out, dtype=dtype, device=device))
        self.b_dec = nn.Parameter(torch.zeros(d_out, dtype=dtype, device=device))
        self.W_skip: nn.Parameter | None = (
            nn.Parameter(torch.zeros(d_in, d_out, dtype=dtype, device=device)) if skip else None
        )
        self._own_parameters(meta, dtype, device)

    def _own_parameters(self, meta: SaeMeta, dtype: torch.dtype, device: str | torch.device) -> None:
        """An architecture's parameters beyond the shared ones (thresholds, gates), or facts read from ``meta``."""

    @classmethod
    def for_tensors(
        cls: type[SaeT],
        meta: SaeMeta,
        names: Collection[str],
        *,
        subtract_b_dec: bool,
        dtype: torch.dtype,
    ) -> SaeT:
        """An empty SAE whose optional parameters are those a loader found (``names``), ready for its weights."""
        return cls(meta, subtract_b_dec=subtract_b_dec, skip="W_skip" in names, dtype=dtype)

    # -- sizes -------------------------------------------------------------------------------------
    @property
    def d_in(self) -> int:
        return self.meta.d_in

    @property
    def d_sae(self) -> int:
        return self.meta.d_sae

    @property
    def d_out(self) -> int:
        return self.meta.d_out

    @property
    def is_transcoder(self) -> bool:
        return (
            self.meta.transcoder
            or self.meta.input_site != self.meta.output_site
            or self.d_in != self.d_out
            or self.W_skip is not None
        )

    # -- the maths -------------------------------------------------------------------------------
    def pre_acts(self, x_BD: Tensor) -> Tensor:
        """Encoder pre-activations ``(..., F)``."""
        x = x_BD.to(self.W_enc.dtype)
        if self.subtract_b_dec:
            x = x - self.b_dec
        pre = x @ self.W_enc
        return pre if self.b_enc is None else pre + self.b_enc

    @abc.abstractmethod
    def activate(self, pre_BF: Tensor) -> Tensor:
        """Latents from pre-activations; the only thing an architecture must define."""

    def encode(self, x_BD: Tensor) -> Tensor:
        """Dense latents ``(..., F)``."""
        return self.activate(self.pre_acts(x_BD))

    def decode(self, z_BF: Tensor, x_BD: Tensor | None = None) -> Tensor:
        """Reconstruction ``(..., d_out)``; ``x_BD`` is needed only by skip transcoders."""
        out = z_BF.to(self.W_dec.dtype) @ self.W_dec + self.b_dec
        return self._add_skip(out, x_BD)

    def decode_sparse(self, latents: SparseLatents, x_BD: Tensor | None = None) -> Tensor:
        """Reconstruction from top-k latents, without materialising the dense ``(..., F)`` tensor."""
        lead = latents.indices.shape[:-1]
        idx_NK = latents.indices.reshape(-1, latents.indices.shape[-1])
        val_NK = latents.values.reshape(idx_NK.shape).to(self.W_dec.dtype)
        out = nn.functional.embedding_bag(idx_NK, self.W_dec, per_sample_weights=val_NK, mode="sum")
        out = out.reshape(*lead, self.d_out) + self.b_dec
        return self._add_skip(out, x_BD)

    def forward(self, x_BD: Tensor) -> Tensor:
        """``decode(encode(x))``."""
        return self.decode(self.encode(x_BD), x_BD)

    def _add_skip(self, out: Tensor, x_BD: Tensor | None) -> Tensor:
        if self.W_skip is None:
            return out
        if x_BD is None:
            raise ValueError("this SAE is a skip transcoder: decode() needs the input x_BD for its skip path")
        return out + x_BD.to(self.W_skip.dtype) @ self.W_skip
