"""Where a site lives in an HF model: which module, and whether its input (pre-hook) or output (hook) carries it.

``resid_pre`` of layer L > 0 is the same tensor as ``resid_post`` of layer L-1; both resolve to layer L-1's output
so that ``output_hidden_states`` and recordings show what steering did there. Only layer 0's ``resid_pre`` is the
input of a layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor, nn

from steerlib.hf.layout import ModelLayout


@dataclass(frozen=True)
class Target:
    module: nn.Module
    kind: Literal["input", "output"]
    """input: the module's first argument (forward pre-hook); output: its first output (forward hook)."""


def target(layout: ModelLayout, layer: int, site: str) -> Target:
    if site == "resid_pre" and layer > 0:
        site, layer = "resid_post", layer - 1
    if site == "resid_pre":
        return Target(layout.layers[layer], "input")
    if site == "resid_post":
        return Target(layout.layers[layer], "output")
    if site == "attn_out":
        return Target(layout.attention(layer), "output")
    if site == "mlp_in":
        return Target(layout.mlp(layer), "input")
    if site == "mlp_out":
        return Target(layout.mlp(layer), "output")
    raise ValueError(f"unknown site {site!r}; allowed: resid_pre, resid_post, attn_out, mlp_in, mlp_out")


def first_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    """The hidden state a module was called with (first positional argument, else first keyword)."""
    value = args[0] if args else next(iter(kwargs.values()))
    if not isinstance(value, Tensor):
        raise TypeError(f"expected a hidden-state tensor as the module's first input, got {type(value).__name__}")
    return value


def first_output(output: Any) -> Tensor:
    first: Tensor = output if isinstance(output, Tensor) else output[0]
    return first


def replace_first_input(args: tuple[Any, ...], kwargs: dict[str, Any], new: Tensor) -> tuple[Any, dict[str, Any]]:
    if args:
        return (new, *args[1:]), kwargs
    name = next(iter(kwargs))
    return args, {**kwargs, name: new}


def replace_first_output(output: Any, new: Tensor) -> Any:
    if isinstance(output, Tensor):
        return new
    if isinstance(output, tuple):
        return (new, *output[1:])
    raise TypeError(f"cannot steer a module output of type {type(output).__name__}")
