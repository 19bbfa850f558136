"""Hooks on tiny seeded random models: exact facts about what each op does to the residual stream."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tiny_models import ARCHS, tiny_model
from torch import Tensor

from steerlib import SteeringConfig, SteeringConfigError, attach, hooks_installed, steer

D = 64


def cfg(*interventions: dict[str, Any]) -> SteeringConfig:
    return SteeringConfig.model_validate({"interventions": list(interventions)})


def hidden(model: torch.nn.Module, ids: Tensor, mask: Tensor | None = None) -> tuple[Tensor, ...]:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    return tiny_model("llama", n_layers=3)


@pytest.fixture
def ids() -> Tensor:
    return torch.randint(3, 120, (2, 7), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch", ARCHS)
def test_add_is_exact_on_every_architecture(arch: str) -> None:
    model = tiny_model(arch, n_layers=3)
    ids = torch.randint(3, 120, (2, 6), generator=torch.Generator().manual_seed(2))
    v = torch.randn(D)
    clean = hidden(model, ids)
    with steer(model, cfg({"op": "add", "layer": 1, "vector": v.tolist(), "coefficient": 3.0})):
        steered = hidden(model, ids)
    torch.testing.assert_close(steered[1], clean[1], rtol=0, atol=0)  # layer 0 untouched
    torch.testing.assert_close(steered[2], clean[2] + 3.0 * v, rtol=0, atol=1e-5)
    assert hooks_installed(model) == 0


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("site", ["resid_pre", "attn_out", "mlp_in", "mlp_out"])
def test_every_site_steers_every_architecture(arch: str, site: str) -> None:
    model = tiny_model(arch, n_layers=3)
    ids = torch.randint(3, 120, (1, 5), generator=torch.Generator().manual_seed(3))
    v = torch.randn(D)
    clean = hidden(model, ids)
    with steer(model, cfg({"op": "add", "layer": 1, "site": site, "vector": v.tolist(), "coefficient": 2.0})):
        steered = hidden(model, ids)
    assert (steered[2] - clean[2]).abs().max() > 1e-3
    if site != "resid_pre":
        torch.testing.assert_close(steered[1], clean[1], rtol=0, atol=0)
    else:  # resid_pre of layer 1 is resid_post of layer 0, and hidden_states shows it steered
        torch.testing.assert_close(steered[1], clean[1] + 2.0 * v, rtol=0, atol=1e-5)
        with steer(model, cfg({"op": "add", "layer": 0, "vector": v.tolist(), "coefficient": 2.0})):
            torch.testing.assert_close(hidden(model, ids)[2], steered[2], rtol=0, atol=1e-6)


def test_ablation_leaves_zero_projection(llama: torch.nn.Module, ids: Tensor) -> None:
    v = torch.randn(D)
    clean = hidden(llama, ids)
    assert (clean[2] @ v).abs().min() > 1e-3
    with steer(llama, cfg({"op": "ablate", "layer": 1, "vector": v.tolist()})):
        steered = hidden(llama, ids)
    assert (steered[2] @ (v / v.norm())).abs().max() < 1e-5
    # only the component along v is removed
    u = v / v.norm()
    torch.testing.assert_close(steered[2], clean[2] - (clean[2] @ u)[..., None] * u, atol=1e-5, rtol=0)


def test_ablating_two_directions_removes_their_span(llama: torch.nn.Module, ids: Tensor, tmp_path: Any) -> None:
    from steerlib import SteeringVector

    vs = torch.randn(2, D)
    SteeringVector.single(vs).save(tmp_path / "two.safetensors")
    c = SteeringConfig.from_dict(
        {"interventions": [{"op": "ablate", "layer": 0, "vector": "two.safetensors"}]}, base_dir=tmp_path
    )
    with steer(llama, c):
        h = hidden(llama, ids)[1]
    assert (h @ vs.T).abs().max() < 1e-4


def test_relative_and_norm_matched_addition(llama: torch.nn.Module, ids: Tensor) -> None:
    v = torch.randn(D)
    clean = hidden(llama, ids)[2]
    with steer(llama, cfg({"op": "add", "layer": 1, "vector": v.tolist(), "coefficient": 0.5, "relative": True})):
        rel = hidden(llama, ids)[2]
    expected = clean + 0.5 * clean.norm(dim=-1, keepdim=True) * v / v.norm()
    torch.testing.assert_close(rel, expected, atol=1e-5, rtol=1e-5)
    with steer(llama, cfg({"op": "add", "layer": 1, "vector": v.tolist(), "coefficient": 5.0, "norm_match": True})):
        nm = hidden(llama, ids)[2]
    torch.testing.assert_close(nm.norm(dim=-1), clean.norm(dim=-1), atol=1e-4, rtol=1e-5)
    assert (nm - clean).abs().max() > 0.1


def _changed_positions(model: torch.nn.Module, ids: Tensor, apply: dict[str, Any], **kw: Any) -> list[int]:
    v = torch.ones(D)
    clean = hidden(model, ids)[1]
    with steer(model, cfg({"op": "add", "layer": 0, "vector": v.tolist(), "apply": apply}), **kw):
        steered = hidden(model, ids)[1]
    return [int(i) for i in ((steered - clean).abs().amax(-1)[0] > 0).nonzero().flatten()]


@pytest.mark.parametrize(
    ("apply", "expected"),
    [
        ({}, [0, 1, 2, 3, 4, 5, 6]),
        ({"tokens": "prompt"}, [0, 1, 2, 3, 4, 5, 6]),
        ({"tokens": "generated"}, []),
        ({"positions": [0, 3, -1]}, [0, 3, 6]),
        ({"window": [2, 5]}, [2, 3, 4]),
        ({"window": [4, None]}, [4, 5, 6]),
        ({"last": 2}, [5, 6]),
        ({"last": 3, "exclude": {"positions": [-1]}}, [4, 5]),
        ({"window": [1, 6], "exclude": {"window": [2, 4]}}, [1, 4, 5]),
    ],
)
def test_position_policies(llama: torch.nn.Module, ids: Tensor, apply: dict[str, Any], expected: list[int]) -> None:
    assert _changed_positions(llama, ids[:1], apply) == expected


class _CharTokenizer:
    """A real (if small) tokenizer protocol implementation: id i decodes to a fixed string."""

    def __init__(self, vocab: list[str]) -> None:
        self.vocab = vocab

    def decode(self, token_ids: list[int]) -> str:
        return "".join(self.vocab[i] for i in token_ids)

    def __len__(self) -> int:
        return len(self.vocab)


def test_token_match_policy(llama: torch.nn.Module) -> None:
    tok = _CharTokenizer([f" w{i}" for i in range(128)])
    ids = torch.tensor([[5, 9, 5, 7, 9, 11]])
    assert _changed_positions(llama, ids, {"match": ["w9"]}, tokenizer=tok) == [1, 4]
    assert _changed_positions(llama, ids, {"match": ["w5", "w11"], "exclude": {"positions": [0]}}, tokenizer=tok) == [
        2,
        5,
    ]
    with pytest.raises(SteeringConfigError, match="needs a tokenizer"):
        attach(llama, cfg({"op": "add", "layer": 0, "vector": [1.0] * D, "apply": {"match": ["w9"]}}))


def test_left_padding_positions(llama: torch.nn.Module) -> None:
    ids = torch.tensor([[0, 0, 5, 6, 7], [4, 5, 6, 7, 8]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    v = torch.ones(D)
    clean = hidden(llama, ids, mask)[1]
    with steer(llama, cfg({"op": "add", "layer": 0, "vector": v.tolist(), "apply": {"positions": [0, -1]}})):
        steered = hidden(llama, ids, mask)[1]
    changed = (steered - clean).abs().amax(-1) > 0
    assert changed.tolist() == [[False, False, True, False, True], [True, False, False, False, True]]


def test_probe_condition_per_token(llama: torch.nn.Module, ids: Tensor) -> None:
    probe = torch.randn(D)
    clean = hidden(llama, ids)
    score = clean[1] @ probe  # resid_post of layer 0 is what the layer-0 op reads
    thr = float(score.median())
    c = cfg(
        {
            "op": "add",
            "layer": 0,
            "vector": [1.0] * D,
            "apply": {"when": {"vector": probe.tolist(), "above": thr}},
        }
    )
    with steer(llama, c):
        steered = hidden(llama, ids)
    changed = (steered[1] - clean[1]).abs().amax(-1) > 0
    assert changed.tolist() == (score > thr).tolist()


def test_config_errors_install_nothing(llama: torch.nn.Module) -> None:
    good = {"op": "add", "layer": 0, "vector": [1.0] * D}
    bad = [
        (
            {"op": "add", "layer": 3, "vector": [1.0] * D},
            "interventions[1].layer: 3 out of range: model has 3 layers (0..2)",
        ),
        (
            {"op": "add", "layer": 0, "vector": [1.0] * 5},
            "interventions[1].vector: vector has shape (5,); the model's width is 64",
        ),
        ({"op": "ablate", "layer": 0, "vector": [0.0] * D}, "cannot ablate a zero direction"),
        ({"op": "add", "layer": 0, "vector": "missing.safetensors"}, "file or folder not found"),
    ]
    for iv, message in bad:
        with pytest.raises(SteeringConfigError) as info:
            attach(llama, cfg(good, iv))
        assert message in str(info.value)
        assert hooks_installed(llama) == 0


def test_no_hook_remains_after_exception(llama: torch.nn.Module, ids: Tensor) -> None:
    with (
        pytest.raises(RuntimeError, match="boom"),
        steer(llama, cfg({"op": "add", "layer": 0, "vector": [1.0] * D})),
    ):
        assert hooks_installed(llama) == 2
        hidden(llama, ids)
        raise RuntimeError("boom")
    assert hooks_installed(llama) == 0


def test_attach_handle_remove_restores_model(llama: torch.nn.Module, ids: Tensor) -> None:
    clean = hidden(llama, ids)[-1]
    handle = attach(llama, cfg({"op": "add", "layer": "all", "vector": [0.5] * D}))
    assert hooks_installed(llama) == 4  # the stack tracker + one per layer
    assert (hidden(llama, ids)[-1] - clean).abs().max() > 1e-3
    handle.remove()
    handle.remove()  # idempotent
    torch.testing.assert_close(hidden(llama, ids)[-1], clean, rtol=0, atol=0)


def test_stacked_handles_apply_in_attach_order(llama: torch.nn.Module, ids: Tensor) -> None:
    v = torch.randn(D)
    first = attach(llama, cfg({"op": "add", "layer": 0, "vector": v.tolist()}))
    second = attach(llama, cfg({"op": "ablate", "layer": 0, "vector": v.tolist()}))
    h = hidden(llama, ids)[1]
    first.remove()
    second.remove()
    assert (h @ v).abs().max() < 1e-4  # add then ablate: nothing left along v


def test_nan_in_a_vector_file_is_refused(llama: torch.nn.Module, tmp_path: Any) -> None:
    from steerlib import SteeringVector

    v = torch.randn(D)
    v[3] = float("nan")
    SteeringVector.single(v).save(tmp_path / "nan.safetensors")
    c = SteeringConfig.from_dict({"interventions": [{"op": "add", "layer": 0, "vector": "nan.safetensors"}]}, tmp_path)
    with pytest.raises(SteeringConfigError, match=r"interventions\[0\].vector: vector contains NaN or inf"):
        attach(llama, c)
    assert hooks_installed(llama) == 0
