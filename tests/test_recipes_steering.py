"""The steering recipe's mechanics on tiny seeded models: the trained vector is the shipped add op, training learns a
planted reply, the gate is read from a detector config and the preset round-trips."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_models import tiny_model, word_tokenizer

from evals.recipes.learned_vector import Example, TrainSettings, added, train_vector
from evals.recipes.steering import Gate, choose_coefficient, load_preset, read_gate, steering_config, write_preset
from steerlib.config import AddOp, SteeringConfig
from steerlib.hf.generate import generate
from steerlib.hf.hooks import steer
from steerlib.vectors import SteeringVector


def test_training_hook_is_the_shipped_add_op() -> None:
    model = tiny_model("llama")
    ids = torch.tensor([[1, 2, 10, 11, 12, 3]])
    v = torch.randn(64, generator=torch.Generator().manual_seed(1)) * 3
    with torch.no_grad(), added(model, 1, v):
        trained = model(input_ids=ids).logits
    cfg = SteeringConfig.from_dict({"interventions": [{"op": "add", "layer": 1, "vector": v.tolist()}]})
    with torch.no_grad(), steer(model, cfg):
        shipped = model(input_ids=ids).logits
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    assert torch.equal(trained, shipped)
    assert not torch.allclose(trained, plain)


def test_train_vector_teaches_a_planted_reply_and_leaves_the_model_alone() -> None:
    model, tok = tiny_model("llama"), word_tokenizer()
    with torch.no_grad():  # random init gives near-uniform logits (at most ~1 nat apart); sharpen them
        model.lm_head.weight.mul_(30)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    refuse = [Example(f"w{i} w{i + 1} w{i + 2}", "w50") for i in range(10, 40, 3)]
    settings = TrainSettings(layer=1, steps=40, lr=1.0, batch_size=4, keep_weight=0.0, max_norm=30.0)
    out = train_vector(model, tok, refuse, [], settings)
    assert out.history[-1][0] < out.history[0][0] / 5
    assert float(out.vector_D.norm()) <= 30.0 + 1e-4
    assert all(torch.equal(p, before[k]) and p.requires_grad for k, p in model.named_parameters())
    cfg = SteeringConfig.from_dict({"interventions": [{"op": "add", "layer": 1, "vector": out.vector_D.tolist()}]})
    unseen = ["w90 w91 w92", "w70 w80", "w120"]
    assert [g.text.split()[0] for g in generate(model, tok, unseen, cfg, max_new_tokens=2)] == ["w50"] * 3
    assert all(g.text.split()[0] != "w50" for g in generate(model, tok, unseen, max_new_tokens=2))


def test_train_vector_refuses_bad_input() -> None:
    model, tok = tiny_model("llama"), word_tokenizer()
    with pytest.raises(ValueError, match="keep_weight > 0 needs keep examples"):
        train_vector(model, tok, [Example("w10", "w50")], [], TrainSettings(layer=1))
    with pytest.raises(IndexError, match="layer 7 out of range: model has 3 layers"):
        train_vector(model, tok, [Example("w10", "w50")], [], TrainSettings(layer=7, keep_weight=0.0))


DETECTOR = """\
description: a detector
interventions:
  - layer: 2
    op: refuse
    apply:
      when: {vector: vectors/probe.safetensors, metric: dot, above: -1.25, scope: prompt}
"""


def test_gate_is_read_from_a_detector_preset_and_the_preset_round_trips(tmp_path: Path) -> None:
    (tmp_path / "vectors").mkdir()
    SteeringVector.single(torch.ones(64)).save(tmp_path / "vectors/probe.safetensors")
    SteeringVector.single(torch.full((64,), 0.5)).save(tmp_path / "vectors/refusal_learned_l2.safetensors")
    (tmp_path / "det.yaml").write_text(DETECTOR)
    gate = read_gate(tmp_path / "det.yaml")
    assert gate == Gate(2, tmp_path / "vectors/probe.safetensors", "dot", -1.25)
    path = write_preset(tmp_path, gate, 0.75, keep=False)
    assert "own answers" not in path.read_text()
    loaded = load_preset(path)
    iv = loaded.interventions[0]
    assert isinstance(iv, AddOp) and iv.layer == 2 and iv.coefficient == 0.75 and iv.site == "resid_post"
    assert iv.apply.when is not None and iv.apply.when.scope == "prompt" and iv.apply.when.above == -1.25
    assert loaded.resolve(iv.vector) == tmp_path / "vectors/refusal_learned_l2.safetensors"  # type: ignore[arg-type]
    assert steering_config(tmp_path, gate, 1.0, gated=False).interventions[0].apply.when is None
    (tmp_path / "none.yaml").write_text("description: x\ninterventions: []\n")
    with pytest.raises(ValueError, match="no 'refuse' op"):
        read_gate(tmp_path / "none.yaml")


MLP_DETECTOR = """\
description: a detector reading an MLP probe of the mean prompt activation
interventions:
  - layer: 2
    op: refuse
    apply:
      when: {probe: probes/mlp.safetensors, above: 0.5, scope: prompt, aggregate: mean}
"""


def test_a_pooled_or_mlp_detector_gates_the_steering_as_it_gates_refusals(tmp_path: Path) -> None:
    """The recipe's gate keeps the detector's probe kind and pooling (a mean-pooled threshold read at the last
    token would be another detector)."""
    from steerlib.mlp_probe import MlpProbe

    g = torch.Generator().manual_seed(0)
    MlpProbe(torch.randn(4, 64, generator=g), torch.zeros(4), torch.ones(4), torch.tensor(0.0)).save(
        tmp_path / "probes/mlp.safetensors"
    )
    SteeringVector.single(torch.full((64,), 0.5)).save(tmp_path / "vectors/refusal_learned_l2.safetensors")
    (tmp_path / "det.yaml").write_text(MLP_DETECTOR)
    gate = read_gate(tmp_path / "det.yaml")
    assert gate == Gate(2, tmp_path / "probes/mlp.safetensors", "dot", 0.5, "mean", "probe")
    when = steering_config(tmp_path, gate, 1.0).interventions[0].apply.when
    assert when is not None and (when.probe, when.vector, when.aggregate) == ("probes/mlp.safetensors", None, "mean")
    path = write_preset(tmp_path, gate, 0.75, keep=False)  # raises unless the preset loads as the recipe's config
    assert "mean over the prompt" in path.read_text()
    (tmp_path / "det.yaml").write_text(DETECTOR.replace("scope: prompt}", "scope: prompt, aggregate: mean}"))
    assert read_gate(tmp_path / "det.yaml").when()["aggregate"] == "mean"


def test_choose_coefficient_takes_the_smallest_that_reaches_the_target() -> None:
    harmful, harmless = {0.5: 0.8, 0.75: 0.96, 1.0: 0.99}, {0.5: 0.0, 0.75: 0.2, 1.0: 0.3}
    assert choose_coefficient(harmful, harmless, 0.95) == 0.75
    assert choose_coefficient(harmful, harmless, 0.995) == 0.5  # none reaches it: best margin (0.8 vs 0.76, 0.69)
    with pytest.raises(ValueError, match="no coefficients"):
        choose_coefficient({}, {}, 0.9)


def test_measure_runs_the_given_preset_on_the_heldout_sets_and_builds_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import steerlib
    from evals.recipes import steering

    (tmp_path / "vectors").mkdir()
    SteeringVector.single(torch.ones(64)).save(tmp_path / "vectors/probe.safetensors")
    SteeringVector.single(torch.full((64,), 0.5)).save(tmp_path / "vectors/refusal_learned_l2.safetensors")
    (tmp_path / "det.yaml").write_text(DETECTOR)
    preset = write_preset(tmp_path, read_gate(tmp_path / "det.yaml"), 0.75, keep=False)
    calls: list[dict[str, Any]] = []

    def fake_heldout(model: object, tok: object, config: SteeringConfig, **kw: Any) -> dict[str, object]:
        calls.append({"config": config, **kw})
        return {"pooled": {"recipe": "measured"}}

    model = tiny_model("llama", n_layers=4)
    monkeypatch.setattr(steering, "heldout", fake_heldout)
    monkeypatch.setattr(steering, "build", lambda *a: pytest.fail("--measure must not build"))
    monkeypatch.setattr(steerlib, "load_model", lambda name, *, device, dtype: (model, word_tokenizer()))
    monkeypatch.setattr(steering, "attack_prompts", lambda n: (["w1 w2", "w5 w6"][:n], ["w30 w40", "w7"][:n]))
    out = tmp_path / "out"
    steering.main(["--out", str(out), "--measure", str(preset), "--heldout-cap", "96", "--mmlu", "7"])
    steering.main(["--out", str(out / "attacked"), "--measure", str(preset), "--attack", "2"])
    plain, attacked = calls
    assert plain["config"] == load_preset(preset) and plain["cap"] == 96 and plain["mmlu_n"] == 7
    assert [a.name for a in plain["arms"]] == ["baseline", "recipe", "random(recipe)"]
    assert plain["arms"][1].steering == load_preset(preset) and plain["arms"][2].control_of == "recipe"
    assert [a.name for a in attacked["arms"]] == ["baseline", "recipe", "random(recipe)", "recipe+attack"]
    ops = [(iv.op, iv.layer, iv.site) for iv in attacked["arms"][3].steering.interventions]
    assert ops == [("add", 2, "resid_post")] + [("ablate", "all", s) for s in ("resid_pre", "attn_out", "mlp_out")]
    report = json.loads((out / "report.json").read_text())
    assert report == {
        "preset": str(preset),
        "heldout_cap": 96,
        "max_new_tokens": 48,
        "heldout": {"pooled": {"recipe": "measured"}},
    }
    assert "from 2+2 training prompts" in json.loads((out / "attacked/report.json").read_text())["attack"]
