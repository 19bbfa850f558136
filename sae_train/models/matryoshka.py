"""Matryoshka BatchTopK SAE (Bussmann et al., "Learning Multi-Level Features with Matryoshka SAEs", arXiv 2503.17547).

The dictionary is a chain of nested prefixes ``m_1 < m_2 < ... < F``; each prefix alone must reconstruct the input,
so early latents learn general features and later ones refine them (a hierarchy instead of feature absorption).
The loss averages the reconstruction errors of every prefix. Latents are chosen by BatchTopK over the whole
dictionary, and the saved SAE is an ordinary steerlib ``batchtopk`` (latent order carries the hierarchy).
"""

from __future__ import annotations

from torch import Tensor

from sae_train.config import SaeConfig
from sae_train.models.base import TrainOutput
from sae_train.models.batchtopk import BatchTopKTrainSae
from sae_train.models.registry import register


@register("matryoshka")
class MatryoshkaTrainSae(BatchTopKTrainSae):
    inference_architecture = "batchtopk"

    def __init__(self, cfg: SaeConfig, d_in: int, d_out: int, model: str | None = None) -> None:
        super().__init__(cfg, d_in, d_out, model)
        self.prefixes = tuple(self.cfg.matryoshka_prefixes or ())
        p = self.prefixes
        if not p or list(p) != sorted(set(p)) or p[-1] != self.d_sae or p[0] < 1:
            raise ValueError(
                f"matryoshka_prefixes must ascend strictly from >= 1 and end at d_sae={self.d_sae}, got {list(p)}"
            )

    def forward(self, x_in_ND: Tensor, x_out_ND: Tensor, dead_F: Tensor | None) -> TrainOutput:
        z_NF = self.latents(x_in_ND)
        sae = self.sae
        x_hat = sae.b_dec + self.skip_path(x_in_ND)
        recon = x_out_ND.new_zeros(())
        start = 0
        for end in self.prefixes:  # add one group of latents at a time; each partial sum is a prefix
            x_hat = x_hat + z_NF[:, start:end] @ sae.W_dec[start:end]
            recon = recon + (x_hat.float() - x_out_ND).pow(2).sum()
            start = end
        recon = recon / len(self.prefixes)
        return self.output(z_NF, x_hat.float(), recon, x_in_ND, x_out_ND, dead_F)
