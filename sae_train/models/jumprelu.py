"""JumpReLU SAE (Rajamanoharan et al., "Jumping Ahead: Improving Reconstruction Fidelity with JumpReLU Sparse
Autoencoders", arXiv 2407.14435).

``z = pre · H(pre - θ)`` with a learned threshold θ_f per latent, trained with an L0 penalty. Neither the step nor
L0 has a useful gradient with respect to θ, so both use the paper's straight-through estimators: a rectangle kernel
of width ε (``bandwidth``) around the threshold stands in for the Dirac delta. θ is stored as ``log θ`` (positive).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx

from sae_train.config import SaeConfig
from sae_train.models.base import TrainOutput, TrainSae
from sae_train.models.registry import register
from steerlib.sae import JumpReluSae


def _rectangle(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpRelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, pre: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth  # type: ignore[attr-defined]
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad * (pre > theta)
        grad_theta = (-(theta / eps) * _rectangle((pre - theta) / eps) * grad).sum(0)
        return grad_pre, grad_theta, None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, pre: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth  # type: ignore[attr-defined]
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, None]:
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        return None, (-(1.0 / eps) * _rectangle((pre - theta) / eps) * grad).sum(0), None


@register("jumprelu")
class JumpReluTrainSae(TrainSae):
    inference_architecture = "jumprelu"
    uses_sparsity_coefficient = True

    def __init__(self, cfg: SaeConfig, d_in: int, d_out: int, model: str | None = None) -> None:
        super().__init__(cfg, d_in, d_out, model)
        self.log_threshold = nn.Parameter(
            torch.full((self.d_sae,), math.log(self.cfg.jumprelu_init_threshold), device="cpu")
        )

    def forward(self, x_in_ND: Tensor, x_out_ND: Tensor, dead_F: Tensor | None) -> TrainOutput:
        pre_NF = self.sae.pre_acts(x_in_ND).float()
        theta_F = self.log_threshold.exp()
        bw = self.cfg.jumprelu_bandwidth
        z_NF = _JumpRelu.apply(pre_NF, theta_F, bw)
        l0_N = _Step.apply(pre_NF, theta_F, bw).sum(-1)
        x_hat = (z_NF @ self.sae.W_dec + self.sae.b_dec + self.skip_path(x_in_ND)).float()
        active = z_NF > 0
        return TrainOutput(
            x_hat_ND=x_hat,
            recon=(x_hat - x_out_ND).pow(2).sum(),
            sparsity=l0_N.sum(),
            aux=x_hat.new_zeros(()),
            fired_F=active.any(dim=0),
            l0=active.sum().float(),
        )

    def export(self) -> JumpReluSae:
        sae = self.sae
        assert isinstance(sae, JumpReluSae)
        with torch.no_grad():
            sae.threshold.copy_(self.log_threshold.exp())
        return sae
