"""Random-vector controls, config sweeps, the refusal-ablation attack and the feature-ablation report (tiny models)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from test_evals_metrics import tokenizer
from tiny_models import tiny_model

from evals.arms import attacked, sweep
from evals.attack import ATTACK_SITES, ablation_attack, middle_layer, refusal_direction
from evals.controls import combine, random_control, with_coefficient, with_layer
from evals.feature_report import feature_ablation, render_html
from steerlib import SteeringConfig, SteeringVector, record, steer
from steerlib.config import AddOp
from steerlib.extract import diff_of_means
from steerlib.sae import ReluSae, SaeMeta, save_sae

D = 64


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model("llama", n_layers=4)


def _cfg(data: list[dict[str, Any]], base: Path | None = None) -> SteeringConfig:
    return SteeringConfig.from_dict({"interventions": data}, base_dir=base)


def test_random_control_keeps_norm_site_and_policy(tmp_path: Path) -> None:
    v = torch.arange(D, dtype=torch.float32)
    SteeringVector.per_layer({1: v, 2: 2 * v}).save(tmp_path / "pl.safetensors")
    cfg = _cfg(
        [
            {
                "op": "add",
                "layer": 3,
                "site": "mlp_out",
                "vector": v.tolist(),
                "coefficient": 2.0,
                "apply": {"tokens": "generated"},
            },
            {"op": "add", "layer": [1, 2], "vector": "pl.safetensors"},
            {"op": "replace", "layer": 0, "sae": "none"},
        ],
        tmp_path,
    )
    ctl = random_control(cfg, seed=7)
    assert [(iv.op, iv.layer, iv.site) for iv in ctl.interventions] == [
        ("add", 3, "mlp_out"),
        ("add", 1, "resid_post"),
        ("add", 2, "resid_post"),
        ("replace", 0, None),  # an SAE op runs at the SAE's own site unless given
    ]
    first = ctl.interventions[0]
    assert isinstance(first, AddOp) and first.coefficient == 2.0 and first.apply.tokens == "generated"
    norms = [float(torch.tensor(iv.vector).norm()) for iv in ctl.interventions[:3] if isinstance(iv, AddOp)]
    assert norms == pytest.approx([float(v.norm()), float(v.norm()), 2 * float(v.norm())], rel=1e-5)
    r = torch.tensor(first.vector)
    assert abs(float(torch.cosine_similarity(r, v, dim=0))) < 0.5
    assert random_control(cfg, seed=7) == ctl and random_control(cfg, seed=8) != ctl


def test_sweep_helpers_make_new_configs() -> None:
    cfg = _cfg([{"op": "add", "layer": 1, "vector": [1.0] * D}, {"op": "ablate", "layer": 2, "vector": [1.0] * D}])
    c = with_coefficient(cfg, 8.0)
    assert [getattr(iv, "coefficient", None) for iv in c.interventions] == [8.0, None]
    assert [iv.layer for iv in with_layer(cfg, 3).interventions] == [3, 3]
    assert [getattr(iv, "coefficient", None) for iv in cfg.interventions] == [1.0, None]  # the original is unchanged
    both = combine(cfg, None, c)
    assert both is not None and len(both.interventions) == 4
    assert combine(None) is None


def test_refusal_direction_and_ablation_attack(model: torch.nn.Module) -> None:
    tok = tokenizer()
    harmful, harmless = ["w10 w11", "w12 w13 w14"], ["w30", "w31 w32"]
    d = refusal_direction(model, tok, harmful, harmless)
    assert middle_layer(model) == 2
    expected = diff_of_means(model, tok, harmful, harmless, layers=2).by_layer[None]
    torch.testing.assert_close(d, expected)
    attack = ablation_attack(d)
    assert [(iv.op, iv.layer, iv.site) for iv in attack.interventions] == [("ablate", "all", s) for s in ATTACK_SITES]
    sites = [f"blocks.{layer}.hook_{s}" for layer in range(4) for s in ATTACK_SITES]
    ids = torch.tensor([[1, 2, 10, 11, 12, 3]])
    u = d / d.norm()
    with torch.no_grad(), steer(model, attack), record(model, sites) as rec:
        model(input_ids=ids)
    for name in sites:  # the direction is gone from every site that writes the residual stream
        assert float((rec[name] @ u).abs().max()) < 1e-4, name
    with torch.no_grad(), record(model, sites) as clean:
        model(input_ids=ids)
    assert float((clean["blocks.2.hook_resid_pre"] @ u).abs().max()) > 1e-2
    with pytest.raises(ValueError, match="zero direction"):
        ablation_attack(torch.zeros(D))


def test_feature_ablation_matches_a_hand_written_hook(model: torch.nn.Module, tmp_path: Path) -> None:
    tok = tokenizer()
    sae = ReluSae(SaeMeta("relu", D, 8, D))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D, 8, generator=gen))
        sae.W_dec.copy_(torch.randn(8, D, generator=gen))
        assert sae.b_enc is not None
        sae.b_enc[5] = 3.0  # feature 5 fires on most tokens
    save_sae(sae, tmp_path / "sae")
    text = "w10 w11 w12 w13 w14 w15"
    res = feature_ablation(model, tok, tmp_path / "sae", layer=1, feature=5, text=text)
    ids = torch.tensor([tok(text)["input_ids"]])

    def hook(mod: torch.nn.Module, args: Any, out: Any) -> Any:
        h = out[0] if isinstance(out, tuple) else out
        z = sae.encode(h)[..., 5:6]
        h = h - z * sae.W_dec[5]
        return (h, *out[1:]) if isinstance(out, tuple) else h

    def token_lp() -> torch.Tensor:
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=ids).logits[0], -1)
        return lp[:-1].gather(-1, ids[0, 1:, None])[:, 0]

    clean = token_lp()
    handle = model.model.layers[1].register_forward_hook(hook)
    try:
        ablated = token_lp()
    finally:
        handle.remove()
    assert res.delta_logprob[0] == 0.0
    torch.testing.assert_close(torch.tensor(res.delta_logprob[1:]), ablated - clean, atol=1e-5, rtol=0)
    assert any(abs(x) > 1e-4 for x in res.delta_logprob)
    with torch.no_grad(), record(model, ["blocks.1.hook_resid_post"]) as rec:
        model(input_ids=ids)
    torch.testing.assert_close(torch.tensor(res.activation), sae.encode(rec["blocks.1.hook_resid_post"])[:, 5].detach())
    page = render_html(res)
    assert page.count('class="t"') == 6 and "<script" not in page and "w13" in page


def test_sweep_and_attacked_arms() -> None:
    cfg = _cfg([{"op": "add", "layer": 1, "vector": [1.0] * D}])
    arms = sweep("caa", cfg, coefficients=[2, 4], layers=[1, 2], random=True)
    assert [a.name for a in arms] == [
        "caa@L=1@c=2", "random(caa@L=1@c=2)", "caa@L=1@c=4", "random(caa@L=1@c=4)",
        "caa@L=2@c=2", "random(caa@L=2@c=2)", "caa@L=2@c=4", "random(caa@L=2@c=4)",
    ]  # fmt: skip
    assert arms[1].control_of == "caa@L=1@c=2" and arms[2].coefficient == 4 and arms[4].layer == 2
    ablate_only = _cfg([{"op": "ablate", "layer": 1, "vector": [1.0] * D}])
    assert [a.name for a in sweep("abl", ablate_only, coefficients=[2, 4], random=True)] == ["abl"]
    from evals.runner import Arm

    d = torch.ones(D)
    out = attacked([Arm("base", None), arms[0], arms[1], Arm("preset:x", ["x"])], d)
    assert [a.name for a in out] == ["attack", "caa@L=1@c=2+attack", "random-ablation"]
    steering = out[1].steering
    assert isinstance(steering, SteeringConfig) and [iv.op for iv in steering.interventions] == ["add"] + ["ablate"] * 3
    rand = out[2].steering
    assert isinstance(rand, SteeringConfig) and out[2].control_of == "attack"
    r = torch.tensor(rand.interventions[0].vector)
    assert float(r.norm()) == pytest.approx(float(d.norm()), rel=1e-5)
