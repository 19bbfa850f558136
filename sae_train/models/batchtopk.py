"""BatchTopK SAE (Bussmann et al., "BatchTopK Sparse Autoencoders", arXiv 2412.06410).

In training the k·N largest latents of the whole batch are kept (so tokens get a variable number, k on average).
At inference a single global threshold θ replaces the batch: θ is a running average of the smallest latent kept in
each training batch, and the saved SAE is steerlib's ``batchtopk`` with that threshold. Revived by AuxK.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from sae_train.config import SaeConfig
from sae_train.models.base import TrainOutput, TrainSae
from sae_train.models.registry import register
from steerlib.sae import BatchTopKSae


def batch_topk(post_NF: Tensor, k: int) -> Tensor:
    """Dense latents keeping the ``k·N`` largest entries of ``post_NF`` (already non-negative)."""
    n = post_NF.shape[0]
    flat = post_NF.reshape(-1)
    values, indices = flat.topk(min(k * n, flat.numel()), sorted=False)
    return torch.zeros_like(flat).scatter(0, indices, values).reshape(post_NF.shape)


@register("batchtopk")
class BatchTopKTrainSae(TrainSae):
    inference_architecture = "batchtopk"
    uses_auxk = True
    threshold_momentum: ClassVar[float] = 0.99
    """Weight of the running inference threshold's old value."""

    def __init__(self, cfg: SaeConfig, d_in: int, d_out: int, model: str | None = None) -> None:
        super().__init__(cfg, d_in, d_out, model)
        self.running_threshold: Tensor
        self.register_buffer("running_threshold", torch.tensor(-1.0, device="cpu"))  # moved with the module

    def latents(self, x_in_ND: Tensor) -> Tensor:
        assert self.cfg.k is not None
        z_NF = batch_topk(self.sae.pre_acts(x_in_ND).relu(), self.cfg.k)
        if self.training:
            self._update_threshold(z_NF.detach())
        return z_NF

    @torch.no_grad()
    def _update_threshold(self, z_NF: Tensor) -> None:
        positive = z_NF[z_NF > 0]
        if positive.numel() == 0:
            return
        low = positive.min().float()
        t = self.running_threshold
        m = self.threshold_momentum
        t.copy_(low if t < 0 else m * t + (1 - m) * low)

    def forward(self, x_in_ND: Tensor, x_out_ND: Tensor, dead_F: Tensor | None) -> TrainOutput:
        z_NF = self.latents(x_in_ND)
        x_hat = (z_NF @ self.sae.W_dec + self.sae.b_dec + self.skip_path(x_in_ND)).float()
        return self.output(z_NF, x_hat, (x_hat - x_out_ND).pow(2).sum(), x_in_ND, x_out_ND, dead_F)

    def output(
        self, z_NF: Tensor, x_hat: Tensor, recon: Tensor, x_in_ND: Tensor, x_out_ND: Tensor, dead_F: Tensor | None
    ) -> TrainOutput:
        active = z_NF > 0
        return TrainOutput(
            x_hat_ND=x_hat,
            recon=recon,
            sparsity=x_hat.new_zeros(()),
            aux=self.auxk(x_in_ND, x_out_ND - x_hat, dead_F),
            fired_F=active.any(dim=0),
            l0=active.sum().float(),
        )

    def export(self) -> BatchTopKSae:
        sae = self.sae
        assert isinstance(sae, BatchTopKSae) and sae.threshold is not None
        with torch.no_grad():
            sae.threshold.copy_(self.running_threshold.clamp_min(0))
        return sae
