"""Every SAE architecture on tiny seeded random weights: the shared encode/decode contract and each activation rule."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from steerlib.sae import (
    ARCHITECTURES,
    BatchTopKSae,
    GatedSae,
    JumpReluSae,
    Sae,
    SaeMeta,
    SparseLatents,
    TopKSae,
    get_architecture,
    register,
)

D_IN, D_SAE, K = 8, 16, 4
ALL = ["batchtopk", "gated", "jumprelu", "relu", "topk"]


def make_sae(arch: str, *, skip: bool = False, d_out: int = D_IN, global_threshold: bool = True) -> Sae:
    """A random SAE of ``arch`` whose latents are neither all zero nor all active."""
    meta = SaeMeta(arch, D_IN, D_SAE, d_out, k=K if arch in ("topk", "batchtopk") else None)
    subtract = d_out == D_IN
    cls = get_architecture(arch)
    names = {"W_skip"} if skip else set()
    if global_threshold:
        names.add("threshold")
    sae = cls.for_tensors(meta, names, subtract_b_dec=subtract, dtype=torch.float32)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * (0.5 if p.dim() == 2 else 0.2))
        if isinstance(sae, JumpReluSae):
            sae.threshold.copy_(torch.rand(D_SAE) * 0.5)
        if isinstance(sae, BatchTopKSae) and sae.threshold is not None:
            sae.threshold.fill_(0.3)
    return sae


def test_every_registered_architecture_is_covered() -> None:
    assert sorted(ARCHITECTURES) == ALL


@pytest.mark.parametrize("arch", ALL)
def test_forward_is_decode_of_encode(arch: str) -> None:
    sae = make_sae(arch)
    x = torch.randn(3, 5, D_IN)
    z = sae.encode(x)
    assert z.shape == (3, 5, D_SAE)
    assert (z >= 0).all()
    assert 0 < int((z > 0).sum()) < z.numel()
    if isinstance(sae, TopKSae):  # sparse decode sums in another order
        torch.testing.assert_close(sae(x), sae.decode(z, x), rtol=0, atol=1e-6)
    else:
        assert torch.equal(sae(x), sae.decode(z, x))
    assert torch.equal(sae.decode(z), z @ sae.W_dec + sae.b_dec)


@pytest.mark.parametrize("arch", ALL)
def test_skip_transcoder_adds_the_skip_path(arch: str) -> None:
    sae = make_sae(arch, skip=True)
    assert sae.W_skip is not None and sae.is_transcoder
    x = torch.randn(4, D_IN)
    z = sae.encode(x)
    torch.testing.assert_close(sae.decode(z, x), z @ sae.W_dec + sae.b_dec + x @ sae.W_skip, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="skip transcoder"):
        sae.decode(z)


def test_pre_acts_subtract_b_dec_only_when_asked() -> None:
    sae = make_sae("relu")
    x = torch.randn(4, D_IN)
    assert sae.b_enc is not None
    assert torch.equal(sae.pre_acts(x), (x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    sae.subtract_b_dec = False
    assert torch.equal(sae.pre_acts(x), x @ sae.W_enc + sae.b_enc)


def test_relu_is_relu_of_pre() -> None:
    sae = make_sae("relu")
    x = torch.randn(6, D_IN)
    assert torch.equal(sae.encode(x), sae.pre_acts(x).clamp_min(0))


def test_topk_keeps_the_k_largest_per_token() -> None:
    sae = make_sae("topk")
    assert isinstance(sae, TopKSae)
    x = torch.randn(2, 7, D_IN)
    pre = sae.pre_acts(x)
    z = sae.encode(x)
    assert ((z != 0).sum(-1) <= K).all()
    # every token has >= K positive pre-activations here, so exactly K survive: the K largest
    assert ((pre > 0).sum(-1) >= K).all()
    assert ((z != 0).sum(-1) == K).all()
    kth_largest = pre.topk(K, dim=-1).values[..., -1:]
    assert torch.equal(z, torch.where(pre >= kth_largest, pre, 0.0))


def test_topk_with_few_positive_pre_activations_keeps_only_positives() -> None:
    sae = make_sae("topk")
    with torch.no_grad():
        sae.b_enc.fill_(-100.0)  # type: ignore[union-attr]
        sae.b_enc[3] = 100.0  # type: ignore[index]
    z = sae.encode(torch.randn(5, D_IN))
    assert torch.equal((z != 0).sum(-1), torch.ones(5, dtype=torch.long))
    assert (z[:, 3] > 0).all()


def test_topk_sparse_path_matches_dense() -> None:
    sae = make_sae("topk")
    assert isinstance(sae, TopKSae)
    x = torch.randn(3, 4, D_IN)
    lat = sae.encode_sparse(x)
    assert isinstance(lat, SparseLatents)
    assert lat.values.shape == lat.indices.shape == (3, 4, K)
    dense = torch.zeros(3, 4, D_SAE).scatter_(-1, lat.indices, lat.values)
    assert torch.equal(dense, sae.encode(x))
    torch.testing.assert_close(sae.decode_sparse(lat), sae.decode(dense), rtol=0, atol=1e-6)


def test_batchtopk_threshold_is_global_and_strict() -> None:
    sae = make_sae("batchtopk")
    assert isinstance(sae, BatchTopKSae) and sae.threshold is not None
    x = torch.randn(6, D_IN)
    pre = sae.pre_acts(x).detach()
    assert torch.equal(sae.encode(x), torch.where(pre > 0.3, pre, 0.0))
    j = int(pre[0].argmax())
    with torch.no_grad():
        sae.threshold.fill_(float(pre[0, j]))
    assert float(pre[0, j]) > 0 and sae.encode(x)[0, j] == 0  # exactly at the threshold: off


def test_batchtopk_without_threshold_is_per_token_topk() -> None:
    sae = make_sae("batchtopk", global_threshold=False)
    assert isinstance(sae, BatchTopKSae) and sae.threshold is None
    topk = TopKSae(SaeMeta("topk", D_IN, D_SAE, D_IN, k=K), subtract_b_dec=True)
    topk.load_state_dict(sae.state_dict())
    x = torch.randn(5, D_IN)
    assert torch.equal(sae.encode(x), topk.encode(x))
    assert torch.equal(sae(x), topk(x))
    with pytest.raises(ValueError, match=r"k in 1\.\.16"):
        BatchTopKSae(SaeMeta("batchtopk", D_IN, D_SAE, D_IN), global_threshold=False)


def test_jumprelu_zeroes_latents_at_or_below_threshold() -> None:
    sae = make_sae("jumprelu")
    assert isinstance(sae, JumpReluSae)
    x = torch.randn(6, D_IN)
    pre = sae.pre_acts(x)
    j = int(pre[0].argmax())
    with torch.no_grad():
        sae.threshold[j] = pre[0, j]  # exactly at the threshold
    z = sae.encode(x)
    assert z[0, j] == 0
    assert torch.equal(z, torch.where(pre > sae.threshold, pre.clamp_min(0), 0.0))
    above = pre > sae.threshold
    assert (z[~above] == 0).all() and torch.equal(z[above & (pre > 0)], pre[above & (pre > 0)])


def test_jumprelu_negative_threshold_still_rectifies() -> None:
    sae = make_sae("jumprelu")
    with torch.no_grad():
        sae.threshold.fill_(-10.0)  # type: ignore[operator]
    x = torch.randn(4, D_IN)
    assert torch.equal(sae.encode(x), sae.pre_acts(x).clamp_min(0))


def test_gated_uses_gate_for_support_and_magnitude_for_values() -> None:
    sae = make_sae("gated")
    assert isinstance(sae, GatedSae) and sae.b_enc is None
    x = torch.randn(6, D_IN)
    x_enc = (x - sae.b_dec) @ sae.W_enc
    gate = x_enc + sae.b_gate > 0
    mag = (torch.exp(sae.r_mag) * x_enc + sae.b_mag).clamp_min(0)
    z = sae.encode(x)
    assert torch.equal(z, mag * gate)
    assert ((z > 0) <= gate).all()
    assert "b_enc" not in sae.state_dict()


def test_unknown_architecture_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match="unknown SAE architecture 'vanilla'; valid: batchtopk, gated, jumprelu"):
        get_architecture("vanilla")


def test_register_refuses_a_taken_name() -> None:
    with pytest.raises(ValueError, match="'relu' is already registered by ReluSae"):

        @register("relu")
        class Other(Sae):
            def activate(self, pre_BF: Tensor) -> Tensor:
                return pre_BF

    assert ARCHITECTURES["relu"].__name__ == "ReluSae"


def test_meta_must_name_the_class_architecture() -> None:
    with pytest.raises(ValueError, match="TopKSae runs architecture 'topk', meta says 'relu'"):
        TopKSae(SaeMeta("relu", D_IN, D_SAE, D_IN, k=K))


@pytest.mark.parametrize("k", [None, 0, D_SAE + 1])
def test_topk_needs_a_valid_k(k: int | None) -> None:
    with pytest.raises(ValueError, match=r"topk SAE needs k in 1\.\.16"):
        TopKSae(SaeMeta("topk", D_IN, D_SAE, D_IN, k=k))


def test_base_class_is_abstract() -> None:
    with pytest.raises(TypeError, match="abstract"):
        Sae(SaeMeta("base", D_IN, D_SAE, D_IN))  # type: ignore[abstract]


def test_transcoder_widths_and_flag() -> None:
    sae = make_sae("relu", d_out=6)
    assert (sae.d_in, sae.d_sae, sae.d_out) == (8, 16, 6)
    assert sae.is_transcoder and not sae.subtract_b_dec
    assert sae(torch.randn(3, D_IN)).shape == (3, 6)
    assert not make_sae("relu").is_transcoder
    with pytest.raises(ValueError, match="subtract_b_dec needs d_in == d_out"):
        get_architecture("relu")(SaeMeta("relu", D_IN, D_SAE, 6), subtract_b_dec=True)
