"""ReLU SAE with an L1 penalty weighted by decoder norms (Bricken et al. 2023; Anthropic's April 2024 update).

``loss = ||x - x_hat||² + λ · Σ_f z_f ||W_dec,f||`` - weighting by the decoder norm removes the trivial way to shrink
the penalty (small latents, large decoder rows).
"""

from __future__ import annotations

import torch
from torch import Tensor

from sae_train.models.base import TrainOutput, TrainSae
from sae_train.models.registry import register


@register("relu")
class ReluTrainSae(TrainSae):
    inference_architecture = "relu"
    uses_sparsity_coefficient = True

    def forward(self, x_in_ND: Tensor, x_out_ND: Tensor, dead_F: Tensor | None) -> TrainOutput:
        z_NF = self.sae.pre_acts(x_in_ND).relu()
        x_hat = z_NF @ self.sae.W_dec + self.sae.b_dec + self.skip_path(x_in_ND)
        active = z_NF > 0
        return TrainOutput(
            x_hat_ND=x_hat,
            recon=(x_hat.float() - x_out_ND).pow(2).sum(),
            sparsity=(z_NF.float() * self.decoder_norms()).sum(),
            aux=x_hat.new_zeros((), dtype=torch.float32),
            fired_F=active.any(dim=0),
            l0=active.sum().float(),
        )
