"""Steering vectors in shared formats (steerlib.interchange, steerlib.convert), checked against the real packages.

Oracles: repeng 0.4.0 (``ControlVector.export_gguf`` / ``import_gguf``, ``ControlModel``) and steering-vectors 0.12.2
(``SteeringVector.apply``), on a tiny seeded 3-layer Llama (hidden 64). A control vector's ``direction.N`` is added to
the output of decoder block N (steerlib resid_post of N, ``hidden_states[N + 1]``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tiny_models import tiny_model
from torch import Tensor, nn

import steerlib
from steerlib.config import SteeringConfig
from steerlib.convert import main
from steerlib.hf.layout import get_layout
from steerlib.interchange import (
    config_to_vector,
    from_repeng,
    from_steering_vectors,
    import_repeng,
    read_gguf,
    save_gguf,
    select_layers,
    to_repeng,
    to_steering_vectors,
    write_config,
    write_gguf,
)
from steerlib.vectors import SteeringVector, load_vector

D = 64
IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 100]])
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def repeng() -> Any:
    try:
        return import_repeng()
    except ImportError:
        pytest.skip("repeng is not installed (pip install --no-deps repeng scikit-learn)")


def direction(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(D).astype(np.float32)


def block_outputs(model: nn.Module, cfg: SteeringConfig | None = None) -> tuple[list[Tensor], tuple[Tensor, ...]]:
    """Each decoder block's output (read after steering) and ``hidden_states``."""
    outs: list[Tensor] = []
    hooks = [
        layer.register_forward_hook(lambda m, a, o: outs.append((o if isinstance(o, Tensor) else o[0]).clone()))
        for layer in get_layout(model).layers
    ]
    try:
        with torch.no_grad():
            if cfg is None:
                hs = model(IDS, output_hidden_states=True).hidden_states
            else:
                with steerlib.steer(model, cfg):
                    hs = model(IDS, output_hidden_states=True).hidden_states
    finally:
        for h in hooks:
            h.remove()
    return outs, hs


def raw_gguf(path: Path, arch: str, tensors: dict[str, np.ndarray]) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    for name, array in tensors.items():
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def ops(cfg: SteeringConfig) -> list[tuple[str, Any, str, float]]:
    return [(op.op, op.layer, op.site, op.coefficient) for op in cfg.interventions]  # type: ignore[union-attr]


# -- GGUF <-> repeng -------------------------------------------------------------------------------------------


def test_gguf_written_by_steerlib_reads_in_repeng(repeng: Any, tmp_path: Path) -> None:
    a, b = direction(1), direction(2)
    vec = SteeringVector.per_layer({1: torch.from_numpy(a), 2: torch.from_numpy(b)}, model="m", method="caa")
    save_gguf(vec, tmp_path / "v.gguf", model_hint="llama")
    cv = repeng.ControlVector.import_gguf(str(tmp_path / "v.gguf"))
    assert cv.model_type == "llama"
    assert sorted(cv.directions) == [1, 2]
    assert cv.directions[1].dtype == np.float32
    assert np.array_equal(cv.directions[1], a) and np.array_equal(cv.directions[2], b)
    meta = read_gguf(tmp_path / "v.gguf").metadata
    assert (meta["model_hint"], meta["model"], meta["method"], meta["site"]) == ("llama", "m", "caa", "resid_post")


@pytest.mark.parametrize(
    ("layer_range", "layers"),
    [(None, [1, 2]), (["1", "1"], [1]), (["2", "0"], [2]), (["0", "0"], [1, 2]), (["-3", "2"], [1, 2])],
)
def test_repeng_gguf_becomes_add_ops(
    repeng: Any, tmp_path: Path, layer_range: list[str] | None, layers: list[int]
) -> None:
    repeng.ControlVector("llama", {1: direction(1), 2: direction(2)}).export_gguf(str(tmp_path / "r.gguf"))
    extra = ["--layer-range", *layer_range] if layer_range else []
    assert main([str(tmp_path / "r.gguf"), str(tmp_path / "r.yaml"), "--scale", "0.5", *extra]) == 0
    cfg = SteeringConfig.from_file(tmp_path / "r.yaml")
    assert ops(cfg) == [("add", layer, "resid_post", 0.5) for layer in layers]
    saved = load_vector(tmp_path / "vectors" / "r.safetensors")
    assert saved.metadata["model_hint"] == "llama"
    assert (tmp_path / "r.yaml").read_text().startswith("# model_hint: llama\n")


@pytest.mark.parametrize("layer", [1, 2])
def test_repeng_gguf_steers_exactly_its_layer(repeng: Any, tmp_path: Path, layer: int) -> None:
    dirs = {1: direction(1), 2: direction(2)}
    repeng.ControlVector("llama", dirs).export_gguf(str(tmp_path / "r.gguf"))
    cfg = write_config(read_gguf(tmp_path / "r.gguf"), tmp_path / "r.yaml", scale=0.5, layer_range=(layer, layer))
    model = tiny_model("llama", n_layers=3)
    base, base_hs = block_outputs(model)
    steered, hs = block_outputs(model, cfg)
    for earlier in range(layer):
        assert torch.equal(steered[earlier], base[earlier])
    assert torch.equal(steered[layer], base[layer] + 0.5 * torch.from_numpy(dirs[layer]))
    if layer == 1:  # hidden_states[3] is after the final norm, so layer 1 is the one hidden_states shows raw
        assert torch.equal(hs[2], base_hs[2] + 0.5 * torch.from_numpy(dirs[1]))
        assert torch.equal(hs[1], base_hs[1])


def test_steerlib_matches_repeng_control_model(repeng: Any, tmp_path: Path) -> None:
    cv = repeng.ControlVector("llama", {1: direction(1), 2: direction(2)})
    cv.export_gguf(str(tmp_path / "r.gguf"))
    cfg = write_config(read_gguf(tmp_path / "r.gguf"), tmp_path / "r.yaml", scale=0.7)
    model = tiny_model("llama", n_layers=3)
    with torch.no_grad(), steerlib.steer(model, cfg):
        ours = model(IDS).logits
    wrapped = repeng.ControlModel(tiny_model("llama", n_layers=3), [1, 2])
    wrapped.set_control(cv, 0.7)
    with torch.no_grad():
        theirs = wrapped(IDS).logits
    assert torch.equal(ours, theirs)


def test_round_trip_through_repeng_is_bit_exact(repeng: Any, tmp_path: Path) -> None:
    vec = SteeringVector.per_layer({k: torch.randn(D) * 10 ** (k - 2) for k in (1, 2, 5)}, model_hint="qwen2")
    save_gguf(vec, tmp_path / "a.gguf")
    repeng.ControlVector.import_gguf(str(tmp_path / "a.gguf")).export_gguf(str(tmp_path / "b.gguf"))
    back = read_gguf(tmp_path / "b.gguf")
    assert list(back.by_layer) == [1, 2, 5]
    assert all(torch.equal(back.by_layer[k], vec.by_layer[k]) for k in (1, 2, 5))
    assert back.metadata["model_hint"] == "qwen2"
    assert all(torch.equal(from_repeng(to_repeng(back)).by_layer[k], vec.by_layer[k]) for k in (1, 2, 5))


def test_config_to_gguf_and_back_keeps_vectors_and_metadata(tmp_path: Path) -> None:
    a, b = torch.randn(D), torch.randn(D)
    SteeringVector.per_layer({2: a, 3: b}, model="org/m", method="caa", site="resid_pre").save(
        tmp_path / "v.safetensors"
    )
    (tmp_path / "s.yaml").write_text(
        "interventions:\n"
        "  - {op: add, layer: [2, 3], site: resid_pre, vector: v.safetensors, coefficient: 1.0}\n"
        "  - {op: add, layer: 4, vector: [" + ", ".join(["0.5"] * D) + "], coefficient: 2.0}\n"
    )
    assert main([str(tmp_path / "s.yaml"), str(tmp_path / "s.gguf"), "--model-hint", "llama"]) == 0
    g = read_gguf(tmp_path / "s.gguf")  # resid_pre of L is the output of block L - 1
    assert list(g.by_layer) == [1, 2, 4]
    assert torch.equal(g.by_layer[1], a) and torch.equal(g.by_layer[2], b)
    assert torch.equal(g.by_layer[4], torch.full((D,), 1.0))
    assert (g.metadata["model"], g.metadata["method"], g.metadata["model_hint"]) == ("org/m", "caa", "llama")
    assert main([str(tmp_path / "s.gguf"), str(tmp_path / "t.json"), "--layer-range", "2", "4"]) == 0
    cfg = SteeringConfig.from_file(tmp_path / "t.json")
    assert ops(cfg) == [("add", 2, "resid_post", 1.0), ("add", 4, "resid_post", 1.0)]
    assert torch.equal(config_to_vector(cfg).by_layer[2], b)


# -- steering-vectors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layer_type", "site"), [("decoder_block", "resid_post"), ("self_attn", "attn_out"), ("mlp", "mlp_out")]
)
def test_steering_vectors_apply_matches_converted_config(tmp_path: Path, layer_type: str, site: str) -> None:
    sv = pytest.importorskip("steering_vectors")
    theirs_sv = sv.SteeringVector({0: torch.randn(D), 2: torch.randn(D)}, layer_type)
    model = tiny_model("llama", n_layers=3)
    with torch.no_grad(), theirs_sv.apply(model, multiplier=1.5):
        theirs = model(IDS, output_hidden_states=True)
    cfg = write_config(from_steering_vectors(theirs_sv), tmp_path / "sv.yaml", scale=1.5)
    assert ops(cfg) == [("add", 0, site, 1.5), ("add", 2, site, 1.5)]
    with torch.no_grad(), steerlib.steer(model, SteeringConfig.from_file(tmp_path / "sv.yaml")):
        ours = model(IDS, output_hidden_states=True)
    assert torch.allclose(ours.logits, theirs.logits, rtol=0, atol=1e-6)
    assert all(
        torch.allclose(x, y, rtol=0, atol=1e-6) for x, y in zip(ours.hidden_states, theirs.hidden_states, strict=True)
    )
    back = to_steering_vectors(load_vector(tmp_path / "vectors" / "sv.safetensors"))
    assert back.layer_type == layer_type
    assert all(torch.equal(back.layer_activations[k], theirs_sv.layer_activations[k]) for k in (0, 2))


def test_steering_vectors_negative_layers_and_norm_types() -> None:
    sv = pytest.importorskip("steering_vectors")
    vec = from_steering_vectors(sv.SteeringVector({-1: torch.ones(D)}, "decoder_block"), n_layers=3)
    assert list(vec.by_layer) == [2]
    with pytest.raises(ValueError, match="pass n_layers"):
        from_steering_vectors(sv.SteeringVector({-1: torch.ones(D)}, "decoder_block"))
    with pytest.raises(ValueError, match="allowed: decoder_block, self_attn, mlp"):
        from_steering_vectors(sv.SteeringVector({1: torch.ones(D)}, "input_layernorm"))


# -- conventions and errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layer_range", "kept"), [(None, [0, 1, 2, 9]), ((1, 2), [1, 2]), ((0, 0), [1, 2, 9]), ((2, -1), [2, 9])]
)
def test_layer_range_is_llama_cpp_inclusive_with_nonpositive_as_open(layer_range: Any, kept: list[int]) -> None:
    assert select_layers([9, 2, 1, 0], layer_range) == kept


def test_layer_zero_and_other_sites_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="layer 0 cannot be written"):
        write_gguf({0: torch.ones(D)}, tmp_path / "z.gguf", "llama", {})
    with pytest.raises(ValueError, match="site 'mlp_out' cannot be a control vector"):
        save_gguf(SteeringVector.per_layer({1: torch.ones(D)}, site="mlp_out"), tmp_path / "m.gguf", model_hint="x")
    with pytest.raises(ValueError, match="no model hint"):
        save_gguf(SteeringVector.per_layer({1: torch.ones(D)}), tmp_path / "h.gguf")
    raw_gguf(tmp_path / "zero.gguf", "controlvector", {"direction.0": np.ones(D, dtype=np.float32)})
    with pytest.raises(ValueError, match=r"direction\.0 found; llama\.cpp rejects the file"):
        read_gguf(tmp_path / "zero.gguf")
    raw_gguf(tmp_path / "model.gguf", "llama", {"token_embd.weight": np.ones((4, D), dtype=np.float32)})
    with pytest.raises(ValueError, match=r"not a control vector: general\.architecture is 'llama'"):
        read_gguf(tmp_path / "model.gguf")


@pytest.mark.parametrize(
    ("op", "message"),
    [
        ({"op": "add", "layer": 1, "vector": [1.0] * D, "relative": True}, r"interventions\[0\].relative"),
        ({"op": "add", "layer": 1, "vector": [1.0] * D, "apply": {"tokens": "prompt"}}, r"interventions\[0\].apply"),
        ({"op": "add", "layer": "all", "vector": [1.0] * D}, "'all' needs the model's layer count"),
        ({"op": "ablate", "layer": 1, "vector": [1.0] * D}, "op 'ablate' has no control-vector form; allowed: add"),
        ({"op": "add", "layer": 1, "site": "attn_out", "vector": [1.0] * D}, "site 'attn_out'"),
    ],
)
def test_configs_a_control_vector_cannot_express_are_refused(op: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        config_to_vector(SteeringConfig.from_dict({"interventions": [op]}))


def test_cli_names_allowed_suffixes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "a.gguf"), str(tmp_path / "b.pt")]) == 2
    assert "unknown suffix '.pt'; allowed: .gguf, .yaml, .yml, .json, .safetensors" in capsys.readouterr().err


def test_python_m_steerlib_convert_runs_and_imports_no_optional_package(tmp_path: Path) -> None:
    save_gguf(SteeringVector.per_layer({1: torch.ones(D)}), tmp_path / "c.gguf", model_hint="llama")
    run = subprocess.run(
        [sys.executable, "-m", "steerlib", "convert", str(tmp_path / "c.gguf"), str(tmp_path / "c.yaml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert ops(SteeringConfig.from_file(tmp_path / "c.yaml")) == [("add", 1, "resid_post", 1.0)]
    probe = (
        "import sys, steerlib.interchange, steerlib.convert; "
        "print(sorted({'repeng', 'steering_vectors', 'gguf'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stderr
