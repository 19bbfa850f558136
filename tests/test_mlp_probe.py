"""MLP probes: the file format, and a ``when: {probe: ...}`` condition scoring the prompt's mean activation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from tiny_models import tiny_model, word_tokenizer

from steerlib import SteeringConfig, SteeringConfigError, hooks_installed, steer
from steerlib.hf.generate import generate, render_prompts
from steerlib.hf.recording import record
from steerlib.mlp_probe import MlpProbe, load_mlp_probe
from steerlib.policy import Gate, LatentCache
from steerlib.run_state import GateState
from steerlib.tokens import TokenBatch
from steerlib.vectors import SteeringVector

D, H = 64, 8
PROMPTS = ["w10 w11 w12 w13", "w50 w60 w70", "w90 w91", "w5 w6 w7 w8 w9"]
MESSAGE = "w100 w101 w102"


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model("llama", n_layers=3)


def random_probe(seed: int, d: int = D) -> MlpProbe:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(H, d, generator=g)
    return MlpProbe(W, torch.zeros(H), torch.randn(H, generator=g), torch.tensor(0.25), {"layer": "1"})


def test_save_load_round_trip(tmp_path: Path) -> None:
    probe = random_probe(0)
    back = load_mlp_probe(probe.save(tmp_path / "p.safetensors"))
    for a, b in zip(probe.tensors(), back.tensors(), strict=True):
        assert torch.equal(a, b)
    assert back.metadata == {"layer": "1"}
    x = torch.randn(5, D)
    expected = torch.relu(x @ probe.W_HD.T + probe.b1_H) @ probe.w_H + 0.25
    torch.testing.assert_close(back.scores(x), expected)


def test_bad_probes_are_refused_with_what_was_found(tmp_path: Path) -> None:
    vec = SteeringVector.single(torch.ones(D)).save(tmp_path / "v.safetensors")
    with pytest.raises(ValueError, match=r"not an MLP probe file.*found format None and tensors \['vector'\]"):
        load_mlp_probe(vec)
    with pytest.raises(FileNotFoundError, match="probe file not found"):
        load_mlp_probe(tmp_path / "missing.safetensors")
    p = random_probe(0)
    with pytest.raises(ValueError, match=r"needs W \(H, D\), b1 \(H,\), w \(H,\) and a scalar b; got .*w \(7,\)"):
        MlpProbe(p.W_HD, p.b1_H, p.w_H[:7], p.b)
    with pytest.raises(ValueError, match="must be finite; b1 are not"):
        MlpProbe(p.W_HD, p.b1_H.clone().fill_(float("nan")), p.w_H, p.b)


def prompt_activations(model: torch.nn.Module, tok: Any) -> list[torch.Tensor]:
    """Each prompt's activations after layer 1, one per (chat-rendered) token."""
    acts = []
    for text in render_prompts(tok, PROMPTS):
        enc = tok([text], return_tensors="pt", add_special_tokens=False)
        with record(model, ["blocks.1.hook_resid_post"]) as rec, torch.no_grad():
            model(**enc)
        acts.append(rec["blocks.1.hook_resid_post"])
    return acts


def refuse_cfg(path: Path, above: float) -> SteeringConfig:
    when = {"probe": str(path), "above": above, "scope": "prompt", "aggregate": "mean"}
    op = {"op": "refuse", "layer": 1, "message": MESSAGE, "name": "mlp-probe", "apply": {"when": when}}
    return SteeringConfig.model_validate({"interventions": [op]})


def test_refuse_on_an_mlp_probe_of_the_mean_prompt_activation(model: torch.nn.Module, tmp_path: Path) -> None:
    tok = word_tokenizer()
    probe = random_probe(1)
    path = probe.save(tmp_path / "probe.safetensors")
    acts = prompt_activations(model, tok)
    scores = probe.scores(torch.stack([a.mean(0) for a in acts]))
    ranked = scores.sort(descending=True).values
    above = float(ranked[1]) + 0.01  # only the highest-scoring prompt fires
    flagged = [bool(s > above) for s in scores]
    # averaging the per-token scores instead would flag other prompts: the gate must pool activations first
    assert [bool(probe.scores(a).mean() > above) for a in acts] != flagged
    plain = generate(model, tok, PROMPTS, max_new_tokens=5, min_new_tokens=0)
    out = generate(model, tok, PROMPTS, refuse_cfg(path, above), max_new_tokens=5, min_new_tokens=0)
    for p, o, f in zip(plain, out, flagged, strict=True):
        assert (o.refused_by, o.text) == (("mlp-probe", MESSAGE) if f else (None, p.text))
    assert hooks_installed(model) == 0


def test_pooled_mean_is_the_same_whether_the_prompt_comes_in_one_step_or_in_chunks() -> None:
    probe = random_probe(7)
    g = torch.Generator().manual_seed(1)
    x_ND = torch.randn(7, D, generator=g) * 3  # row 0: 4 prompt tokens, row 1: 3
    rows, positions = torch.tensor([0, 0, 0, 0, 1, 1, 1]), torch.tensor([0, 1, 2, 3, 0, 1, 2])
    prompt_len = torch.tensor([4, 3])

    gate = Gate(lambda x, c: probe.scores(c.x_in_ND), 0.0, None, "prompt", "mean", pooled=probe.scores)

    def step(idx: list[int], new: list[bool], state: GateState) -> None:
        tb = TokenBatch(rows[idx], positions[idx], torch.ones(len(idx), dtype=torch.bool), prompt_len, None,
                        torch.tensor(new))  # fmt: skip
        gate.mask(x_ND[idx], LatentCache(x_ND[idx]), tb, state)

    one, chunked = (GateState.empty(gate, 2, D, torch.device("cpu")) for _ in range(2))
    step(list(range(7)), [True, True], one)
    step([0, 1, 4], [True, True], chunked)
    step([2, 3, 5, 6], [False, False], chunked)
    expected = probe.scores(torch.stack([x_ND[:4].mean(0), x_ND[4:].mean(0)]))
    for st in (one, chunked):
        verdict_R, score_R = st.decided()
        torch.testing.assert_close(score_R, expected)
        assert verdict_R.tolist() == (expected > 0).tolist()
    # a new sequence in row 0 starts from nothing: its verdict is its own mean's
    step([0, 1], [True, False], chunked)
    assert chunked.decided()[1][0].isnan()  # undecided until its last prompt token is read
    step([2, 3], [False, False], chunked)
    torch.testing.assert_close(chunked.decided()[1][0], probe.scores(x_ND[:4].mean(0, keepdim=True))[0])


@pytest.mark.parametrize(
    ("when", "match"),
    [
        ({"probe": "p.safetensors", "vector": [0.0] * D}, "exactly one of .*got \\['vector', 'probe'\\]"),
        ({"above": 0.0}, "exactly one of .*got none"),
        ({"probe": "p.safetensors", "metric": "cosine"}, "metric 'cosine' is only meaningful with when.vector"),
    ],
)
def test_condition_takes_one_source(when: dict[str, Any], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        SteeringConfig.model_validate({"interventions": [{"op": "add", "layer": 1, "vector": [0.0] * D,
                                                          "apply": {"when": {"above": 0.0, **when}}}]})  # fmt: skip


def test_bad_probe_files_fail_before_any_hook(model: torch.nn.Module, tmp_path: Path) -> None:
    wide = random_probe(0, d=D + 1).save(tmp_path / "wide.safetensors")
    vec = SteeringVector.single(torch.ones(D)).save(tmp_path / "v.safetensors")
    cases = [
        (tmp_path / "missing.safetensors", "interventions\\[0\\].apply.when.probe: file or folder not found"),
        (wide, f"probe reads {D + 1}-wide activations; the model's width is {D}"),
        (vec, "cannot load the probe at .*not an MLP probe file"),
    ]
    for path, match in cases:
        with pytest.raises(SteeringConfigError, match=match), steer(model, refuse_cfg(path, 0.0)):
            pass
        assert hooks_installed(model) == 0
