"""Feature statistics on a tiny model with an SAE whose latents are planted: exact counts, top tokens, VocabProj."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model, word_tokenizer

from steerlib.feature_stats import feature_stats, max_activating_contexts, vocab_projection
from steerlib.hf.recording import record
from steerlib.sae import ReluSae, SaeMeta

D, F = 64, 8
SITE = "blocks.0.hook_resid_pre"  # the token embeddings: a latent can be made to fire on one token only
TEXTS = ["w10 w11 w42 w12", "w42 w13 w14", "w15 w16 w17 w18 w42", "w19 w20"]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model("llama", n_layers=2)


def planted_sae(model: torch.nn.Module) -> ReluSae:
    """Latent 3 fires exactly on token w42 (its embedding's direction, thresholded); latent 5 never fires."""
    emb = model.get_input_embeddings().weight.detach()  # type: ignore[operator]
    e = emb[42] / emb[42].norm()
    sims = emb @ e
    margin = float(sims[42] - sims[torch.arange(len(sims)) != 42].max())
    assert margin > 0
    sae = ReluSae(SaeMeta("relu", D, F, D, SITE, SITE))
    with torch.no_grad():
        sae.W_enc[:, 3] = e
        sae.b_enc[3] = -(float(sims[42]) - margin / 2)
        sae.b_enc[5] = -1e6
        sae.W_dec[3] = model.get_output_embeddings().weight[77].detach()  # type: ignore[operator]
    return sae


def test_planted_feature_statistics(model: torch.nn.Module) -> None:
    tok = word_tokenizer()
    sae = planted_sae(model)
    stats = feature_stats(model, tok, sae, TEXTS, k=4)
    n_tokens = sum(len(tok(t)["input_ids"]) for t in TEXTS)
    assert stats.n_tokens == n_tokens
    assert stats.frequency_F[3] == pytest.approx(3 / n_tokens)  # w42 occurs three times
    assert stats.frequency_F[5] == 0 and stats.max_F[5] == 0
    assert int(stats.hist_FB[3].sum()) == 3 and int(stats.hist_FB[5].sum()) == 0
    found = {(d, p) for d, p in zip(stats.top_doc_FK[3].tolist(), stats.top_pos_FK[3].tolist(), strict=True) if d >= 0}
    tokens = {stats.docs[d][p] for d, p in found}
    assert tokens == {42} and len(found) == 3
    assert stats.top_doc_FK[3].tolist()[3] == -1  # only three active tokens
    # the max agrees with the SAE run on recorded activations
    with record(model, [SITE]) as rec, torch.no_grad():
        model(input_ids=torch.tensor([tok(TEXTS[0])["input_ids"]]))
        first = sae.encode(rec[SITE])[:, 3]
    assert float(stats.max_F[3]) >= float(first.max()) - 1e-6


def test_contexts_and_vocab_projection(model: torch.nn.Module) -> None:
    tok = word_tokenizer()
    sae = planted_sae(model)
    stats = feature_stats(model, tok, sae, TEXTS, k=2)
    contexts = max_activating_contexts(model, tok, sae, stats, 3, window=1)
    assert len(contexts) == 2
    for c in contexts:
        assert c.tokens[c.peak] == "w42"
        assert c.activations[c.peak] > 0 and sum(a > 0 for a in c.activations) == 1
    vp = vocab_projection(model, tok, sae, 3, k=3)
    assert vp.promoted[0][0] == "w77"  # the decoder row is w77's unembedding row
    with pytest.raises(ValueError, match="feature 8 out of range"):
        vocab_projection(model, tok, sae, F)
