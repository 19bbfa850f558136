"""Steering vectors on disk: safetensors files with metadata (model, site, method, layer).

A file holds either one tensor named ``vector`` (shape ``(D,)``, or ``(K, D)`` for a set of directions) or one tensor
per layer named ``layers.{L}`` (a multi-layer vector; an intervention picks the tensor of its layer).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor


@dataclass(frozen=True)
class SteeringVector:
    """Directions by layer (``None`` key = layer-independent) and free-form string metadata."""

    by_layer: dict[int | None, Tensor]
    metadata: dict[str, str] = field(default_factory=dict)

    @classmethod
    def single(cls, vector: Tensor, **metadata: object) -> SteeringVector:
        return cls({None: vector.detach().float().cpu()}, {k: str(v) for k, v in metadata.items()})

    @classmethod
    def per_layer(cls, vectors: dict[int, Tensor], **metadata: object) -> SteeringVector:
        return cls(
            {int(k): v.detach().float().cpu() for k, v in vectors.items()},
            {k: str(v) for k, v in metadata.items()},
        )

    def for_layer(self, layer: int, *, where: str = "vector") -> Tensor:
        """The tensor an intervention at ``layer`` uses."""
        if None in self.by_layer:
            return self.by_layer[None]
        if layer not in self.by_layer:
            have = sorted(k for k in self.by_layer if k is not None)
            raise ValueError(f"{where}: the vector file has no entry for layer {layer}; it has layers {have}")
        return self.by_layer[layer]

    def save(self, path: str | Path) -> Path:
        """Write atomically: a crash mid-write never leaves a truncated file under ``path``."""
        tensors = {("vector" if k is None else f"layers.{k}"): v.contiguous() for k, v in self.by_layer.items()}
        return save_atomic(tensors, path, dict(self.metadata))


def save_atomic(tensors: dict[str, Tensor], path: str | Path, metadata: dict[str, str]) -> Path:
    """Write a safetensors file so that a crash mid-write never leaves a truncated file under ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; a tensor file is ordinary data
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_vector(path: str | Path) -> SteeringVector:
    """Read a vector file written by :meth:`SteeringVector.save` (or any safetensors file with those names)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"vector file not found: {path}")
    by_layer: dict[int | None, Tensor] = {}
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
        keys = list(f.keys())
        for key in keys:
            if key == "vector":
                by_layer[None] = f.get_tensor(key).float()
            elif key.startswith("layers.") and key[7:].isdigit():
                by_layer[int(key[7:])] = f.get_tensor(key).float()
    if not by_layer:
        if len(keys) == 1:  # a lone tensor under another name is unambiguous
            with safe_open(str(path), framework="pt") as f:
                by_layer[None] = f.get_tensor(keys[0]).float()
        else:
            raise ValueError(f"{path}: expected a tensor named 'vector' or 'layers.<L>', found {keys}")
    return SteeringVector(by_layer, metadata)


def metadata_json(meta: dict[str, object]) -> dict[str, str]:
    """Metadata values as strings (safetensors stores str -> str); non-strings are JSON-encoded."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


def as_tensor(values: list[float] | Tensor) -> Tensor:
    return (
        values.detach().float().cpu()
        if isinstance(values, Tensor)
        else torch.tensor(values, dtype=torch.float32, device="cpu")
    )
