"""Where a HuggingFace causal LM keeps its decoder layers and their attention and MLP blocks.

Found generically rather than per architecture: the decoder layers are the ``nn.ModuleList`` whose length
is the config's layer count and whose items have an attention block; names (``layers``, ``h``) only break
ties. Checked on Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3 (text), GPT-2, GPT-NeoX and Phi-3;
a PEFT-wrapped model resolves to the wrapped model's layers.

What hooks see, with transformers 5.23 (decoder layers were tuple-returning in 4.x):

| architecture                                           | layers            | attention   | mlp   | layer returns |
|--------------------------------------------------------|-------------------|-------------|-------|---------------|
| Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma2/3, Phi-3   | ``model.layers``  | ``self_attn`` | ``mlp`` | Tensor |
| GPT-2                                                  | ``transformer.h`` | ``attn``      | ``mlp`` | Tensor |
| GPT-NeoX                                               | ``gpt_neox.layers`` | ``attention`` | ``mlp`` | Tensor |

``base`` is the parent of ``layers`` (``model.model``, ``model.transformer``, ``model.gpt_neox``).

Every attention module returns a tuple ``(attn_output_BSD, attn_weights)`` (weights are None under sdpa, a
Tensor under eager attention); every MLP returns a Tensor. Gemma 2/3 apply post-attention and post-feedforward
norms *outside* these modules, so their outputs are taken before those norms. GPT-NeoX
(``use_parallel_residual``) feeds attention and MLP the same input.
Code that must also run on older transformers should accept a tuple from a decoder layer and use item 0.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

_ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn")
# Preferred names of the layer list, for the rare model with two lists of the right length.
_LAYER_LIST_NAMES = ("layers", "h", "layer", "blocks")
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
_WIDTH_KEYS = ("hidden_size", "n_embd", "d_model")


@dataclass(frozen=True, eq=False)
class ModelLayout:
    """The decoder layers of a causal LM and the module that runs them."""

    base: nn.Module
    """The module that owns ``layers`` and is called with input_ids/attention_mask/past_key_values
    (``model.model``, ``model.transformer``, ``model.gpt_neox``)."""
    layers: nn.ModuleList
    """The decoder layers, in order."""
    layers_name: str
    """Qualified name of ``layers`` inside the model, e.g. ``"model.layers"``."""
    n_layers: int
    """Number of decoder layers."""
    d_model: int
    """Width of the residual stream."""

    def layer(self, i: int) -> nn.Module:
        """Decoder layer ``i``; negative indices count from the end."""
        if not -self.n_layers <= i < self.n_layers:
            raise IndexError(f"layer {i} out of range: model has {self.n_layers} layers (0..{self.n_layers - 1})")
        module: nn.Module = self.layers[i]
        return module

    def attention(self, i: int) -> nn.Module:
        """The self-attention block of layer ``i``; its output is a tuple whose item 0 is ``attn_out``."""
        return _child(self.layer(i), i, _ATTENTION_NAMES, "attention")

    def mlp(self, i: int) -> nn.Module:
        """The MLP block of layer ``i``; its input is ``mlp_in`` (after the norm), its output ``mlp_out``."""
        return _child(self.layer(i), i, _MLP_NAMES, "MLP")


def get_layout(model: nn.Module) -> ModelLayout:
    """Find the decoder layers of ``model`` (a ``PreTrainedModel``, or any module with a config)."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()  # multimodal models keep the LM's sizes there
    expected = _config_int(config, _LAYER_COUNT_KEYS)
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) > 0
        and (expected is None or len(module) == expected)
        and _has_child(module[0], _ATTENTION_NAMES)
    ]
    if not candidates:
        wanted = f"{expected} items" if expected is not None else "items"
        raise ValueError(
            f"no decoder layers found in {type(model).__name__}: no nn.ModuleList of {wanted} "
            f"with an attention child ({', '.join(_ATTENTION_NAMES)})"
        )
    # Prefer the known names, then the shallowest list, then (with no config) the longest.
    name, layers = min(
        candidates,
        key=lambda c: (c[0].rsplit(".", 1)[-1] not in _LAYER_LIST_NAMES, c[0].count("."), -len(c[1])),
    )
    assert isinstance(layers, nn.ModuleList)
    base_name = name.rpartition(".")[0]
    base = model.get_submodule(base_name) if base_name else model
    return ModelLayout(
        base=base,
        layers=layers,
        layers_name=name,
        n_layers=len(layers),
        d_model=_d_model(model, config),
    )


def _config_int(config: object, keys: tuple[str, ...]) -> int | None:
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def _d_model(model: nn.Module, config: object) -> int:
    width = _config_int(config, _WIDTH_KEYS)
    if width is not None:
        return width
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    if isinstance(embeddings, nn.Embedding):
        return embeddings.embedding_dim
    raise ValueError(f"cannot tell the residual width of {type(model).__name__}: no {'/'.join(_WIDTH_KEYS)}")


def _has_child(module: nn.Module, names: tuple[str, ...]) -> bool:
    return any(isinstance(getattr(module, n, None), nn.Module) for n in names)


def _child(layer: nn.Module, i: int, names: tuple[str, ...], what: str) -> nn.Module:
    for n in names:
        child = getattr(layer, n, None)
        if isinstance(child, nn.Module):
            return child
    children = ", ".join(n for n, _ in layer.named_children())
    raise AttributeError(
        f"no {what} block in layer {i} ({type(layer).__name__}): looked for {', '.join(names)}; "
        f"its children are {children}"
    )
