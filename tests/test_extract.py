"""Steering-vector extraction on tiny seeded models, checked against activations computed independently."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import ASSISTANT, BOS, USER, tiny_model, word_tokenizer
from torch import Tensor
from transformers import PreTrainedTokenizerFast

from steerlib import SteeringConfig, load_vector, steer
from steerlib.extract import contrastive, diff_of_means, pca_direction, principal_direction, sae_decoder_row
from steerlib.sae import ReluSae, SaeMeta

D = 64


def words(ids: list[int]) -> str:
    return " ".join(f"w{i}" for i in ids)


def chat_ids(ids: list[int]) -> list[int]:
    """What the chat template renders a one-turn prompt of these words to, written out by hand."""
    return [BOS, USER, *ids, ASSISTANT]


def resid_post(model: torch.nn.Module, ids: list[int], layer: int) -> Tensor:
    """``(T, D)`` resid_post of ``layer`` for one unpadded sequence (layer < n_layers - 1: the last is normed)."""
    with torch.no_grad():
        h: Tensor = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[layer + 1][0]
    return h


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    m = tiny_model("llama", n_layers=3)
    m.config.name_or_path = "tiny-llama"
    return m


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return word_tokenizer()


POSITIVE = [[10, 11, 12], [13, 14], [15, 16, 17, 18, 19]]
NEGATIVE = [[30, 31], [32, 33, 34, 35]]
PAIRS = [([50, 51], [60, 61, 62], [70]), ([52, 53, 54], [63], [71, 72]), ([55], [64, 65], [73, 74, 75])]


def test_tokenizer_renders_the_chat_template(tok: PreTrainedTokenizerFast) -> None:
    text = tok.apply_chat_template([{"role": "user", "content": "w10 w11"}], tokenize=False, add_generation_prompt=True)
    assert tok(text, add_special_tokens=False)["input_ids"] == chat_ids([10, 11])


def test_diff_of_means_at_last_prompt_token(model: torch.nn.Module, tok: PreTrainedTokenizerFast) -> None:
    vec = diff_of_means(
        model, tok, [words(p) for p in POSITIVE], [words(n) for n in NEGATIVE], layers=[0, 1], batch_size=2
    )
    assert set(vec.by_layer) == {0, 1}
    for layer in (0, 1):
        pos = torch.stack([resid_post(model, chat_ids(p), layer)[-1] for p in POSITIVE]).mean(0)
        neg = torch.stack([resid_post(model, chat_ids(n), layer)[-1] for n in NEGATIVE]).mean(0)
        torch.testing.assert_close(vec.by_layer[layer], pos - neg, atol=1e-5, rtol=1e-5)
    assert vec.metadata == {
        "model": "tiny-llama",
        "site": "resid_post",
        "method": "diff_of_means",
        "at": "last_prompt_token",
        "chat": "true",
        "n_examples": "5",
        "n_positive": "3",
        "n_negative": "2",
        "layers": "[0, 1]",
    }


def test_diff_of_means_over_response_tokens(model: torch.nn.Module, tok: PreTrainedTokenizerFast) -> None:
    pos_pairs = [(words(p), words(r)) for p, r, _ in PAIRS]
    neg_pairs = [(words(p), words(r)) for p, _, r in PAIRS[:2]]
    vec = diff_of_means(model, tok, pos_pairs, neg_pairs, layers=1, at="response_mean", chat=False)
    assert set(vec.by_layer) == {None}  # an int layer gives a layer-independent vector
    assert vec.metadata["layer"] == "1" and vec.metadata["at"] == "response_mean"

    def mean_over_response(prompt: list[int], response: list[int]) -> Tensor:
        return resid_post(model, prompt + response, 1)[len(prompt) :].mean(0)  # chat=False: no template, no BOS

    pos = torch.stack([mean_over_response(p, r) for p, r, _ in PAIRS]).mean(0)
    neg = torch.stack([mean_over_response(p, r) for p, _, r in PAIRS[:2]]).mean(0)
    torch.testing.assert_close(vec.by_layer[None], pos - neg, atol=1e-5, rtol=1e-5)
    one_batch = diff_of_means(model, tok, pos_pairs, neg_pairs, layers=1, at="response_mean", chat=False, batch_size=1)
    torch.testing.assert_close(one_batch.by_layer[None], vec.by_layer[None], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "gemma2"])
def test_padded_batches_match_rows_run_alone(arch: str, tok: PreTrainedTokenizerFast) -> None:
    """GPT-2's learned absolute positions would shift under left padding if positions counted the padding."""
    m = tiny_model(arch, n_layers=2)
    vec = diff_of_means(m, tok, [words(p) for p in POSITIVE], [words(n) for n in NEGATIVE], layers=[0], batch_size=3)
    pos = torch.stack([resid_post(m, chat_ids(p), 0)[-1] for p in POSITIVE]).mean(0)
    neg = torch.stack([resid_post(m, chat_ids(n), 0)[-1] for n in NEGATIVE]).mean(0)
    torch.testing.assert_close(vec.by_layer[0], pos - neg, atol=1e-5, rtol=1e-5)


def completion_means(model: torch.nn.Module, layer: int, which: int) -> Tensor:
    """``(N, D)``: per pair, resid_post of ``layer`` averaged over completion ``which`` (1 positive, 2 negative)."""
    return torch.stack(
        [resid_post(model, chat_ids(p[0]) + p[which], layer)[len(chat_ids(p[0])) :].mean(0) for p in PAIRS]
    )


def test_caa_is_the_mean_paired_difference_and_steers_toward_positive(
    model: torch.nn.Module, tok: PreTrainedTokenizerFast
) -> None:
    pairs = [(words(p), words(a), words(b)) for p, a, b in PAIRS]
    vec = contrastive(model, tok, pairs, layers=0, progress=True)
    v = vec.by_layer[None]
    pos0, neg0 = completion_means(model, 0, 1), completion_means(model, 0, 2)
    torch.testing.assert_close(v, (pos0 - neg0).mean(0), atol=1e-5, rtol=1e-5)
    assert vec.metadata["method"] == "caa" and vec.metadata["n_pairs"] == "3"

    def add(c: float) -> SteeringConfig:
        return SteeringConfig.model_validate(
            {"interventions": [{"op": "add", "layer": 0, "vector": v.tolist(), "coefficient": c}]}
        )

    pos1, neg1 = completion_means(model, 1, 1), completion_means(model, 1, 2)
    with steer(model, add(1.0)):
        toward0, toward1 = completion_means(model, 0, 2), completion_means(model, 1, 2)
    with steer(model, add(-1.0)):
        away1 = completion_means(model, 1, 2)
    # Where it was measured, +v carries the negatives' mean exactly onto the positives' mean ...
    torch.testing.assert_close(toward0.mean(0), pos0.mean(0), atol=1e-5, rtol=1e-5)
    # ... and a layer later +v has moved them toward the positives, -v away.
    gap = [float((x.mean(0) - pos1.mean(0)).norm()) for x in (toward1, neg1, away1)]
    assert gap[0] < gap[1] < gap[2]


def planted_model(u: Tensor, amounts: Tensor, noise: float) -> torch.nn.Module:
    """A one-layer model whose embedding of word 20+i is that of word 40+i plus ``amounts[i] * u`` (+ noise)."""
    m = tiny_model("llama", n_layers=1, seed=3)
    emb = m.get_input_embeddings().weight
    assert isinstance(emb, Tensor)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for i, a in enumerate(amounts):
            emb[20 + i] = emb[40 + i] + a * u + noise * torch.randn(D, generator=gen)
    return m


@pytest.mark.parametrize("center", [True, False])
def test_pca_recovers_a_planted_direction(tok: PreTrainedTokenizerFast, center: bool) -> None:
    u = torch.randn(D, generator=torch.Generator().manual_seed(5))
    u = u / u.norm()
    amounts = torch.tensor([0.5, 1.0, 1.5, 2.0, 0.8, 1.2])
    m = planted_model(u, amounts, noise=0.01)
    # resid_pre of layer 0 is the embedding, so each paired difference is amounts[i] * u + noise.
    pairs = [(words([90 + i]), f"w{20 + i}", f"w{40 + i}") for i in range(len(amounts))]
    vec = pca_direction(m, tok, pairs, layers=[0], site="resid_pre", center=center)
    v = vec.by_layer[0]
    assert float(torch.cosine_similarity(v, u, dim=0)) > 0.99
    caa = contrastive(m, tok, pairs, layers=[0], site="resid_pre").by_layer[0]
    torch.testing.assert_close(v @ v, caa @ v, atol=1e-5, rtol=1e-5)  # length = mean difference along v
    assert abs(float(v.norm()) - float(amounts.mean())) < 0.05
    assert vec.metadata["method"] == "pca" and vec.metadata["center"] == str(center).lower()


def test_principal_direction_sign_scale_and_degenerate_inputs() -> None:
    u = torch.zeros(D)
    u[3] = 1.0
    diffs = torch.tensor([1.0, 2.0, 3.0, -0.5])[:, None] * u  # mean 1.375 along u
    for center in (True, False):
        torch.testing.assert_close(principal_direction(diffs, center=center), 1.375 * u)
        torch.testing.assert_close(principal_direction(-diffs, center=center), -1.375 * u)
    same = torch.ones(5, 1) * u
    torch.testing.assert_close(principal_direction(same, center=False), u)
    with pytest.raises(ValueError, match="do not vary"):
        principal_direction(same)
    with pytest.raises(ValueError, match="at least 2 pairs"):
        principal_direction(diffs[:1])


def test_save_load_keeps_vectors_and_metadata(
    model: torch.nn.Module, tok: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    vec = diff_of_means(model, tok, [words(p) for p in POSITIVE], [words(n) for n in NEGATIVE], layers=[0, 1])
    path = vec.save(tmp_path / "dom.safetensors")
    back = load_vector(path)
    assert back.metadata == vec.metadata
    assert set(back.by_layer) == {0, 1}
    for layer in (0, 1):
        assert torch.equal(back.by_layer[layer], vec.by_layer[layer])
    # A config applies the file layer by layer.
    ids = chat_ids(POSITIVE[0])
    cfg = SteeringConfig.from_dict(
        {"interventions": [{"op": "add", "layer": [0], "vector": "dom.safetensors"}]}, base_dir=tmp_path
    )
    with steer(model, cfg):
        steered = resid_post(model, ids, 0)
    torch.testing.assert_close(steered, resid_post(model, ids, 0) + vec.by_layer[0], atol=1e-6, rtol=0)


def test_sae_decoder_row() -> None:
    meta = SaeMeta("relu", D, 16, D, input_site="blocks.1.hook_resid_post", output_site="blocks.1.hook_resid_post")
    sae = ReluSae(meta)
    with torch.no_grad():
        sae.W_dec.copy_(torch.randn(16, D))
    vec = sae_decoder_row(sae, 7)
    assert torch.equal(vec.by_layer[None], sae.W_dec[7].detach())
    assert vec.metadata == {
        "method": "sae_decoder_row",
        "feature": "7",
        "sae_architecture": "relu",
        "d_sae": "16",
        "sae_site": "blocks.1.hook_resid_post",
        "site": "resid_post",
        "layer": "1",
    }
    with pytest.raises(ValueError, match=r"feature 16 out of range: the SAE has 16 latents \(0..15\)"):
        sae_decoder_row(sae, 16)


def test_bad_arguments_are_named(model: torch.nn.Module, tok: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ValueError, match=r"layer 3 out of range: model has 3 layers \(0..2\)"):
        diff_of_means(model, tok, ["w5"], ["w6"], layers=[1, 3])
    with pytest.raises(ValueError, match="unknown site 'resid_mid'"):
        diff_of_means(model, tok, ["w5"], ["w6"], layers=1, site="resid_mid")
    with pytest.raises(ValueError, match=r"positive\[0\]: at='response_mean' takes \(prompt, response\) pairs"):
        diff_of_means(model, tok, ["w5"], ["w6"], layers=1, at="response_mean")
    with pytest.raises(ValueError, match=r"pairs\[0\] negative: response '' tokenizes to no tokens"):
        contrastive(model, tok, [("w5", "w6", "")], layers=1)
    with pytest.raises(ValueError, match="need positive and negative examples"):
        diff_of_means(model, tok, ["w5"], [], layers=1)
