"""Detector-gated refusal: a ``refuse`` op answers flagged prompts with its fixed message, others generate."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from pydantic import ValidationError
from tiny_models import EOS_ID, tiny_model, word_tokenizer

from steerlib import SteeringConfig, hooks_installed
from steerlib.hf.generate import generate
from steerlib.hf.recording import record

D = 64
PROMPTS = ["w10 w11 w12 w13", "w50 w60 w70", "w90 w91"]
MESSAGE = "w100 w101 w102"


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model("llama", n_layers=3)


def probe_scores(model: torch.nn.Module, tok: Any, probe: torch.Tensor) -> torch.Tensor:
    enc = tok(
        [
            tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in PROMPTS
        ],
        return_tensors="pt",
        padding=True,
        add_special_tokens=False,
    )
    with record(model, ["blocks.1.hook_resid_post"], select={"positions": [-1]}) as rec, torch.no_grad():
        model(**enc)
    return rec["blocks.1.hook_resid_post"] @ probe


def refuse_cfg(probe: torch.Tensor, above: float, **extra: Any) -> SteeringConfig:
    return SteeringConfig.model_validate({"interventions": [{
        "op": "refuse", "layer": 1, "message": MESSAGE, "name": "harm-probe",
        "apply": {"when": {"vector": probe.tolist(), "above": above, "scope": "prompt"}}, **extra}]})  # fmt: skip


def test_flagged_rows_get_the_message_others_generate_as_usual(model: torch.nn.Module) -> None:
    tok = word_tokenizer()
    probe = torch.randn(D, generator=torch.Generator().manual_seed(3))
    scores = probe_scores(model, tok, probe)
    order = scores.argsort()
    above = float((scores[order[0]] + scores[order[1]]) / 2)  # all rows but the lowest-scoring one fire
    flagged = [bool(s > above) for s in scores]
    assert sum(flagged) == 2
    plain = generate(model, tok, PROMPTS, max_new_tokens=6, min_new_tokens=0)
    out = generate(model, tok, PROMPTS, refuse_cfg(probe, above), max_new_tokens=6, min_new_tokens=0)
    for p, o, f in zip(plain, out, flagged, strict=True):
        if f:
            assert (o.text, o.refused_by, o.n_new_tokens) == (MESSAGE, "harm-probe", 4)  # 3 words + end of turn
        else:
            assert (o.text, o.refused_by) == (p.text, None)
    assert hooks_installed(model) == 0


def test_refusal_follows_per_row_configs(model: torch.nn.Module) -> None:
    tok = word_tokenizer()
    probe = torch.randn(D, generator=torch.Generator().manual_seed(3))
    always = refuse_cfg(probe, -1e9)
    out = generate(model, tok, PROMPTS, [None, always, None], max_new_tokens=5, min_new_tokens=0)
    assert [o.refused_by for o in out] == [None, "harm-probe", None]
    assert out[1].text == MESSAGE


def test_forced_message_ends_with_end_of_turn(model: torch.nn.Module) -> None:
    from transformers import LogitsProcessorList

    from steerlib import steer
    from steerlib.hf.refusal import ForcedRefusal, refusals

    tok = word_tokenizer()
    enc = tok(["w5 w6"], return_tensors="pt")
    probe = torch.randn(D)
    with steer(model, refuse_cfg(probe, -1e9)) as handle, torch.no_grad():
        seq = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=0,
                             logits_processor=LogitsProcessorList([ForcedRefusal(handle, tok)]))  # fmt: skip
        fired = refusals(handle)
    assert seq[0, enc["input_ids"].shape[1] :].tolist() == [100, 101, 102, EOS_ID]
    assert list(fired) == [0] and fired[0].detector == "harm-probe"


@pytest.mark.parametrize(
    ("apply", "message"),
    [
        ({}, "op refuse needs apply.when"),
        ({"when": {"vector": [1.0], "above": 0.0}}, "set apply.when.scope to 'prompt'"),
    ],
)
def test_refuse_needs_a_prompt_condition(apply: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        SteeringConfig.model_validate({"interventions": [{"op": "refuse", "layer": 1, "apply": apply}]})
