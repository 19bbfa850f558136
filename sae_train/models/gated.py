"""Gated SAE (Rajamanoharan et al., "Improving Dictionary Learning with Gated Sparse Autoencoders",
arXiv 2404.16014).

A gate path decides *which* latents fire (``x_enc + b_gate > 0``), a magnitude path with tied weights
(``exp(r_mag) · x_enc + b_mag``) decides *how much*, so the L1 penalty on the gate no longer shrinks magnitudes.
Loss: reconstruction + λ · L1 of ``relu(π_gate)`` (decoder-norm weighted) + an auxiliary loss that reconstructs the
input from ``relu(π_gate)`` through a frozen copy of the decoder, which gives the gate's weights a gradient.
"""

from __future__ import annotations

from torch import Tensor

from sae_train.models.base import TrainOutput, TrainSae
from sae_train.models.registry import register
from steerlib.sae import GatedSae


@register("gated")
class GatedTrainSae(TrainSae):
    inference_architecture = "gated"
    uses_sparsity_coefficient = True

    def forward(self, x_in_ND: Tensor, x_out_ND: Tensor, dead_F: Tensor | None) -> TrainOutput:
        sae = self.sae
        assert isinstance(sae, GatedSae)
        x_enc_NF = sae.pre_acts(x_in_ND)
        pi_gate = x_enc_NF + sae.b_gate
        z_NF = sae.activate(x_enc_NF)  # (pi_gate > 0) * relu(exp(r_mag) * x_enc + b_mag)
        skip = self.skip_path(x_in_ND)
        x_hat = (z_NF @ sae.W_dec + sae.b_dec + skip).float()
        gate_post = pi_gate.relu()
        via_gate = (gate_post @ sae.W_dec.detach() + sae.b_dec.detach() + skip).float()
        active = z_NF > 0
        return TrainOutput(
            x_hat_ND=x_hat,
            recon=(x_hat - x_out_ND).pow(2).sum(),
            sparsity=(gate_post.float() * self.decoder_norms()).sum(),
            aux=(via_gate - x_out_ND).pow(2).sum(),
            fired_F=active.any(dim=0),
            l0=active.sum().float(),
        )
