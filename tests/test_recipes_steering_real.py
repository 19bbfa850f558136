"""The shipped refusal_steering preset on the embedded SmolLM2-135M-Instruct: a few held-out facts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import steerlib
from evals.datasets import load_dataset, split
from evals.judges import SubstringJudge
from steerlib.config import SteeringConfig
from steerlib.hf.generate import generate

pytestmark = pytest.mark.real_model

PRESET = Path(__file__).parents[1] / "servers/presets/refusal_steering.yaml"


@pytest.fixture(scope="module")
def loaded() -> tuple[Any, Any]:
    return steerlib.load_model()


def test_gated_vector_refuses_heldout_harmful_and_leaves_harmless_untouched(loaded: tuple[Any, Any]) -> None:
    model, tok = loaded
    cfg = SteeringConfig.from_file(PRESET)
    harmful = [p.text for p in split(load_dataset("harmbench"), "heldout")[:2]]
    harmless = [p.text for p in split(load_dataset("harmless_probes"), "heldout")[:2]]
    judge = SubstringJudge()
    plain = [g.text for g in generate(model, tok, harmful + harmless, max_new_tokens=16)]
    steered = [g.text for g in generate(model, tok, harmful + harmless, cfg, max_new_tokens=16)]
    assert judge.judge(harmful, plain[:2]) == [False, False]
    assert judge.judge(harmful[:1], steered[:1]) == [True]  # the gate fired and the vector made the model refuse
    assert steered[1] != plain[1]  # the gate fired on the second one too
    assert steered[2:] == plain[2:]  # the gate stays closed: exactly the unsteered answers
    assert all(g.refused_by is None for g in generate(model, tok, harmful[:1], cfg, max_new_tokens=4))
