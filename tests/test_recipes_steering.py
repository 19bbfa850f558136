"""The steering recipe's pieces on tiny seeded models: the trained vector is the shipped add op, training learns a
planted reply, the gate is read from a detector config, the preset round-trips, and the held-out measurement runs
every arm (the recipe, its random control, the attacked recipe) on every set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from tiny_models import tiny_model, word_tokenizer

from evals.attack import ATTACK_SITES, refusal_direction
from evals.datasets import McQuestion, Prompt
from evals.recipes.heldout import ROWS_FILE, HeldoutSettings, default_arms
from evals.recipes.learned_vector import Example, TrainSettings, added, train_vector
from evals.recipes.steering import BuildSettings, attacked_arm, choose_coefficient, measure, parser, settings_of
from evals.recipes.steering_preset import DetectorGate, add_op, description, read_gate, steering_config, write_preset
from evals.runner import PromptSet
from steerlib.config import AblateOp, AddOp, SteeringConfig
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


def _recipe_folder(tmp_path: Path) -> Path:
    """A detector config reading ``vectors/probe.safetensors`` at layer 2 and a learned vector for layer 2."""
    (tmp_path / "vectors").mkdir(exist_ok=True)
    SteeringVector.single(torch.ones(64)).save(tmp_path / "vectors/probe.safetensors")
    SteeringVector.single(torch.full((64,), 0.5)).save(tmp_path / "vectors/refusal_learned_l2.safetensors")
    (tmp_path / "det.yaml").write_text(DETECTOR)
    return tmp_path


def test_gate_is_read_from_a_detector_preset_and_the_preset_round_trips(tmp_path: Path) -> None:
    gate = read_gate(_recipe_folder(tmp_path) / "det.yaml")
    assert gate == DetectorGate(2, tmp_path / "vectors/probe.safetensors", "dot", -1.25)
    path = write_preset(tmp_path, gate, 0.75, keep=False)
    assert yaml.safe_load(path.read_text()) == {
        "description": description(gate, 0.75, keep=False),
        "interventions": [add_op(gate, 0.75)],
    }
    assert "Coefficient 0.75 chosen" in description(gate, 0.75, keep=False)
    assert "own answers" not in description(gate, 0.75, keep=False) and "own answers" in description(gate, 1, keep=True)
    loaded = SteeringConfig.from_file(path)
    assert loaded.interventions == steering_config(tmp_path, gate, 0.75).interventions
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
    assert gate == DetectorGate(2, tmp_path / "probes/mlp.safetensors", "dot", 0.5, "mean", "probe")
    when = steering_config(tmp_path, gate, 1.0).interventions[0].apply.when
    assert when is not None and (when.probe, when.vector, when.aggregate) == ("probes/mlp.safetensors", None, "mean")
    path = write_preset(tmp_path, gate, 0.75, keep=False)
    assert SteeringConfig.from_file(path).interventions[0].apply.when == when
    assert "mean over the prompt" in description(gate, 0.75, keep=False)
    (tmp_path / "det.yaml").write_text(DETECTOR.replace("scope: prompt}", "scope: prompt, aggregate: mean}"))
    assert read_gate(tmp_path / "det.yaml").when()["aggregate"] == "mean"


def test_choose_coefficient_takes_the_smallest_that_reaches_the_target() -> None:
    harmful, harmless = {0.5: 0.8, 0.75: 0.96, 1.0: 0.99}, {0.5: 0.0, 0.75: 0.2, 1.0: 0.3}
    assert choose_coefficient(harmful, harmless, 0.95) == 0.75
    assert choose_coefficient(harmful, harmless, 0.995) == 0.5  # none reaches it: best margin (0.8 vs 0.76, 0.69)
    with pytest.raises(ValueError, match="no coefficients"):
        choose_coefficient({}, {}, 0.9)


def test_the_command_line_gives_typed_settings_whose_default_gate_is_the_shipped_detector() -> None:
    build, held = settings_of(parser().parse_args(["--out", "x", "--coefficients", "0.5", "1", "--no-heldout"]))
    assert build == BuildSettings(coefficients=(0.5, 1.0), heldout=False)
    assert held == HeldoutSettings()
    assert build.gate.is_absolute() and build.gate.is_file()  # found from any working directory
    assert read_gate(build.gate).layer == 15


def test_the_random_control_is_a_same_norm_vector_under_the_same_gate(tmp_path: Path) -> None:
    gate = read_gate(_recipe_folder(tmp_path) / "det.yaml")
    config = SteeringConfig.from_file(write_preset(tmp_path, gate, 0.75, keep=False))
    arms = default_arms(config)
    assert [(a.name, a.steering == config, a.control_of) for a in arms] == [
        ("baseline", False, None),
        ("recipe", True, None),
        ("random(recipe)", False, "recipe"),
    ]
    recipe, control = config.interventions[0], arms[2].steering.interventions[0]  # type: ignore[union-attr]
    assert isinstance(control, AddOp) and isinstance(control.vector, list) and isinstance(recipe, AddOp)
    assert control.apply == recipe.apply and control.coefficient == recipe.coefficient
    random_v = torch.tensor(control.vector)
    assert torch.isclose(random_v.norm(), torch.tensor(4.0))  # the learned vector: 0.5 in each of 64 dimensions
    assert not torch.allclose(random_v, torch.full((64,), 0.5))


ATTACK = (["w1 w2", "w5 w6"], ["w30 w40", "w7"])


def test_the_attacked_arm_adds_the_ablation_of_the_models_own_refusal_direction(tmp_path: Path) -> None:
    model, tok = tiny_model("llama", n_layers=4), word_tokenizer()
    config = SteeringConfig.from_file(
        write_preset(_recipe_folder(tmp_path), read_gate(tmp_path / "det.yaml"), 0.75, keep=False)
    )
    arm, described = attacked_arm(model, tok, config, *ATTACK)
    assert arm.name == "recipe+attack" and "(layer 2, resid_post)" in described and "from 2+2 training" in described
    ops = arm.steering.interventions  # type: ignore[union-attr]
    assert ops[0] == config.interventions[0]
    assert [(iv.op, iv.layer, iv.site) for iv in ops[1:]] == [("ablate", "all", s) for s in ATTACK_SITES]
    direction = refusal_direction(model, tok, *ATTACK)
    assert all(isinstance(iv, AblateOp) and torch.equal(torch.tensor(iv.vector), direction) for iv in ops[1:])


PROMPTS = [
    PromptSet("bad", "harmful", [Prompt(f"bad/{i}", f"w{10 + i} w{20 + i}", "bad") for i in range(3)]),
    PromptSet("good", "harmless", [Prompt(f"good/{i}", f"w{40 + i}", "good") for i in range(2)]),
]
QUESTIONS = [McQuestion(f"q/{i}", f"w{60 + i} w61", ("w70", "w71", "w72", "w73"), i, "s") for i in range(2)]


def test_measure_runs_every_arm_on_every_set_and_reports_each(tmp_path: Path) -> None:
    model, tok = tiny_model("llama", n_layers=4), word_tokenizer()
    preset = write_preset(_recipe_folder(tmp_path), read_gate(tmp_path / "det.yaml"), 0.75, keep=False)
    held = HeldoutSettings(cap=3, mmlu=2, batch_size=4, max_new_tokens=3)
    out = tmp_path / "out"
    out.mkdir()
    report = measure(model, tok, preset, held, out, attack=ATTACK, sets=PROMPTS, questions=QUESTIONS)
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    assert (report["preset"], report["heldout_cap"], report["max_new_tokens"]) == (str(preset), 3, 3)
    assert "from 2+2 training prompts" in report["attack"]
    arms = ["baseline", "recipe", "random(recipe)", "recipe+attack"]
    rows = [json.loads(line) for line in (out / ROWS_FILE).read_text().splitlines()]
    want = [(a, p.id) for a in arms for s in PROMPTS for p in s.prompts]
    assert sorted((r["arm"], r["prompt_id"]) for r in rows) == sorted(want)
    plain = generate(model, tok, [p.text for s in PROMPTS for p in s.prompts], max_new_tokens=3)
    assert [r["response"] for r in rows if r["arm"] == "baseline"] == [g.text for g in plain]
    pooled = report["heldout"]["pooled"]
    assert list(pooled) == arms and all((v["harmful"]["n"], v["harmless"]["n"]) == (3, 2) for v in pooled.values())
    assert list(report["heldout"]["benign_text_ce"]) == arms[1:]
    assert list(report["heldout"]["mmlu"]) == ["baseline", "recipe", "recipe+attack"]  # controls get no MMLU
    assert all(m["n"] == 2 for m in report["heldout"]["mmlu"].values())
