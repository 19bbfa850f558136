"""Where a per-layer vector is added, in the one position every interchange format shares: after decoder block L.

llama.cpp control vectors and repeng ``ControlVector``s add ``direction[L]`` to the output of decoder block ``L``
(steerlib's ``resid_post`` of ``L``; see :mod:`steerlib.interchange.gguf_control` for the sources). steerlib vectors
and configs may name ``resid_pre`` instead: ``resid_pre`` of ``L > 0`` is the same tensor as ``resid_post`` of
``L - 1`` (as :mod:`steerlib.hf.targets` installs it), so it converts exactly; other sites do not.
"""

from __future__ import annotations

import json

from torch import Tensor

from steerlib.vectors import SteeringVector

LayerRange = tuple[int, int]


def select_layers(layers: list[int], layer_range: LayerRange | None) -> list[int]:
    """The layers ``--control-vector-layer-range START END`` keeps, sorted.

    As in llama.cpp (``common/arg.cpp``: "start and end inclusive"; ``common/common.cpp``: a start <= 0 becomes 1, an
    end <= 0 becomes the model's layer count): the range is inclusive and a bound <= 0 means "no bound".
    """
    if layer_range is None:
        return sorted(layers)
    start, end = layer_range
    lo = start if start > 0 else 1
    return sorted(layer for layer in layers if layer >= lo and (end <= 0 or layer <= end))


def resid_post_layer(layer: int, site: str, where: str) -> int:
    """The block whose output is the position (``layer``, ``site``)."""
    if site == "resid_post":
        return layer
    if site == "resid_pre" and layer > 0:
        return layer - 1
    if site == "resid_pre":
        raise ValueError(f"{where}: resid_pre of layer 0 (the embeddings) has no control-vector position")
    raise ValueError(
        f"{where}: site {site!r} cannot be a control vector, which is added to the residual stream after a block; "
        "allowed: resid_post, resid_pre (of layer >= 1)"
    )


def resid_post_directions(vector: SteeringVector, where: str) -> dict[int, Tensor]:
    """``{L: (D,)}`` added after block ``L``, from a vector file's tensors and its ``site`` (default resid_post).

    A layer-independent vector needs the layer in its metadata (``layer``, as ``steerlib.extract`` writes it).
    """
    site = vector.metadata.get("site", "resid_post")
    by_layer = {k: v for k, v in vector.by_layer.items() if k is not None}
    if None in vector.by_layer:
        named = vector.metadata.get("layer", "")
        if not named.isdigit():
            raise ValueError(
                f"{where}: a layer-independent vector without a 'layer' in its metadata; convert a config that "
                "names its layers instead"
            )
        by_layer = {int(named): vector.by_layer[None]}
    out: dict[int, Tensor] = {}
    for layer, v in by_layer.items():
        if v.dim() != 1:
            raise ValueError(f"{where}: layer {layer} holds shape {list(v.shape)}; a direction must be 1-D (D,)")
        out[resid_post_layer(layer, site, f"{where} layer {layer}")] = v
    return dict(sorted(out.items()))


def at_resid_post(directions: dict[int, Tensor], metadata: dict[str, str]) -> SteeringVector:
    """A per-layer vector file's content: ``directions`` at ``resid_post``, metadata ``site``/``layers`` set."""
    layers = sorted(directions)
    meta = {**metadata, "site": "resid_post", "layers": json.dumps(layers)}
    meta.pop("layer", None)
    return SteeringVector({layer: directions[layer].detach().float().cpu() for layer in layers}, meta)


def model_hint(metadata: dict[str, str], override: str | None) -> str:
    """The model hint to write: ``override``, else metadata ``model_hint``, else metadata ``model``."""
    for hint in (override, metadata.get("model_hint"), metadata.get("model")):
        if hint:
            return hint
    raise ValueError(
        "no model hint: the vector's metadata has neither 'model_hint' nor 'model'; give one (--model-hint NAME, "
        "the model's architecture as repeng and llama.cpp write it, e.g. 'llama')"
    )
