"""repeng ``ControlVector`` objects to and from steerlib vectors (repeng: Vogel 2024, https://github.com/vgel/repeng).

A ``ControlVector`` is ``model_type: str`` and ``directions: dict[int, np.ndarray]``. Its key ``L`` is a decoder block
index: ``ControlModel`` wraps ``model.model.layers[L]`` and adds the direction to that block's output
(``repeng/control.py``, ``ControlModule.forward``), measured on ``hidden_states[L + 1]`` (``repeng/extract.py``,
``batched_get_hiddens``: ``hidden_idx = layer + 1``). So key ``L`` is steerlib's ``resid_post`` of layer ``L``, the
same number as the ``direction.L`` tensor of its GGUF export. repeng also skips left-padding tokens; steerlib's ``add``
steers every token of the row.

repeng is imported only inside :func:`to_repeng` / :func:`import_repeng`; reading one needs no import at all.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import Tensor

from steerlib.interchange.placement import at_resid_post, model_hint, resid_post_directions
from steerlib.vectors import SteeringVector

FORMAT = "repeng"


def import_repeng() -> ModuleType:
    """``import repeng``, under NumPy 2 too.

    repeng 0.4.0 annotates ``ControlVector.__mul__`` with ``np.float_``, which NumPy 2.0 removed, and the annotation is
    evaluated when the class is created; the alias exists only while repeng's modules run their bodies.
    """
    if "repeng" in sys.modules:
        return sys.modules["repeng"]
    added = "float_" not in np.__dict__
    if added:
        np.float_ = np.float64  # type: ignore[attr-defined]
    try:
        import repeng
    finally:
        if added:
            del np.float_  # type: ignore[attr-defined]
    return repeng


def from_repeng(control_vector: Any) -> SteeringVector:
    """A repeng ``ControlVector`` (or anything with ``model_type`` and ``directions``) as a per-layer vector."""
    directions: dict[int, Tensor] = {}
    for key, value in control_vector.directions.items():
        layer = int(key)
        if layer < 0:
            raise ValueError(f"repeng direction key {key} is negative; give the decoder block index (0-based)")
        array = np.asarray(value, dtype=np.float32)
        if array.ndim != 1:
            raise ValueError(f"repeng direction {key} has shape {list(array.shape)}; expected (D,)")
        directions[layer] = torch.from_numpy(array.copy())
    if not directions:
        raise ValueError("the repeng ControlVector has no directions")
    return at_resid_post(directions, {"model_hint": str(control_vector.model_type), "format": FORMAT})


def to_repeng(vector: SteeringVector, *, model_type: str | None = None) -> Any:
    """A ``repeng.ControlVector`` adding the same directions after the same blocks.

    ``model_type`` defaults to the metadata's ``model_hint`` (then ``model``).
    """
    repeng = import_repeng()
    directions = resid_post_directions(vector, "to_repeng")
    hint = model_hint(vector.metadata, model_type)
    return repeng.ControlVector(
        model_type=hint, directions={layer: v.detach().cpu().float().numpy().copy() for layer, v in directions.items()}
    )
