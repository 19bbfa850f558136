"""Steerable vLLM decoder layers: each site passes through ``torch.ops.steerlib.site``, for any covered family.

One mechanism for every family (``steerlib.vllm.families``): when the model is built, each decoder layer, and the
attention and MLP modules inside it, get a class derived at build time from their own class (``type(module)``) whose
``forward`` calls the original and passes the site's tensor through the op. Only ``__class__`` changes, so parameter
names, weight loading, quantization and vLLM's compilation of the model are the family's own.

Where the sites are, from what the modules take and return (as steerlib's HF hooks read them):

- ``resid_pre``: the layer's input. vLLM's native layers take ``(positions, hidden_states, residual)`` and the
  residual stream is ``hidden_states + residual`` (``residual`` is None at layer 0, where ``hidden_states`` is the
  whole stream); layers that carry one stream (Granite, and transformers' own layers under vLLM's Transformers
  backend) take just ``hidden_states``.
- ``resid_post``: the layer's output, ``(hidden_states, residual)`` summed, or the single stream.
- ``attn_out``: the attention module's output (a tensor, or item 0 of transformers' ``(output, weights)``).
- ``mlp_in`` / ``mlp_out``: the MLP module's input and output.

The op is a registered torch custom op with a fake (shape-only) implementation, so ``torch.compile`` (vLLM's
compiled mode) keeps it in the graph as an opaque call instead of tracing into it: the compiled graph calls back
into Python each step and reads that step's per-token jobs from :mod:`steerlib.vllm.state`. (A forward hook added
after loading would be dropped by compilation; a class swapped in before the first forward is not.) With no
steered request in the step the op is a copy. The op writes into an output buffer allocated just before it, so
that under piecewise CUDA graphs, where the op is a splitting op run eagerly between captured pieces, its result
sits where the next piece was captured to read it (see :mod:`steerlib.vllm.compilation`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor, nn

from steerlib.sites import SITES
from steerlib.vllm import state as steering_state
from steerlib.vllm.families import Family

_SITE_ID = {name: i for i, name in enumerate(SITES)}
_MLP_SITES = ("mlp_in", "mlp_out")


@torch.library.custom_op("steerlib::site", mutates_args=("out",))
def site_op(
    x: Tensor,
    other: Optional[Tensor],  # noqa: UP045 (custom_op reads the annotation)
    out: Tensor,
    layer: int,
    site: int,
) -> None:
    """Write the steered ``x`` at ``(layer, SITES[site])`` for the current step into ``out`` (``x`` unsteered)."""
    st = steering_state.current()
    out.copy_(x if st is None else st.run(layer, SITES[site], x, other))


@site_op.register_fake
def _site_fake(
    x: Tensor,
    other: Optional[Tensor],  # noqa: UP045
    out: Tensor,
    layer: int,
    site: int,
) -> None:
    return None


def _site(x: Tensor, other: Tensor | None, layer: int, site: str) -> Tensor:
    """``x`` (any leading shape, e.g. transformers' ``[1, tokens, d]``) steered at ``(layer, site)``."""
    flat_ND = x.reshape(-1, x.shape[-1])
    other_ND = None if other is None else other.reshape(-1, other.shape[-1])
    out = torch.empty_like(flat_ND)  # allocated inside the compiled piece before the op: a stable address
    torch.ops.steerlib.site(flat_ND, other_ND, out, layer, _SITE_ID[site])
    return out.view(x.shape)


@dataclass(frozen=True)
class _Arg:
    """Where a ``forward`` takes one argument: its position (``self`` not counted) and its name."""

    index: int
    name: str

    def get(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return args[self.index] if len(args) > self.index else kwargs.get(self.name)

    def put(self, args: tuple[Any, ...], kwargs: dict[str, Any], value: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if len(args) > self.index:
            return (*args[: self.index], value, *args[self.index + 1 :]), kwargs
        return args, {**kwargs, self.name: value}


def _arg(forward: Callable[..., Any], names: tuple[str, ...]) -> _Arg | None:
    """The first of ``names`` among ``forward``'s positional parameters (``names == ()``: its first one)."""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    params = [p.name for p in inspect.signature(forward).parameters.values() if p.kind in kinds and p.name != "self"]
    for i, name in enumerate(params):
        if not names or name in names:
            return _Arg(i, name)
    return None


def _first(out: Any) -> Tensor:
    first: Tensor = out if isinstance(out, Tensor) else out[0]
    return first


def _with_first(out: Any, value: Tensor) -> Any:
    return value if isinstance(out, Tensor) else (value, *out[1:])


class _Steerable(nn.Module):
    """What the three mixins share: the module's own forward, wherever it lives."""

    steer_layer: int
    steer_forward: Callable[..., Any] | None = None
    """A forward vLLM bound to this instance before it was made steerable (the Transformers backend's fusers
    rewrite an attention or MLP forward per instance); None: the class's own."""

    def _own_forward(self, *args: Any, **kwargs: Any) -> Any:
        own = self.steer_forward
        return own(*args, **kwargs) if own is not None else super().forward(*args, **kwargs)


class _SteerableLayer(_Steerable):
    """Mixed in before a decoder layer's class: ``resid_pre`` on its input, ``resid_post`` on its output."""

    steer_hidden: ClassVar[_Arg]
    steer_residual: ClassVar[_Arg | None]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        L, hidden, residual = self.steer_layer, self.steer_hidden, self.steer_residual
        res_in = None if residual is None else residual.get(args, kwargs)
        args, kwargs = hidden.put(args, kwargs, _site(hidden.get(args, kwargs), res_in, L, "resid_pre"))
        out = self._own_forward(*args, **kwargs)
        res_out = out[1] if residual is not None and not isinstance(out, Tensor) else None
        return _with_first(out, _site(_first(out), res_out, L, "resid_post"))


class _SteerableAttention(_Steerable):
    """Mixed in before an attention module's class: ``attn_out`` on its output."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self._own_forward(*args, **kwargs)
        return _with_first(out, _site(_first(out), None, self.steer_layer, "attn_out"))


class _SteerableMlp(_Steerable):
    """Mixed in before an MLP's class: ``mlp_in`` on its input, ``mlp_out`` (which may read mlp_in) on its output."""

    steer_hidden: ClassVar[_Arg]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        L, hidden = self.steer_layer, self.steer_hidden
        x = _site(hidden.get(args, kwargs), None, L, "mlp_in")
        args, kwargs = hidden.put(args, kwargs, x)
        out = self._own_forward(*args, **kwargs)
        return _with_first(out, _site(_first(out), x, L, "mlp_out"))


_CLASSES: dict[tuple[type[nn.Module], type[nn.Module]], type[nn.Module]] = {}
"""Steerable classes made so far: one per (mixin, class), so every layer of a model shares one type."""


def steerable_class(mixin: type[nn.Module], base: type[nn.Module]) -> type[nn.Module]:
    """``base`` with ``mixin``'s ``forward`` around its own."""
    if (mixin, base) not in _CLASSES:
        _CLASSES[mixin, base] = _derive(mixin, base)
    return _CLASSES[mixin, base]


def _derive(mixin: type[nn.Module], base: type[nn.Module]) -> type[nn.Module]:
    name = f"Steerable{base.__name__}"
    attrs: dict[str, Any] = {"__module__": __name__, "__qualname__": name, "__doc__": f"{base.__name__}, steerable."}
    if mixin is _SteerableLayer:
        hidden = _arg(base.forward, ("hidden_states", "hidden", "x"))
        if hidden is None:
            raise TypeError(f"cannot steer {base.__name__}: its forward takes no hidden_states")
        attrs |= {"steer_hidden": hidden, "steer_residual": _arg(base.forward, ("residual",))}
    elif mixin is _SteerableMlp:
        first = _arg(base.forward, ())
        if first is None:
            raise TypeError(f"cannot steer {base.__name__}: its forward takes no input")
        attrs["steer_hidden"] = first
    return type(name, (mixin, base), attrs)


def make_steerable(model: nn.Module, family: Family, n_layers: int) -> int:
    """Give every decoder layer of ``model`` (and its attention and MLP, as ``family`` has those sites) its
    steerable class; all or none. Returns the number of layers made steerable (pipeline ranks hold a share)."""
    swaps: list[tuple[nn.Module, type[nn.Module], int]] = []
    for i, layer in enumerate(decoder_layers(model, family, n_layers)):
        if not hasattr(layer, family.attention):  # another pipeline rank's layer (vLLM's PPMissingLayer)
            continue
        swaps.append((layer, _SteerableLayer, i))
        if "attn_out" in family.sites:
            swaps.append((_child(layer, family.attention, family), _SteerableAttention, i))
        if any(s in family.sites for s in _MLP_SITES):
            swaps.append((_child(layer, family.mlp, family), _SteerableMlp, i))
    classes = [steerable_class(mixin, type(module)) for module, mixin, _ in swaps]  # may raise: nothing swapped yet
    for (module, _, i), cls in zip(swaps, classes, strict=True):
        if "forward" in module.__dict__:  # an instance-bound forward would shadow the steerable class's
            module.__dict__["steer_forward"] = module.__dict__.pop("forward")
        module.__class__ = cls
        module.steer_layer = i  # type: ignore[assignment]
    return sum(1 for _, mixin, _ in swaps if mixin is _SteerableLayer)


def decoder_layers(model: nn.Module, family: Family, n_layers: int) -> nn.ModuleList:
    """The ``nn.ModuleList`` of ``n_layers`` decoder layers, found by its length and the family's attention name."""
    for module in model.modules():
        if not isinstance(module, nn.ModuleList) or len(module) != n_layers:
            continue
        if any(hasattr(layer, family.attention) for layer in module):
            return module
    raise ValueError(
        f"no decoder layers found in {type(model).__name__} ({family.name}): no nn.ModuleList of {n_layers} "
        f"layers with a {family.attention!r} child"
    )


def _child(layer: nn.Module, name: str, family: Family) -> nn.Module:
    child = getattr(layer, name, None)
    if not isinstance(child, nn.Module):
        children = ", ".join(n for n, _ in layer.named_children())
        raise ValueError(f"{family.name} layer {type(layer).__name__} has no {name!r} module; it has {children}")
    return child
