"""End-to-end facts on the embedded SmolLM2-135M-Instruct (loaded once for the module)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import steerlib
from sae_train.metrics import evaluate
from steerlib.hf.generate import generate

pytestmark = pytest.mark.real_model

PROMPTS = ["What is a good hobby to pick up this year?", "Give me three tips for a job interview."]


@pytest.fixture(scope="module")
def loaded() -> tuple[Any, Any]:
    return steerlib.load_model()


def _cfg(vector: list[float], layer: int = 12, coefficient: float = 6.0) -> steerlib.SteeringConfig:
    return steerlib.SteeringConfig.model_validate(
        {"interventions": [{"op": "add", "layer": layer, "vector": vector, "coefficient": coefficient}]}
    )


def test_steered_generation_differs_and_is_deterministic(loaded: tuple[Any, Any]) -> None:
    model, tok = loaded
    v = torch.randn(576, generator=torch.Generator().manual_seed(0))
    v = (v / v.norm() * 20).tolist()
    plain = [g.text for g in generate(model, tok, PROMPTS, max_new_tokens=24)]
    first = [g.text for g in generate(model, tok, PROMPTS, _cfg(v), max_new_tokens=24)]
    second = [g.text for g in generate(model, tok, PROMPTS, _cfg(v), max_new_tokens=24)]
    assert first == second
    assert all(a != b for a, b in zip(plain, first, strict=True))
    assert plain == [g.text for g in generate(model, tok, PROMPTS, max_new_tokens=24)]  # nothing left behind
    assert steerlib.hooks_installed(model) == 0


def test_hidden_states_show_the_steered_stream(loaded: tuple[Any, Any]) -> None:
    """transformers 5 records hidden states with its own hooks; steering must run before them."""
    model, tok = loaded
    enc = tok(["Hello there"], return_tensors="pt")
    v = torch.randn(576, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        clean = model(**enc, output_hidden_states=True).hidden_states
        with steerlib.steer(model, _cfg(v.tolist(), layer=12, coefficient=1.0)):
            steered = model(**enc, output_hidden_states=True).hidden_states
    torch.testing.assert_close(steered[13], clean[13] + v, atol=1e-4, rtol=0)
    torch.testing.assert_close(steered[12], clean[12], atol=0, rtol=0)


def test_demo_steers_only_the_harmful_prompts(capsys: pytest.CaptureFixture[str]) -> None:
    """The shipped demo (conditional refusal steering): harmless answers unchanged, harmful ones steered."""
    import json

    from steerlib.__main__ import DEMO_PROMPTS, main

    assert main(["demo", "--json", "--max-new-tokens", "12"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == DEMO_PROMPTS
    unchanged = [r["unsteered"] == r["steered"] for r in rows]
    assert unchanged == [True, True, False, False]
    assert all(r["steered"].startswith("I'm sorry") for r in rows[2:])


def test_shipped_refusal_detector_answers_only_harmful_prompts(loaded: tuple[Any, Any]) -> None:
    """The `refusal_detector` server preset, used in-process: the fixed refusal for harmful demo prompts only."""
    from pathlib import Path

    import yaml

    from steerlib.__main__ import DEMO_PROMPTS

    presets = Path(__file__).resolve().parents[1] / "servers" / "presets"
    data = yaml.safe_load((presets / "refusal_detector.yaml").read_text())
    data.pop("description")
    cfg = steerlib.SteeringConfig.from_dict(data, base_dir=presets)
    model, tok = loaded
    out = generate(model, tok, DEMO_PROMPTS, cfg, max_new_tokens=16)
    assert [g.refused_by for g in out] == [None, None, "harm-probe-l15", "harm-probe-l15"]
    assert [g.text for g in out[2:]] == ["I'm sorry, but I can't help with that request."] * 2
    plain = generate(model, tok, DEMO_PROMPTS[:2], max_new_tokens=16)
    assert [g.text for g in out[:2]] == [g.text for g in plain]


def test_shipped_reference_sae_reconstructs_unseen_text(loaded: tuple[Any, Any]) -> None:
    """The released SAE (bf16, xz) spliced in at layer 15 keeps the model's predictions on text it never saw."""
    model, tok = loaded
    folder = Path(__file__).parents[1] / "servers" / "presets" / "saes" / "smollm2-l15-topk32"
    sae = steerlib.load_sae(folder)
    assert (sae.architecture, sae.d_sae, sae.meta.k) == ("topk", 4608, 32)
    assert sae.meta.input_site == "blocks.15.hook_resid_post"
    ids = tok((Path(__file__).parent / "data" / "declaration.txt").read_text(), return_tensors="pt").input_ids[0]
    n, t = len(ids) // 63, 63
    bos = torch.full((n, 1), tok.bos_token_id)
    m = evaluate(model, sae.float(), torch.cat([bos, ids[: n * t].view(n, t)], 1), skip_bos=True)
    assert n == 6 and m.l0 == 32.0  # exactly k latents on every token
    assert m.fvu < 0.25 and m.ce_loss_recovered > 0.9  # measured: 0.221 and 0.930 (zero-ablation CE 15.4)
