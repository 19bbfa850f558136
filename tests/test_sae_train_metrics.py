"""Held-out metrics through steerlib's replace op: a perfect SAE recovers all CE loss, an all-zero SAE none."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import BOS_ID, tiny_model

from sae_train.metrics import evaluate
from steerlib.sae import ReluSae, SaeMeta

SITE = "blocks.1.hook_resid_post"


def _identity_sae(d: int) -> ReluSae:
    """``relu(x) - relu(-x) = x``: a ReLU SAE with latents [x, -x] reconstructs exactly."""
    sae = ReluSae(SaeMeta("relu", d, 2 * d, d, input_site=SITE, output_site=SITE))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
    return sae


def _ids() -> torch.Tensor:
    ids = torch.randint(2, 120, (4, 12), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = BOS_ID
    return ids


def test_a_perfect_sae_recovers_all_loss_and_zero_recovers_none() -> None:
    model = tiny_model("llama")
    perfect = evaluate(model, _identity_sae(64), _ids(), batch=2)
    assert perfect.fvu == pytest.approx(0.0, abs=1e-6)
    assert perfect.ce_loss_recovered == pytest.approx(1.0, abs=1e-4)
    assert perfect.kl_to_clean == pytest.approx(0.0, abs=1e-5)
    assert perfect.ce_zero > perfect.ce_clean
    assert perfect.n_tokens == 4 * 11
    zero = copy.deepcopy(_identity_sae(64))
    with torch.no_grad():
        for p in zero.parameters():
            p.zero_()
    none = evaluate(model, zero, _ids(), batch=2)
    assert none.ce_loss_recovered == pytest.approx(0.0, abs=1e-6)
    assert none.dead_fraction == 1.0 and none.l0 == 0.0


def test_l0_and_dense_fraction_count_active_latents() -> None:
    m = evaluate(tiny_model("llama"), _identity_sae(64), _ids(), batch=4)
    assert m.l0 == pytest.approx(64.0, abs=1.0)  # each dimension is either positive or negative
    assert m.dead_fraction == 0.0 and m.dense_fraction == 1.0
