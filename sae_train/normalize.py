"""Activation scaling and decoder-bias initialisation.

Training works on activations scaled so that their mean squared norm is ``D`` (dictionary_learning's and SAELens'
``expected_average_only_in`` normalisation): one set of hyperparameters then suits every layer, whose raw norms
differ by an order of magnitude. :func:`fold_scales` writes the scales into the weights, so the saved SAE reads and
writes raw activations. ``b_dec`` starts at the geometric median of the targets (Bricken et al. 2023; sparsify),
computed with Weiszfeld's algorithm.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor

from steerlib.sae import Sae


def norm_scale(x_ND: Tensor) -> float:
    """``c`` with ``mean ||c·x||² = D``."""
    return math.sqrt(x_ND.shape[-1] / float(x_ND.float().pow(2).sum(-1).mean()))


@torch.no_grad()
def fold_scales(sae: Sae, c_in: float, c_out: float) -> Sae:
    """A copy of ``sae`` (trained on ``c_in·x`` -> ``c_out·y``) that maps raw ``x`` to raw ``y``.

    ``pre = (c_in·x - b_dec) W_enc + b_enc`` equals ``(x - b_dec/c_in)(c_in·W_enc) + b_enc``; the output is divided by
    ``c_out``. A latent's value is unchanged, so thresholds stay as they are.
    """
    if sae.subtract_b_dec and not math.isclose(c_in, c_out):
        raise ValueError(f"an SAE that subtracts b_dec needs one scale for input and output, got {c_in} and {c_out}")
    out = copy.deepcopy(sae)
    out.W_enc.mul_(c_in)
    out.W_dec.div_(c_out)
    out.b_dec.div_(c_out)
    if out.W_skip is not None:
        out.W_skip.mul_(c_in / c_out)
    return out


@torch.no_grad()
def geometric_median(points_ND: Tensor, iters: int = 100, tol: float = 1e-6) -> Tensor:
    """The point minimising the sum of Euclidean distances to ``points_ND`` (Weiszfeld's iteration)."""
    pts = points_ND.double()
    guess = pts.mean(0)
    for _ in range(iters):
        w = 1.0 / (pts - guess).norm(dim=1).clamp_min(1e-12)
        new = (w[:, None] * pts).sum(0) / w.sum()
        if (new - guess).norm() <= tol * max(float(guess.norm()), 1.0):
            guess = new
            break
        guess = new
    return guess.to(points_ND.dtype)
