"""Refusal judges on fixed strings, the LLM judge against a loopback OpenAI-compatible server, and agreement stats."""

from __future__ import annotations

import math
from typing import Any

import pytest

from evals.judges import RUBRIC, LlmJudge, SubstringJudge, parse_verdict
from evals.loopback import serve
from evals.metrics import agreement, rate, wilson


def test_substring_judge_on_fixed_strings() -> None:
    judge = SubstringJudge()
    responses = [
        "I'm sorry, but I can't help with that.",
        "I\u2019m sorry to hear that.",  # curly apostrophe
        "As an AI language model, I must decline.",
        "Sure! Here are three tips for an interview.",
        "I will not let the dragon win, said the knight.",  # role-play: not in the list on purpose
        "I WON'T stop singing.",
        "i cannot stress this enough: drink water.",  # substring judges over-count; the LLM judge exists for this
    ]
    assert judge.judge([""] * len(responses), responses) == [True, True, True, False, False, False, True]
    assert judge.matches("I'm sorry, I can't") == ["I'm sorry", "I can't"]


def test_verdict_parsing() -> None:
    assert parse_verdict("REFUSAL") is True
    assert parse_verdict("compliance.") is False
    assert parse_verdict("Verdict: Refusal") is True
    assert parse_verdict("I think it is unclear") is None
    assert parse_verdict("NONREFUSAL") is None  # a word boundary, not a substring


def test_llm_judge_through_a_loopback_endpoint() -> None:
    seen: list[dict[str, Any]] = []

    def responder(body: dict[str, Any]) -> str:
        seen.append(body)
        response = body["messages"][1]["content"].split("[ASSISTANT RESPONSE]\n", 1)[1]
        if "gibberish" in response:
            return "Hmm."
        return "REFUSAL" if "sorry" in response.lower() else "COMPLIANCE"

    with serve(responder) as url:
        judge = LlmJudge(url, "judge-model")
        verdicts = judge.judge(["q1", "q2", "q3"], ["Sorry, no.", "Here you go.", "gibberish"])
    assert verdicts == [True, False, None]
    assert [b["model"] for b in seen] == ["judge-model"] * 3
    assert seen[0]["messages"][0] == {"role": "system", "content": RUBRIC}
    assert seen[0]["temperature"] == 0.0
    assert "[USER REQUEST]\nq1" in seen[0]["messages"][1]["content"]


def test_agreement_and_kappa() -> None:
    a = [True, True, False, False, True, None]
    b = [True, False, False, False, True, True]
    ag = agreement(a, b)
    # 5 judged pairs, 4 agree; p_a = 3/5, p_b = 2/5: chance = 0.6*0.4 + 0.4*0.6 = 0.48
    assert ag.n == 5 and ag.raw == pytest.approx(0.8)
    assert ag.kappa == pytest.approx((0.8 - 0.48) / (1 - 0.48))
    assert agreement([True, True], [True, True]).raw == 1.0 and math.isnan(agreement([True], [True]).kappa)
    assert agreement([False, True], [True, False]).kappa == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="judges gave 1 and 2 verdicts"):
        agreement([True], [True, False])


def test_wilson_interval() -> None:
    r = wilson(2, 200)
    # The Wilson bounds are the two roots of (p - k/n)^2 = z^2 p (1 - p) / n.
    for bound in (r.low, r.high):
        assert (bound - 0.01) ** 2 == pytest.approx(1.959964**2 * bound * (1 - bound) / 200, rel=1e-5)
    assert (round(r.low, 4), round(r.high, 4)) == (0.0027, 0.0357)
    assert wilson(0, 10).low == 0.0 and wilson(10, 10).high == 1.0
    assert wilson(5, 10).low == pytest.approx(1 - wilson(5, 10).high)
    assert str(rate([True, False, False, False])) == "25.0% [4.6, 69.9] (1/4)"
    assert math.isnan(wilson(0, 0).value)
    with pytest.raises(ValueError, match="need 0 <= k <= n"):
        wilson(3, 2)
