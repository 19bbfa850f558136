"""Per-token SAE features on a tiny seeded Llama, with an SAE whose latent 7 is planted on one token's activation."""

from __future__ import annotations

import pytest
import torch
from test_extract import chat_ids, resid_post
from tiny_models import tiny_model, word_tokenizer
from torch import Tensor
from transformers import PreTrainedTokenizerFast

from steerlib import SteeringConfig, steer
from steerlib.inspect_features import FeatureActivation, features_over_response, sae_site, top_features
from steerlib.sae import ReluSae, SaeMeta

D, F, PLANTED = 64, 16, 7
SITE = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model("llama", n_layers=3)


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return word_tokenizer()


def planted_sae(x_TD: Tensor, p: int) -> ReluSae:
    """Latent 7 reads the direction of ``x_TD[p]``, thresholded halfway between its score at p and the best
    score elsewhere, so it fires at p only; the other latents read random unit directions without bias, so
    (Cauchy-Schwarz) none exceeds max ||x||, which latent 7 at p does four times over."""
    u = x_TD[p] / x_TD[p].norm()
    score_T = x_TD @ u
    elsewhere = float(score_T[torch.arange(len(x_TD)) != p].max())
    assert elsewhere < float(score_T[p])  # the token's direction tells it apart in this model
    threshold = (float(score_T[p]) + elsewhere) / 2
    gain = 4 * float(x_TD.norm(dim=-1).max()) / (float(score_T[p]) - threshold)
    sae = ReluSae(SaeMeta("relu", D, F, D, input_site=SITE, output_site=SITE))
    w = torch.randn(D, F, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        sae.W_enc.copy_(w / w.norm(dim=0))
        sae.W_enc[:, PLANTED] = gain * u
        sae.b_enc[PLANTED] = -gain * threshold  # type: ignore[index]
    return sae


def expected_top(sae: ReluSae, x_TD: Tensor, k: int) -> list[tuple[FeatureActivation, ...]]:
    with torch.no_grad():
        return top_of(sae.encode(x_TD), k)


def top_of(latents_TF: Tensor, k: int) -> list[tuple[FeatureActivation, ...]]:
    vals, idx = latents_TF.topk(k, dim=-1)
    return [
        tuple(FeatureActivation(int(i), float(v)) for v, i in zip(vr, ir, strict=True) if v > 0)
        for vr, ir in zip(vals, idx, strict=True)
    ]


def assert_same_top(got: tuple[FeatureActivation, ...], want: tuple[FeatureActivation, ...]) -> None:
    assert [f for f, _ in got] == [f for f, _ in want]
    torch.testing.assert_close(
        torch.tensor([a for _, a in got]), torch.tensor([a for _, a in want]), atol=1e-4, rtol=1e-4
    )


def test_planted_feature_tops_its_token_in_the_prompt(model: torch.nn.Module, tok: PreTrainedTokenizerFast) -> None:
    ids = chat_ids([10, 11, 12, 13])
    x = resid_post(model, ids, 1)
    p = 4  # the token w12
    sae = planted_sae(x, p)
    rows = top_features(model, tok, sae, "w10 w11 w12 w13", k=3)
    assert [r.token for r in rows] == ["<s>", "<user>", "w10", "w11", "w12", "w13", "<assistant>"]
    assert [r.position for r in rows] == list(range(7))
    assert all(r.is_prompt for r in rows)
    assert rows[p].top[0].feature == PLANTED
    assert rows[p].top[0].activation > 3 * float(x.norm(dim=-1).max())
    assert all(PLANTED not in [f for f, _ in r.top] for t, r in enumerate(rows) if t != p)
    for r, want in zip(rows, expected_top(sae, x, 3), strict=True):
        assert len(r.top) <= 3
        assert_same_top(r.top, want)


def test_teacher_forced_response(model: torch.nn.Module, tok: PreTrainedTokenizerFast) -> None:
    prompt, response = chat_ids([10, 11]), [20, 21, 22]
    x = resid_post(model, prompt + response, 1)
    p = len(prompt) + 1  # the token w21
    sae = planted_sae(x, p)
    rows = top_features(model, tok, sae, "w10 w11", response="w20 w21 w22")
    assert [r.is_prompt for r in rows] == [True] * len(prompt) + [False] * 3
    assert [r.token for r in rows[len(prompt) :]] == ["w20", "w21", "w22"]
    assert rows[p].top[0].feature == PLANTED

    peak = features_over_response(model, tok, sae, "w10 w11", response="w20 w21 w22", reduce="max", k=4)
    assert peak.response == "w20 w21 w22" and peak.n_tokens == 3
    assert peak.top[0].feature == PLANTED
    total = features_over_response(model, tok, sae, "w10 w11", response="w20 w21 w22", k=4)
    with torch.no_grad():
        sums = sae.encode(x[len(prompt) :]).sum(0)
    assert_same_top(total.top, top_of(sums[None], 4)[0])


def test_generated_tokens_are_read_under_steering(model: torch.nn.Module, tok: PreTrainedTokenizerFast) -> None:
    prompt = chat_ids([30, 31, 32])
    sae = planted_sae(resid_post(model, prompt, 1), 3)
    v = torch.randn(D, generator=torch.Generator().manual_seed(7)) * 0.5
    cfg = SteeringConfig.model_validate({"interventions": [{"op": "add", "layer": 1, "vector": v.tolist()}]})
    with steer(model, cfg), torch.no_grad():
        out = model.generate(  # type: ignore[operator]
            input_ids=torch.tensor([prompt]), max_new_tokens=3, do_sample=False, pad_token_id=0
        )
        seq = out[0]
        x = resid_post(model, seq.tolist(), 1)  # the steered stream, replayed in one forward
    generated = seq[len(prompt) :].tolist()
    assert 127 not in generated  # no early EOS in this seeded model

    rows = top_features(model, tok, sae, "w30 w31 w32", generate_tokens=3, steering=cfg, k=4)
    assert [r.is_prompt for r in rows] == [True] * len(prompt) + [False] * 3
    assert [r.position for r in rows] == list(range(len(prompt) + 3))
    assert [r.token for r in rows[len(prompt) :]] == [tok.decode([g]) for g in generated]
    for r, want in zip(rows, expected_top(sae, x, 4), strict=True):
        assert_same_top(r.top, want)
    clean = top_features(model, tok, sae, "w30 w31 w32", k=4)
    assert [r.top for r in clean] != [r.top for r in rows[: len(prompt)]]  # the steering was really applied

    over = features_over_response(model, tok, sae, "w30 w31 w32", generate_tokens=3, steering=cfg)
    assert over.n_tokens == 3 and over.response == tok.decode(generated)


def test_sites_and_errors(model: torch.nn.Module, tok: PreTrainedTokenizerFast) -> None:
    sae = ReluSae(SaeMeta("relu", D, F, D, input_site=SITE, output_site=SITE))
    assert sae_site(model, sae) == SITE
    assert sae_site(model, sae, layer=2) == "blocks.2.hook_resid_post"
    assert sae_site(model, sae, layer=0, site="mlp_out") == "blocks.0.hook_mlp_out"
    assert sae_site(model, sae, site="blocks.2.hook_resid_pre") == "blocks.2.hook_resid_pre"
    with pytest.raises(ValueError, match="names layer 2 but layer=1"):
        sae_site(model, sae, layer=1, site="blocks.2.hook_resid_post")
    with pytest.raises(ValueError, match=r"layer 3 out of range: model has 3 layers \(0..2\)"):
        sae_site(model, sae, layer=3)
    with pytest.raises(ValueError, match="names no layer: pass layer="):
        sae_site(model, sae, site="resid_post")
    with pytest.raises(ValueError, match="does not say where it reads"):
        sae_site(model, ReluSae(SaeMeta("relu", D, F, D)))
    with pytest.raises(ValueError, match="the SAE reads width 32 but the model's width is 64"):
        sae_site(model, ReluSae(SaeMeta("relu", 32, F, 32, input_site=SITE)))
    with pytest.raises(ValueError, match="not both"):
        top_features(model, tok, sae, "w10", response="w11", generate_tokens=2)
    with pytest.raises(ValueError, match="no response to read"):
        features_over_response(model, tok, sae, "w10")
