"""The one base every training-side SAE derives from: a steerlib inference SAE plus the losses to train it.

A training SAE owns a :class:`steerlib.sae.Sae` of the matching inference architecture and trains its parameters
in place, so the trained result *is* a steerlib SAE (saved with ``steerlib.save_sae``, read back with
``steerlib.load_sae``). Subclasses say how a batch becomes latents and which sparsity penalty applies; the base holds
initialisation, the unit-norm decoder constraint and AuxK (Gao et al., arXiv 2406.04093).

Every loss term is a *sum over tokens*: the trainer divides by the global number of tokens in the batch, so a batch
split across data-parallel processes gives the same gradient as the whole batch in one process.
Activations arrive normalised (mean squared norm = D); :func:`sae_train.normalize.fold_scales` folds the scales
into the saved weights.
"""

from __future__ import annotations

import abc
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from sae_train.config import SaeConfig
from sae_train.models.sparse_ops import sparse_decode
from steerlib.sae import Sae, SaeMeta, get_architecture


class TrainOutput(NamedTuple):
    """One forward pass in training. Loss terms are sums over the batch's tokens."""

    x_hat_ND: Tensor
    recon: Tensor
    """Sum of squared reconstruction errors."""
    sparsity: Tensor
    """Sum of the unweighted sparsity penalty (L1 or L0); zero for fixed-k architectures."""
    aux: Tensor
    """Sum of the auxiliary loss (AuxK's, or the Gated SAE's gate reconstruction), unweighted."""
    fired_F: Tensor
    """Bool, which latents were active on some token."""
    l0: Tensor
    """Sum over tokens of the number of active latents."""


class TrainSae(nn.Module, abc.ABC):
    """Base training SAE. ``self.sae`` is the inference SAE whose parameters are trained.

    Built from the user's :class:`~sae_train.config.SaeConfig` (kept resolved for inputs of width ``d_in`` as
    ``self.cfg``), the widths found in the data, and the name of the model the activations come from.
    """

    name: ClassVar[str]
    inference_architecture: ClassVar[str]
    uses_auxk: ClassVar[bool] = False
    uses_sparsity_coefficient: ClassVar[bool] = False
    default_encoder_init_norm: ClassVar[float] = 1.0

    def __init__(self, cfg: SaeConfig, d_in: int, d_out: int, model: str | None = None) -> None:
        super().__init__()
        if cfg.architecture != self.name:
            raise ValueError(f"sae.architecture is {cfg.architecture!r}; this training architecture is {self.name!r}")
        self.cfg, self.d_in, self.d_out = cfg.resolved(d_in), d_in, d_out
        meta = SaeMeta(
            architecture=self.inference_architecture,
            d_in=d_in,
            d_sae=self.d_sae,
            d_out=d_out,
            input_site=self.cfg.input_site,
            output_site=self.cfg.out_site,
            model=model,
            k=self.cfg.k,
            transcoder=self.cfg.transcoder,
        )
        self.sae: Sae = get_architecture(self.inference_architecture)(
            meta, subtract_b_dec=not self.cfg.transcoder, skip=self.cfg.skip
        )

    @property
    def d_sae(self) -> int:
        assert self.cfg.d_sae is not None  # resolved
        return self.cfg.d_sae

    # -- initialisation and constraints -----------------------------------------------------------
    @torch.no_grad()
    def initialize(self, b_dec_D: Tensor, generator: torch.Generator) -> None:
        """Random unit decoder rows, encoder = decoder transpose (Gao et al. §2.3) scaled to ``encoder_init_norm``,
        ``b_dec`` given (a median)."""
        W = torch.randn(self.d_sae, self.d_out, generator=generator, device="cpu")  # one init everywhere
        W /= W.norm(dim=1, keepdim=True)
        self.sae.W_dec.copy_(W)
        if self.d_in == self.d_out:
            W_enc = W.T.clone()
        else:
            W_enc = torch.randn(self.d_in, self.d_sae, generator=generator, device="cpu")
            W_enc /= W_enc.norm(dim=0, keepdim=True)
        self.sae.W_enc.copy_(W_enc * self.encoder_init_norm)
        self.sae.b_dec.copy_(b_dec_D)

    @property
    def encoder_init_norm(self) -> float:
        norm = self.cfg.encoder_init_norm
        return self.default_encoder_init_norm if norm is None else norm

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Project decoder rows back to unit norm (after each optimizer step)."""
        self.sae.W_dec.div_(self.sae.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Drop the part of each decoder row's gradient along the row (it would only change the norm)."""
        W, g = self.sae.W_dec, self.sae.W_dec.grad
        if g is not None:
            g -= (g * W).sum(dim=1, keepdim=True) * W

    def export(self) -> Sae:
        """The trained inference SAE (architecture-specific state, such as thresholds, written in first)."""
        return self.sae

    # -- the forward pass --------------------------------------------------------------------------
    @abc.abstractmethod
    def forward(self, x_in_ND: Tensor, x_out_ND: Tensor, dead_F: Tensor | None) -> TrainOutput:
        """Training forward pass; ``dead_F`` (bool) marks latents AuxK should revive (None: no AuxK)."""

    def skip_path(self, x_in_ND: Tensor) -> Tensor | float:
        return 0.0 if self.sae.W_skip is None else x_in_ND @ self.sae.W_skip

    def auxk(self, x_in_ND: Tensor, residual_ND: Tensor, dead_F: Tensor | None) -> Tensor:
        """AuxK: the ``k_aux = d_out / 2`` largest pre-activations among dead latents reconstruct the residual
        error; the sum of squared errors is scaled by min(#dead / k_aux, 1) as in sparsify.

        As in Gao et al.'s reference code the pre-activations are used without a ReLU: a latent whose pre-activation
        is negative on every token still gets a gradient towards the error it could explain."""
        zero = residual_ND.new_zeros(())
        if dead_F is None or not bool(dead_F.any()):
            return zero
        dead_idx = dead_F.nonzero().squeeze(1)
        k_aux = min(self.d_out // 2, dead_idx.numel())
        pre_NG = self.dead_pre_acts(x_in_ND, dead_idx)
        values_NK, local_NK = pre_NG.topk(k_aux, dim=-1, sorted=False)
        e_hat = sparse_decode(values_NK, dead_idx[local_NK], self.sae.W_dec)
        scale = min(dead_idx.numel() / (self.d_out // 2), 1.0)
        return scale * (e_hat - residual_ND.detach()).pow(2).sum()

    def dead_pre_acts(self, x_in_ND: Tensor, dead_G: Tensor) -> Tensor:
        """Pre-activations of the latents ``dead_G`` only ``(N, G)``."""
        sae = self.sae
        x = x_in_ND - sae.b_dec if sae.subtract_b_dec else x_in_ND
        pre = x @ sae.W_enc[:, dead_G]
        return pre if sae.b_enc is None else pre + sae.b_enc[dead_G]

    def decoder_norms(self) -> Tensor:
        return self.sae.W_dec.norm(dim=1)
