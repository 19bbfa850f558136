"""steering-vectors ``SteeringVector`` objects to and from steerlib vectors (https://github.com/steering-vectors/steering-vectors).

Its ``layer_activations[L]`` is added by a forward hook to the output of module ``L`` of the kind ``layer_type``
(``steering_vectors/steering_vector.py``, ``patch_activations`` / ``_create_additive_hook``), the modules found by
name templates guessed from the model (``layer_matching.py``: ``model.layers.{num}``, ``...{num}.self_attn``,
``...{num}.mlp``). The hook adds to item 0 of a tuple output, so the kinds map to steerlib sites exactly:

====================  ==============================================================
``decoder_block``     ``resid_post`` (the block's output)
``self_attn``         ``attn_out`` (the attention module's output, before the residual add)
``mlp``               ``mlp_out`` (the MLP module's output, before the residual add)
====================  ==============================================================

``input_layernorm`` and ``post_attention_layernorm`` (a norm's output) have no steerlib site and are refused.
Negative layer numbers index from the end, so converting them needs the model's layer count.

steering-vectors is imported only inside :func:`to_steering_vectors`; reading one needs no import.
"""

from __future__ import annotations

import json
from typing import Any

from torch import Tensor

from steerlib.interchange.placement import resid_post_directions
from steerlib.vectors import SteeringVector

FORMAT = "steering_vectors"
SITE_OF_LAYER_TYPE: dict[str, str] = {"decoder_block": "resid_post", "self_attn": "attn_out", "mlp": "mlp_out"}
LAYER_TYPE_OF_SITE: dict[str, str] = {site: kind for kind, site in SITE_OF_LAYER_TYPE.items()}


def from_steering_vectors(steering_vector: Any, *, n_layers: int | None = None) -> SteeringVector:
    """A steering-vectors ``SteeringVector`` as a per-layer steerlib vector (metadata ``site`` from its layer type).

    ``n_layers`` resolves negative layer numbers (``-1`` = the last layer), as steering-vectors does.
    """
    layer_type = str(steering_vector.layer_type)
    if layer_type not in SITE_OF_LAYER_TYPE:
        raise ValueError(f"layer_type {layer_type!r} has no steerlib site; allowed: {', '.join(SITE_OF_LAYER_TYPE)}")
    by_layer: dict[int, Tensor] = {}
    for key, act in steering_vector.layer_activations.items():
        if act.dim() != 1:
            raise ValueError(f"layer_activations[{key}] has shape {list(act.shape)}; expected (D,)")
        by_layer[_layer(int(key), n_layers)] = act.detach().float().cpu().clone()
    if not by_layer:
        raise ValueError("the steering-vectors SteeringVector has no layer_activations")
    meta = {"site": SITE_OF_LAYER_TYPE[layer_type], "layers": json.dumps(sorted(by_layer)), "format": FORMAT}
    return SteeringVector(dict(sorted(by_layer.items())), meta)


def _layer(layer: int, n_layers: int | None) -> int:
    if layer >= 0:
        if n_layers is not None and layer >= n_layers:
            raise ValueError(f"layer {layer} out of range: model has {n_layers} layers (0..{n_layers - 1})")
        return layer
    if n_layers is None:
        raise ValueError(f"layer {layer} is negative (counted from the end); pass n_layers to resolve it")
    if layer < -n_layers:
        raise ValueError(f"layer {layer} out of range: model has {n_layers} layers")
    return n_layers + layer


def to_steering_vectors(vector: SteeringVector) -> Any:
    """A ``steering_vectors.SteeringVector`` adding the same tensors at the same modules (multiplier 1).

    ``resid_pre`` of layer ``L >= 1`` becomes the ``decoder_block`` output of ``L - 1``.
    """
    from steering_vectors import SteeringVector as SvSteeringVector

    site = vector.metadata.get("site", "resid_post")
    if site in ("resid_post", "resid_pre"):
        acts = resid_post_directions(vector, "to_steering_vectors")
        site = "resid_post"
    elif site in LAYER_TYPE_OF_SITE:
        if None in vector.by_layer:
            raise ValueError("a layer-independent vector: steering-vectors needs one tensor per layer")
        acts = {int(k): v for k, v in vector.by_layer.items() if k is not None}
    else:
        allowed = ", ".join([*LAYER_TYPE_OF_SITE, "resid_pre"])
        raise ValueError(f"site {site!r} has no steering-vectors layer type; allowed: {allowed}")
    layer_activations = {k: v.detach().float().cpu().clone() for k, v in acts.items()}
    return SvSteeringVector(layer_activations=layer_activations, layer_type=LAYER_TYPE_OF_SITE[site])
