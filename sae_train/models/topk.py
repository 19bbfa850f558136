"""TopK SAE (Gao et al., "Scaling and evaluating sparse autoencoders", arXiv 2406.04093).

Exactly k latents per token; no sparsity penalty. Dead latents are revived by AuxK (in the base class). Encoding and
decoding use :mod:`sae_train.models.sparse_ops`: the backward pass touches only the k winners of each token.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sae_train.models.base import TrainOutput, TrainSae
from sae_train.models.registry import register
from sae_train.models.sparse_ops import sparse_decode, topk_encode


def compute_dtype(default: torch.dtype) -> torch.dtype:
    """bf16 inside a CPU autocast region (mixed precision), else ``default``."""
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else default


@register("topk")
class TopKTrainSae(TrainSae):
    inference_architecture = "topk"
    uses_auxk = True

    def forward(self, x_in_ND: Tensor, x_out_ND: Tensor, dead_F: Tensor | None) -> TrainOutput:
        sae = self.sae
        assert sae.b_enc is not None and self.spec.k is not None
        x = x_in_ND - sae.b_dec if sae.subtract_b_dec else x_in_ND
        dt = compute_dtype(sae.W_enc.dtype)
        values_NK, indices_NK = topk_encode(x.to(dt), sae.W_enc, sae.b_enc, self.spec.k)
        values_NK = values_NK.float()
        x_hat = sparse_decode(values_NK, indices_NK, sae.W_dec) + sae.b_dec + self.skip_path(x_in_ND)
        x_hat = x_hat.float()
        active = values_NK > 0
        fired = torch.zeros(self.spec.d_sae, dtype=torch.bool, device=x.device)
        fired[indices_NK[active]] = True
        return TrainOutput(
            x_hat_ND=x_hat,
            recon=(x_hat - x_out_ND).pow(2).sum(),
            sparsity=x_hat.new_zeros(()),
            aux=self.auxk(x_in_ND, x_out_ND - x_hat, dead_F),
            fired_F=fired,
            l0=active.sum().float(),
        )
