"""get_layout on every tiny architecture (and the embedded model): layers, base, attention and MLP blocks."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch
from tiny_models import ARCHS, HIDDEN, PAD_ID, tiny_model
from torch import Tensor, nn

from steerlib.hf.layout import ModelLayout, get_layout

# Attention and MLP attribute names per architecture, as transformers 5.23 builds them.
EXPECTED_NAMES = {
    "gpt2": ("transformer.h", "attn", "mlp"),
    "gpt_neox": ("gpt_neox.layers", "attention", "mlp"),
}
DEFAULT_NAMES = ("model.layers", "self_attn", "mlp")


def _ids(batch: int, seq: int, seed: int) -> Tensor:
    return torch.randint(3, 120, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("n_layers", [2, 3])
def test_finds_layers_base_attention_and_mlp(arch: str, n_layers: int) -> None:
    model = tiny_model(arch, n_layers=n_layers)
    layout = get_layout(model)
    layers_name, attn_name, mlp_name = EXPECTED_NAMES.get(arch, DEFAULT_NAMES)

    assert layout.n_layers == n_layers
    assert layout.d_model == HIDDEN
    assert layout.layers_name == layers_name
    assert layout.layers is model.get_submodule(layers_name)
    assert layout.base is model.base_model  # model.model / model.transformer / model.gpt_neox
    for i in range(n_layers):
        assert layout.layer(i) is layout.layers[i]
        assert layout.attention(i) is layout.layers[i].get_submodule(attn_name)
        assert layout.mlp(i) is layout.layers[i].get_submodule(mlp_name)
    assert layout.layer(-1) is layout.layers[n_layers - 1]


@pytest.mark.parametrize("arch", ARCHS)
def test_hooks_fire_once_per_layer_per_forward(arch: str) -> None:
    model = tiny_model(arch, n_layers=3)
    layout = get_layout(model)
    calls: Counter[tuple[str, int]] = Counter()
    outputs: dict[tuple[str, int], Any] = {}

    def recorder(kind: str, i: int) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            calls[kind, i] += 1
            outputs[kind, i] = output

        return hook

    handles = []
    for i in range(layout.n_layers):
        handles.append(layout.layer(i).register_forward_hook(recorder("layer", i)))
        handles.append(layout.attention(i).register_forward_hook(recorder("attn", i)))
        handles.append(layout.mlp(i).register_forward_hook(recorder("mlp", i)))
    try:
        ids = _ids(2, 5, seed=1)
        with torch.no_grad():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    finally:
        for h in handles:
            h.remove()

    assert calls == Counter({(k, i): 1 for k in ("layer", "attn", "mlp") for i in range(3)})
    for i in range(3):
        # transformers 5: every decoder layer returns the residual stream as a Tensor, attention a tuple
        # (attn_output, weights or None), the MLP a Tensor.
        assert isinstance(outputs["layer", i], Tensor)
        assert isinstance(outputs["attn", i], tuple)
        assert outputs["attn", i][0].shape == (2, 5, HIDDEN)
        assert isinstance(outputs["mlp", i], Tensor)
        assert outputs["mlp", i].shape == (2, 5, HIDDEN)
    # The layers found are the residual stream, in order (the last hidden state has the final norm applied).
    for i in range(2):
        torch.testing.assert_close(outputs["layer", i], hidden[i + 1], rtol=0, atol=0)


def test_layer_index_out_of_range_names_the_range() -> None:
    layout = get_layout(tiny_model("llama", n_layers=3))
    with pytest.raises(IndexError, match=r"layer 3 out of range: model has 3 layers \(0\.\.2\)"):
        layout.attention(3)
    with pytest.raises(IndexError, match="layer -4 out of range"):
        layout.mlp(-4)


def test_missing_block_error_lists_the_layer_children() -> None:
    layers = nn.ModuleList([nn.ModuleDict({"self_attn": nn.Identity(), "norm": nn.Identity()})])
    layout = ModelLayout(base=nn.Module(), layers=layers, layers_name="layers", n_layers=1, d_model=4)
    assert isinstance(layout.attention(0), nn.Identity)
    with pytest.raises(AttributeError, match=r"no MLP block in layer 0 \(ModuleDict\).*children are self_attn, norm"):
        layout.mlp(0)


def test_model_without_decoder_layers_is_an_error() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ModuleList([nn.Linear(4, 4)]))
    with pytest.raises(ValueError, match="no decoder layers found in Sequential"):
        get_layout(model)


def test_list_of_the_right_length_without_attention_is_not_taken() -> None:
    model = tiny_model("llama", n_layers=3)
    base = model.get_submodule("model")
    base.add_module("aaa_norms", nn.ModuleList([nn.LayerNorm(HIDDEN) for _ in range(3)]))
    assert get_layout(model).layers is base.get_submodule("layers")


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_model_generates_with_left_padding(arch: str) -> None:
    model: Any = tiny_model(arch, n_layers=2)
    prompt = _ids(1, 4, seed=2)
    padded = torch.cat([torch.full((1, 2), PAD_ID), prompt], dim=1)
    ids = torch.cat([padded, _ids(1, 6, seed=3)])
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    kwargs: dict[str, Any] = {"max_new_tokens": 4, "min_new_tokens": 4}
    batch = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    alone = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **kwargs)
    assert batch.shape == (2, 10)
    assert batch[0, 6:].tolist() == alone[0, 4:].tolist()


def test_tiny_models_are_seeded() -> None:
    a, b, c = tiny_model("qwen2", seed=0), tiny_model("qwen2", seed=0), tiny_model("qwen2", seed=1)
    wa, wb, wc = (m.get_parameter("model.layers.0.mlp.up_proj.weight") for m in (a, b, c))
    assert torch.equal(wa, wb)
    assert not torch.equal(wa, wc)
    assert not a.training


@pytest.mark.real_model
def test_embedded_model_layout() -> None:
    from steerlib.hf.loading import load_model

    model, _ = load_model()
    layout = get_layout(model)
    assert (layout.n_layers, layout.d_model, layout.layers_name) == (30, 576, "model.layers")
    assert layout.base is model.model
    assert type(layout.attention(29)).__name__ == "LlamaAttention"
    assert type(layout.mlp(0)).__name__ == "LlamaMLP"
