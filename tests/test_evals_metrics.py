"""Coherence, capability-cost and SAE-quality metrics on a tiny seeded model, checked against direct computations."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model, word_tokenizer
from transformers import PreTrainedTokenizerFast

from evals.capability import mmlu_accuracy, text_cost
from evals.coherence import repetition, response_perplexity, score
from evals.datasets import McQuestion
from evals.sae_quality import sae_quality
from steerlib import SteeringConfig, steer
from steerlib.sae import ReluSae, SaeMeta, save_sae

D = 64


def chat_ids(ids: list[int]) -> list[int]:
    """What tiny_models.CHAT_TEMPLATE renders a one-turn prompt of these words to: <s> <user> ... <assistant>."""
    return [1, 2, *ids, 3]


def tokenizer() -> PreTrainedTokenizerFast:
    """The shared word tokenizer (``w{i}`` is id i) with the letters A..D as ids 123..126."""
    return word_tokenizer({c: 123 + j for j, c in enumerate("ABCD")})


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model("llama", n_layers=3)


def _nll(model: torch.nn.Module, ids: list[int], start: int) -> list[float]:
    """Per-token NLL of ids[start:] in one unpadded forward."""
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    return [-float(lp[t - 1, ids[t]]) for t in range(max(start, 1), len(ids))]


def _add(v: torch.Tensor, layer: int = 1) -> SteeringConfig:
    return SteeringConfig.model_validate({"interventions": [{"op": "add", "layer": layer, "vector": v.tolist()}]})


def test_repetition_and_degeneracy_flags() -> None:
    assert repetition("a b c d e") == 0.0
    assert repetition("a b") == 0.0
    assert repetition("sorry sorry sorry sorry sorry sorry") == pytest.approx(1 - 1 / 4)
    assert repetition("a b c a b c") == pytest.approx(1 - 3 / 4)
    flags = score(["fine text here", "no no no no no no no no", "", "ok"], [3.0, 2.0, math.nan, 500.0])
    assert [c.degenerate for c in flags] == [False, True, True, True]
    assert score(["ok"])[0].perplexity != score(["ok"])[0].perplexity  # NaN without a model


def test_response_perplexity_matches_unpadded_forwards(model: torch.nn.Module) -> None:
    tok = tokenizer()
    prompts, responses = ["w10 w11 w12", "w13"], ["w20 w21", "w30 w31 w32 w33"]
    got = response_perplexity(model, tok, prompts, responses, batch_size=2)
    for p, r, g in zip([[10, 11, 12], [13]], [[20, 21], [30, 31, 32, 33]], got, strict=True):
        ids = chat_ids(p)
        nll = _nll(model, ids + r, len(ids))
        assert g == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-4)
    assert math.isnan(response_perplexity(model, tok, ["w10"], [""])[0])


def test_text_cost_against_direct_computation(model: torch.nn.Module) -> None:
    tok = tokenizer()
    texts = ["w10 w11 w12 w13", "w40 w41"]
    clean = text_cost(model, tok, texts, None, batch_size=2)
    assert tok("w10")["input_ids"] == [10]  # this tokenizer adds no BOS
    nll = _nll(model, [10, 11, 12, 13], 0) + _nll(model, [40, 41], 0)
    assert clean.n_tokens == 4 and clean.kl == 0.0
    assert clean.ce_steered == clean.ce_unsteered == pytest.approx(sum(nll) / 4, rel=1e-5)
    v = torch.randn(D, generator=torch.Generator().manual_seed(1)) * 3
    steered = text_cost(model, tok, texts, _add(v), batch_size=1)
    assert steered.ce_unsteered == pytest.approx(clean.ce_unsteered, rel=1e-5)
    with steer(model, _add(v)):
        s_nll = _nll(model, [10, 11, 12, 13], 0) + _nll(model, [40, 41], 0)
    assert steered.ce_steered == pytest.approx(sum(s_nll) / 4, rel=1e-5)
    assert steered.kl > 0.0


def test_mmlu_accuracy_is_the_argmax_letter(model: torch.nn.Module) -> None:
    tok = tokenizer()
    qs = [McQuestion(f"q{i}", f"w{10 + i} w{20 + i}", ("w5", "w6", "w7", "w8"), i % 4, "s") for i in range(8)]

    def expected(config: SteeringConfig | None) -> int:
        correct = 0
        for q in qs:
            text = f"{q.question}\nA. w5\nB. w6\nC. w7\nD. w8\nAnswer with the letter of the correct choice."
            rendered = tok.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
            ids = torch.tensor([tok(rendered, add_special_tokens=False)["input_ids"]])
            with torch.no_grad(), steer(model, config) if config else torch.no_grad():
                logits = model(input_ids=ids).logits[0, -1, 123:127]
            correct += int(logits.argmax()) == q.answer
        return correct

    assert mmlu_accuracy(model, tok, qs, batch_size=3).k == expected(None)
    cfg = _add(torch.randn(D, generator=torch.Generator().manual_seed(2)) * 5, layer=2)
    assert mmlu_accuracy(model, tok, qs, cfg, batch_size=8).k == expected(cfg)
    assert mmlu_accuracy(model, tok, qs).n == 8


def test_sae_quality_exact_sae_and_zero_sae(model: torch.nn.Module, tmp_path: Path) -> None:
    """x = relu(x) - relu(-x): an SAE with W_enc = [I, -I], W_dec = [I; -I] reconstructs exactly."""
    tok = tokenizer()
    exact = ReluSae(SaeMeta("relu", D, 2 * D, D))
    eye = torch.eye(D)
    with torch.no_grad():
        exact.W_enc.copy_(torch.cat([eye, -eye], 1))
        exact.W_dec.copy_(torch.cat([eye, -eye], 0))
    save_sae(exact, tmp_path / "exact")
    save_sae(ReluSae(SaeMeta("relu", D, 4, D)), tmp_path / "zero")
    texts = ["w10 w11 w12 w13 w14", "w40 w41 w42"]
    q = sae_quality(model, tok, tmp_path / "exact", layer=1, texts=texts)
    assert q.n_tokens == 6  # position 0 of each text left out
    assert q.fvu == pytest.approx(0.0, abs=1e-10)
    assert q.l0 == D  # every coordinate is non-zero: one latent of each pair fires
    with torch.no_grad():  # a latent is dead when its sign never occurs in its coordinate
        h = torch.cat(
            [
                model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[2][0, 1:]
                for ids in ([10, 11, 12, 13, 14], [40, 41, 42])
            ]
        )
    alive = int((h > 0).any(0).sum()) + int((h < 0).any(0).sum())
    assert q.dead_fraction == pytest.approx(1 - alive / (2 * D)) and 0 < q.dead_fraction < 0.5
    assert q.ce_sae == pytest.approx(q.ce_clean, abs=1e-5)
    assert q.ce_recovered == pytest.approx(1.0, abs=1e-4)
    assert q.ce_zero > q.ce_clean
    z = sae_quality(model, tok, tmp_path / "zero", layer=1, texts=texts)
    assert z.ce_recovered == pytest.approx(0.0, abs=1e-6) and z.l0 == 0.0 and z.dead_fraction == 1.0
    assert z.fvu == pytest.approx(float("inf")) or z.fvu > 1.0
