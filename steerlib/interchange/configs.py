"""Per-layer vectors to steering configs and back: one ``add`` op per layer, or a config's additions as directions.

A per-layer vector (a :class:`~steerlib.vectors.SteeringVector` with ``layers.{L}`` tensors and a ``site`` in its
metadata) becomes a config of ``add`` ops, one per layer, each naming the same vector file; the op of layer ``L``
uses the file's tensor of ``L``. The other way, only what a control vector can express converts: plain additions
(no ``relative``, no ``norm_match``, every token) at ``resid_post`` or ``resid_pre``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from torch import Tensor

from steerlib.config import AddOp, ApplyPolicy, SteeringConfig
from steerlib.interchange.placement import LayerRange, at_resid_post, resid_post_layer, select_layers
from steerlib.vectors import SteeringVector, as_tensor, load_vector

VECTORS_DIR = "vectors"


def vector_to_config(
    vector: SteeringVector,
    vector_ref: str,
    *,
    scale: float = 1.0,
    layer_range: LayerRange | None = None,
    base_dir: Path | None = None,
) -> SteeringConfig:
    """``add`` ops (coefficient ``scale``) of the vector's layers inside ``layer_range``, naming ``vector_ref``."""
    layers = select_layers([k for k in vector.by_layer if k is not None], layer_range)
    if not layers:
        have = sorted(k for k in vector.by_layer if k is not None)
        raise ValueError(f"layer range {list(layer_range or ())} keeps none of the vector's layers {have}")
    site = vector.metadata.get("site", "resid_post")
    ops: list[dict[str, Any]] = [
        {"op": "add", "layer": layer, "site": site, "vector": vector_ref, "coefficient": scale} for layer in layers
    ]
    return SteeringConfig.from_dict({"interventions": ops}, base_dir=base_dir)


def write_config(
    vector: SteeringVector, out: str | Path, *, scale: float = 1.0, layer_range: LayerRange | None = None
) -> SteeringConfig:
    """Write ``out`` (YAML, or JSON for ``.json``) and its vector file ``vectors/<stem>.safetensors`` beside it."""
    out = Path(out)
    ref = f"{VECTORS_DIR}/{out.stem}.safetensors"
    cfg = vector_to_config(vector, ref, scale=scale, layer_range=layer_range, base_dir=out.resolve().parent)
    vector.save(out.parent / ref)
    fields = ("op", "layer", "site", "vector", "coefficient")
    data = {"interventions": [{f: getattr(op, f) for f in fields} for op in cfg.interventions]}
    if out.suffix == ".json":
        out.write_text(json.dumps(data, indent=2) + "\n")
    else:
        header = "".join(f"# {k}: {v}\n" for k, v in sorted(vector.metadata.items()) if k in ("model_hint", "model"))
        out.write_text(header + yaml.safe_dump(data, sort_keys=False))
    return cfg


def config_to_vector(cfg: SteeringConfig) -> SteeringVector:
    """The config's additions as ``{L: coefficient * vector}`` added after block ``L`` (summed where ops share one).

    Metadata: the entries every referenced vector file agrees on (``model``, ``method``, ``model_hint``, ...).
    """
    directions: dict[int, Tensor] = {}
    files: dict[Path, SteeringVector] = {}
    for i, op in enumerate(cfg.interventions):
        where = f"interventions[{i}]"
        add = _plain_add(op, where)
        for layer in _layers(add, where):
            v = add.coefficient * _vector(cfg, add, layer, files, where)
            post = resid_post_layer(layer, add.site, where)
            directions[post] = directions[post] + v if post in directions else v
    if not directions:
        raise ValueError("the config has no interventions to convert")
    widths = {int(v.numel()) for v in directions.values()}
    if len(widths) != 1:
        raise ValueError(f"the config's vectors have different widths {sorted(widths)}")
    return at_resid_post(directions, _shared_metadata([f.metadata for f in files.values()]))


def _plain_add(op: object, where: str) -> AddOp:
    if not isinstance(op, AddOp):
        raise ValueError(f"{where}: op {getattr(op, 'op', '?')!r} has no control-vector form; allowed: add")
    for name in ("relative", "norm_match"):
        if getattr(op, name):
            raise ValueError(f"{where}.{name}: a control vector is a plain addition; set {name}: false")
    if op.apply != ApplyPolicy():
        raise ValueError(f"{where}.apply: a control vector is added at every token; remove the token selection")
    return op


def _layers(op: AddOp, where: str) -> list[int]:
    if op.layer == "all":
        raise ValueError(f"{where}.layer: 'all' needs the model's layer count; list the layers instead")
    return [op.layer] if isinstance(op.layer, int) else list(op.layer)


def _vector(cfg: SteeringConfig, op: AddOp, layer: int, files: dict[Path, SteeringVector], where: str) -> Tensor:
    if isinstance(op.vector, list):
        v = as_tensor(op.vector)
    else:
        path = cfg.resolve(op.vector)
        if path not in files:
            files[path] = load_vector(path)
        v = files[path].for_layer(layer, where=f"{where}.vector")
    if v.dim() != 1:
        raise ValueError(f"{where}.vector: shape {list(v.shape)} at layer {layer}; a direction must be 1-D (D,)")
    return v


def _shared_metadata(metas: list[dict[str, str]]) -> dict[str, str]:
    if not metas:
        return {}
    first = metas[0]
    return {k: v for k, v in first.items() if all(m.get(k) == v for m in metas[1:])}
