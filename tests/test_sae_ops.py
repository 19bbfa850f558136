"""SAE ops inside the forward pass: edits with and without the error term, replace, feature gates, transcoders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from test_config import EXAMPLE
from tiny_models import tiny_model
from torch import Tensor

from steerlib import SteeringConfig, SteeringConfigError, SteeringVector, attach, hooks_installed, steer
from steerlib.hf.recording import record
from steerlib.sae import Sae, SaeMeta, get_architecture, save_sae

D, F = 64, 256


def make_sae(
    folder: Path,
    arch: str = "relu",
    *,
    site: str = "blocks.1.hook_resid_post",
    out_site: str | None = None,
    seed: int = 0,
    **kw: Any,
) -> Sae:
    g = torch.Generator().manual_seed(seed)
    meta = SaeMeta(arch, D, F, D, site, out_site or site, **kw)
    sae = get_architecture(arch)(meta)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D, F, generator=g) / D**0.5)
        sae.b_enc.copy_(torch.randn(F, generator=g) * 0.1)
        sae.W_dec.copy_(torch.randn(F, D, generator=g) / F**0.5)
        sae.b_dec.copy_(torch.randn(D, generator=g) * 0.1)
    save_sae(sae, folder)
    return sae


def cfg(base: Path, *interventions: dict[str, Any]) -> SteeringConfig:
    return SteeringConfig.from_dict({"interventions": list(interventions)}, base_dir=base)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model("llama", n_layers=3)


@pytest.fixture
def ids() -> Tensor:
    return torch.randint(3, 120, (2, 6), generator=torch.Generator().manual_seed(5))


def hidden(model: torch.nn.Module, ids: Tensor) -> tuple[Tensor, ...]:
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True).hidden_states  # type: ignore[no-any-return]


@pytest.mark.parametrize("arch", ["relu", "topk", "jumprelu"])
def test_keep_error_without_edits_changes_nothing(
    model: torch.nn.Module, ids: Tensor, tmp_path: Path, arch: str
) -> None:
    kw = {"k": 8} if arch == "topk" else {}
    make_sae(tmp_path / "sae", arch, **kw)
    clean = hidden(model, ids)
    with steer(model, cfg(tmp_path, {"op": "sae", "layer": 1, "sae": "sae", "error_term": "keep"})):
        steered = hidden(model, ids)
    torch.testing.assert_close(steered[-1], clean[-1], rtol=0, atol=1e-6)


def test_keep_error_edit_moves_along_decoder_rows(model: torch.nn.Module, ids: Tensor, tmp_path: Path) -> None:
    sae = make_sae(tmp_path / "sae")
    clean = hidden(model, ids)[2]
    z = sae.encode(clean).detach()
    edits = [
        {"feature": 3, "mode": "set", "value": 5.0},
        {"feature": 10, "mode": "scale", "value": 0.0},
        {"feature": 11, "mode": "add", "value": 2.0},
    ]
    with steer(model, cfg(tmp_path, {"op": "sae", "layer": 1, "sae": "sae", "edits": edits})):
        steered = hidden(model, ids)[2]
    W = sae.W_dec.detach()
    expected = clean + (5.0 - z[..., 3:4]) * W[3] - z[..., 10:11] * W[10] + 2.0 * W[11]
    torch.testing.assert_close(steered, expected, atol=1e-5, rtol=1e-5)


def test_drop_error_and_replace_give_the_reconstruction(model: torch.nn.Module, ids: Tensor, tmp_path: Path) -> None:
    sae = make_sae(tmp_path / "sae")
    clean = hidden(model, ids)[2]
    recon = sae(clean).detach()
    with steer(model, cfg(tmp_path, {"op": "replace", "layer": 1, "sae": "sae"})):
        replaced = hidden(model, ids)[2]
    with steer(model, cfg(tmp_path, {"op": "sae", "layer": 1, "sae": "sae", "error_term": "drop"})):
        dropped = hidden(model, ids)[2]
    torch.testing.assert_close(replaced, recon, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dropped, recon, atol=1e-5, rtol=1e-5)
    with steer(
        model,
        cfg(
            tmp_path,
            {
                "op": "sae",
                "layer": 1,
                "sae": "sae",
                "error_term": "drop",
                "edits": [{"feature": 7, "mode": "set", "value": 3.0}],
            },
        ),
    ):
        edited = hidden(model, ids)[2]
    z = sae.encode(clean).detach()
    z[..., 7] = 3.0
    torch.testing.assert_close(edited, sae.decode(z).detach(), atol=1e-5, rtol=1e-5)


def test_feature_condition_gates_tokens(model: torch.nn.Module, ids: Tensor, tmp_path: Path) -> None:
    sae = make_sae(tmp_path / "sae")
    clean = hidden(model, ids)
    acts = sae.encode(clean[2]).detach()
    feature = int((acts > 0).float().mean((0, 1)).sub(0.5).abs().argmin())  # fires on about half the tokens
    thr = float(acts[..., feature].median())
    fires = acts[..., feature] > thr
    assert 0 < int(fires.sum()) < fires.numel()
    c = cfg(
        tmp_path,
        {
            "op": "add",
            "layer": 1,
            "vector": [1.0] * D,
            "apply": {"when": {"sae": "sae", "feature": feature, "above": thr}},
        },
    )
    with steer(model, c):
        steered = hidden(model, ids)
    assert ((steered[2] - clean[2]).abs().amax(-1) > 0).tolist() == fires.tolist()


def test_transcoder_replaces_mlp_out(model: torch.nn.Module, ids: Tensor, tmp_path: Path) -> None:
    tc = make_sae(tmp_path / "tc", site="blocks.1.hook_mlp_in", out_site="blocks.1.hook_mlp_out")
    assert tc.is_transcoder
    with record(model, ["blocks.1.hook_mlp_in"]) as rec:
        hidden(model, ids)
    mlp_in = rec["blocks.1.hook_mlp_in"]
    with (
        steer(model, cfg(tmp_path, {"op": "replace", "layer": 1, "site": "mlp_out", "sae": "tc"})),
        record(model, ["blocks.1.hook_mlp_out"]) as out,
    ):
        hidden(model, ids)
    torch.testing.assert_close(out["blocks.1.hook_mlp_out"], tc(mlp_in).detach(), atol=1e-5, rtol=1e-5)
    with pytest.raises(SteeringConfigError, match="trained at layer 1, site mlp_out"):
        attach(model, cfg(tmp_path, {"op": "replace", "layer": 1, "site": "resid_post", "sae": "tc"}))
    with pytest.raises(SteeringConfigError, match="set site: mlp_out"):
        attach(model, cfg(tmp_path, {"op": "replace", "layer": 1, "site": "resid_post", "sae": "tc", "any_site": True}))


def test_an_sae_runs_where_it_was_trained_unless_told_otherwise(
    model: torch.nn.Module, ids: Tensor, tmp_path: Path
) -> None:
    """Its metadata's site is the default; another layer, or every layer, is an error unless any_site says so."""
    make_sae(tmp_path / "sae")  # trained at blocks.1.hook_resid_post
    with steer(model, cfg(tmp_path, {"op": "replace", "sae": "sae"})) as own:
        assert sorted(own.plan.ops) == [(1, "resid_post")]
        by_default = hidden(model, ids)
    with steer(model, cfg(tmp_path, {"op": "replace", "sae": "sae", "layer": 1, "site": "resid_post"})):
        torch.testing.assert_close(hidden(model, ids)[2], by_default[2], rtol=0, atol=0)
    for elsewhere in ({"layer": 2}, {"layer": "all"}, {"site": "resid_pre"}, {"layer": [1, 2]}):
        with pytest.raises(SteeringConfigError, match=r"trained at layer 1, site resid_post.*any_site: true"):
            attach(model, cfg(tmp_path, {"op": "sae", "sae": "sae", **elsewhere}))
    with steer(model, cfg(tmp_path, {"op": "replace", "sae": "sae", "layer": "all", "any_site": True})) as anywhere:
        assert sorted(anywhere.plan.ops) == [(0, "resid_post"), (1, "resid_post"), (2, "resid_post")]
    assert hooks_installed(model) == 0


def test_sae_errors_name_the_field(model: torch.nn.Module, tmp_path: Path) -> None:
    make_sae(tmp_path / "sae")
    bad = [
        (
            {"op": "sae", "layer": 1, "sae": "sae", "edits": [{"feature": F, "mode": "set", "value": 1.0}]},
            f"interventions[0].edits[0].feature: {F} out of range: the SAE has {F} latents (0..{F - 1})",
        ),
        (
            {"op": "sae", "layer": 1, "sae": "sae", "apply": {"when": {"feature": 999, "above": 0}}},
            "interventions[0].apply.when.feature: 999 out of range",
        ),
        (
            {"op": "add", "layer": 1, "vector": [1.0] * D, "apply": {"when": {"feature": 1, "above": 0}}},
            "this op has no SAE",
        ),
        ({"op": "replace", "layer": 1, "sae": "nope"}, "interventions[0].sae: file or folder not found"),
        ({"op": "replace", "layer": 1, "sae": "."}, "interventions[0].sae: cannot load the SAE at"),
    ]
    for iv, message in bad:
        with pytest.raises(SteeringConfigError) as info:
            attach(model, cfg(tmp_path, iv))
        assert message in str(info.value)
    assert hooks_installed(model) == 0


def test_issue_example_config_attaches(tmp_path: Path) -> None:
    """The example from the issue, with its files in place, runs on a 16-layer model of width 64."""
    model = tiny_model("llama", n_layers=16)
    (tmp_path / "cfg.yaml").write_text(EXAMPLE)
    SteeringVector.single(torch.randn(D)).save(tmp_path / "vectors/refusal.safetensors")
    SteeringVector.single(torch.randn(D)).save(tmp_path / "vectors/harm.safetensors")
    g = torch.Generator().manual_seed(0)
    meta = SaeMeta("relu", D, 512, D, "blocks.15.hook_resid_post", "blocks.15.hook_resid_post")
    sae = get_architecture("relu")(meta)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D, 512, generator=g))
        sae.W_dec.copy_(torch.randn(512, D, generator=g) / 512**0.5)
    save_sae(sae, tmp_path / "saes/example")
    config = SteeringConfig.from_file(tmp_path / "cfg.yaml")
    ids = torch.randint(3, 120, (2, 5))
    with steer(model, config) as handle, torch.no_grad():
        assert sorted(handle.plan.ops) == [(10, "resid_post"), (15, "resid_post")]
        out = model.generate(input_ids=ids, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 8)
    assert hooks_installed(model) == 0


def test_shared_resources_load_each_sae_once(model: torch.nn.Module, tmp_path: Path) -> None:
    from steerlib.hf.layout import get_layout
    from steerlib.plan import Resources, spec_of

    make_sae(tmp_path / "sae")
    layout = get_layout(model)
    res = Resources(spec_of(model, layout.n_layers, layout.d_model))
    c = cfg(tmp_path, {"op": "replace", "layer": 1, "sae": "sae"})
    with steer(model, c, resources=res) as a, steer(model, c, resources=res) as b:
        assert a.plan.ops[(1, "resid_post")][0].op.sae is b.plan.ops[(1, "resid_post")][0].op.sae  # type: ignore[attr-defined]
    other = Resources(spec_of(tiny_model("llama", n_layers=2), 2, D))
    with pytest.raises(ValueError, match="resources were made for"):
        attach(model, c, resources=other)
    assert hooks_installed(model) == 0


def test_bf16_sae_runs_at_the_model_precision(model: torch.nn.Module, ids: Tensor, tmp_path: Path) -> None:
    """A compressed bf16 release of an SAE steers an fp32 model exactly as its fp32 upcast does."""
    sae = make_sae(tmp_path / "fp32")
    low = get_architecture("relu")(sae.meta).to(torch.bfloat16)
    low.load_state_dict({k: v.to(torch.bfloat16) for k, v in sae.state_dict().items()})
    save_sae(low, tmp_path / "bf16", compress=True)
    save_sae(low.to(torch.float32), tmp_path / "up")
    edits = [{"feature": 3, "mode": "set", "value": 5.0}]
    outs = []
    for name in ("bf16", "up"):
        with steer(model, cfg(tmp_path, {"op": "sae", "layer": 1, "sae": name, "edits": edits})) as handle:
            assert handle.plan.ops[(1, "resid_post")][0].op.sae.W_enc.dtype == torch.float32  # type: ignore[attr-defined]
            outs.append(hidden(model, ids)[-1])
    assert torch.equal(outs[0], outs[1])
