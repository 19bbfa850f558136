"""The detector recipe's activations and shipped config: the deployed `refuse` gate makes the probe's decision.

Tiny random model for the mechanics (last-token and mean-pooled activations, gate == probe on every row); the real
embedded model for the shipped preset (its verdicts are exactly the probe's and the report's).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from tiny_models import tiny_model, word_tokenizer

from evals.recipes.activations import Pool, last_token_activations
from steerlib import SteeringConfig
from steerlib.hf.generate import generate

PROMPTS = ["w10 w11 w12 w13 w14 w15", "w50 w60 w70", "w90", "w20 w21 w22 w23", "w33 w34", "w5 w6 w7 w8 w9 w40 w41"]
REPO = Path(__file__).parents[1]
PRESETS = REPO / "servers" / "presets"
REPORT = REPO / "evals" / "recipes" / "results" / "refusal_detector_smollm2.json"


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any]:
    return tiny_model("llama", n_layers=3), word_tokenizer()


def test_mean_pooling_is_the_mean_over_every_prompt_token_whatever_the_padding(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    batched = last_token_activations(model, tok, PROMPTS, [1], batch_size=4, pool="mean")[1]
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in PROMPTS]  # fmt: skip
    for i, text in enumerate(texts):
        enc = tok(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            hidden_TD = model(**enc, output_hidden_states=True).hidden_states[2][0]  # after block 1
        torch.testing.assert_close(batched[i], hidden_TD.mean(0), atol=1e-5, rtol=1e-5)
        last = last_token_activations(model, tok, [PROMPTS[i]], [1])[1][0]
        torch.testing.assert_close(last, hidden_TD[-1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pool", ["last", "mean"])
def test_refuse_gate_makes_the_probes_decision_on_every_row(tiny: tuple[Any, Any], pool: Pool) -> None:
    model, tok = tiny
    w = torch.randn(64, generator=torch.Generator().manual_seed(5))
    scores = last_token_activations(model, tok, PROMPTS, [1], pool=pool)[1] @ w
    s = scores.sort().values
    above = float((s[2] + s[3]) / 2)  # half of the rows fire
    cfg = SteeringConfig.model_validate({"interventions": [{
        "op": "refuse", "layer": 1, "message": "w100", "name": "probe",
        "apply": {"when": {"vector": w.tolist(), "above": above, "scope": "prompt", "aggregate": pool}}}]})  # fmt: skip
    out = generate(model, tok, PROMPTS, cfg, max_new_tokens=1, min_new_tokens=0, batch_size=4)
    assert [g.refused_by == "probe" for g in out] == [bool(x > above) for x in scores]
    assert sum(g.refused_by is not None for g in out) == 3


@pytest.mark.parametrize("kind", ["linear", "mlp8"])
def test_written_config_runs_the_chosen_probe(tiny: tuple[Any, Any], tmp_path: Path, kind: str) -> None:
    """What the recipe writes (probe file + refuse.yaml) flags exactly the prompts whose probe score passes the
    chosen threshold, for a linear probe (bias folded into the threshold) and an MLP probe of the mean."""
    from evals.recipes.detector import detector_config, save_detector, write_config
    from evals.recipes.detector_select import Choice

    model, tok = tiny
    acts = last_token_activations(model, tok, PROMPTS, [1], pool="mean")[1]
    choice = Choice("mean", 1, 1e-2, "per_set", 0.0, 0.0, 0.0, kind)
    probe = choice.fitter()(acts[:3], acts[3:], None)
    scores = probe.scores(acts)
    choice = Choice("mean", 1, 1e-2, "per_set", 0.0, float(scores.median()), 0.0, kind)
    source, what, above = save_detector(probe, choice, tmp_path, "both")
    cfg = SteeringConfig.from_file(write_config(tmp_path, detector_config(choice, source, above, what, "w100")))
    assert cfg.description == what and (what == "a logistic probe") == (kind == "linear")
    out = generate(model, tok, PROMPTS, cfg, max_new_tokens=1, min_new_tokens=0, batch_size=4)
    flagged = [bool(s > choice.threshold) for s in scores]
    assert [g.refused_by == "harm-probe-l1" for g in out] == flagged and 0 < sum(flagged) < len(PROMPTS)


@pytest.mark.real_model
def test_shipped_detector_config_reproduces_the_probe_and_the_reported_overrefusal_count() -> None:
    """The over-refusal prompts it was fitted on and some harmful ones through the preset: verdicts == probe >
    threshold, and as many over-refusal prompts flagged as the report counts."""
    import steerlib
    from evals.recipes.detector import load_sets
    from steerlib.mlp_probe import load_mlp_probe
    from steerlib.vectors import load_vector

    data = yaml.safe_load((PRESETS / "refusal_detector.yaml").read_text())
    data.pop("description")
    cfg = SteeringConfig.from_dict(data, base_dir=PRESETS)
    (op,) = data["interventions"]
    when = op["apply"]["when"]
    report = json.loads(REPORT.read_text())
    assert (op["layer"], when.get("aggregate", "last")) == (report["layer"], report["pool"])
    if report["choice"]["probe"] == "linear":
        vec = load_vector(PRESETS / when["vector"])
        w, bias = vec.by_layer[None], float(vec.metadata["bias"])
        assert when["above"] == pytest.approx(report["threshold"] - bias, abs=1e-5)
        score = lambda x: x @ w  # noqa: E731
    else:  # an MLP probe keeps its bias: the config's threshold is the recipe's
        score = load_mlp_probe(PRESETS / when["probe"]).scores
        assert when["above"] == pytest.approx(report["threshold"], abs=1e-5)

    model, tok = steerlib.load_model()
    fitted = load_sets(report["fit_on"], None)
    over = [p.text for p in fitted.harmless["rho_overrefusal"]]
    assert len(over) == report["train_sizes"]["rho_overrefusal"]
    prompts = over + [p.text for p in fitted.harmful["harmful_probes"][:12]]
    acts = last_token_activations(model, tok, prompts, [op["layer"]], pool=report["pool"])[op["layer"]]
    probe_fires = [bool(s > when["above"]) for s in score(acts)]
    out = generate(model, tok, prompts, cfg, max_new_tokens=1, min_new_tokens=0, batch_size=8)
    assert [g.refused_by == op["name"] for g in out] == probe_fires
    assert sum(probe_fires[: len(over)]) == report["in_sample"]["false_positive_rate"]["rho_overrefusal"]["k"]


@pytest.mark.registry
def test_both_halves_and_fresh_prompts_partition_each_dataset() -> None:
    """``both`` is the two capped halves; ``fresh`` is the rest of every harmful set and held-out-half MMLU questions
    over all subjects, none of which any capped run trains on."""
    from evals.datasets import HARMFUL_SETS, load_dataset, load_mmlu, split
    from evals.recipes.detector import fresh_sets, load_sets

    cap = 40
    both, fresh = load_sets("both", cap, extra_harmless=200), fresh_sets(cap, 300)
    for name in HARMFUL_SETS:
        prompts = load_dataset(name)
        halves = split(prompts, "train"), split(prompts, "heldout")
        assert both.harmful[name] == halves[0][:cap] + halves[1][:cap]
        assert fresh.harmful[name] == halves[0][cap:] + halves[1][cap:]
        assert len(both.harmful[name]) + len(fresh.harmful[name]) == len(prompts)
    assert load_sets("both", None).harmful["harmbench"] == split(load_dataset("harmbench"), "train") + split(
        load_dataset("harmbench"), "heldout"
    )
    assert fresh_sets(None, 5).harmful == {}
    subject = {q.id: q.subject for q in load_mmlu()}
    trained, scored = both.harmless["mmlu_questions"], fresh.harmless["mmlu_questions"]
    assert (len(trained), len(scored)) == (200, 300) and not {p.text for p in trained} & {p.text for p in scored}
    assert len({subject[p.id] for p in trained}) >= 45 and len({subject[p.id] for p in scored}) >= 45
