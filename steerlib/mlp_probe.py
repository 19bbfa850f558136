"""A one-hidden-layer probe on activations, ``score(x) = w · relu(W x + b1) + b``, stored as a safetensors file.

A linear probe is a steering-vector file read with ``metric: dot``; this is for the cases a linear probe cannot
separate. A ``when: {probe: FILE, ...}`` condition scores the activation entering its site with it; with
``scope: prompt, aggregate: mean`` it scores the prompt's *mean activation* (for a nonlinear probe that is not the
mean of its per-token scores), which is how the probe is fitted (see ``evals.recipes.detector``).

File layout: tensors ``W`` ``(H, D)``, ``b1`` ``(H,)``, ``w`` ``(H,)`` and ``b`` ``()``; string metadata with
``format: steerlib.mlp_probe`` and whatever else the writer records (layer, site, pool, how it was fitted).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from steerlib.vectors import save_atomic

FORMAT = "steerlib.mlp_probe"
TENSORS = ("W", "b1", "w", "b")


@dataclass(frozen=True)
class MlpProbe:
    W_HD: Tensor
    b1_H: Tensor
    w_H: Tensor
    b: Tensor
    """A 0-dim tensor (kept a tensor so scoring stays on the activations' device)."""
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        H, D = self.W_HD.shape if self.W_HD.dim() == 2 else (-1, -1)
        shapes = {"W": (H, D), "b1": (H,), "w": (H,), "b": ()}
        got = {"W": self.W_HD.shape, "b1": self.b1_H.shape, "w": self.w_H.shape, "b": self.b.shape}
        if H < 1 or any(tuple(got[k]) != shapes[k] for k in shapes):
            raise ValueError(
                "an MLP probe needs W (H, D), b1 (H,), w (H,) and a scalar b; got "
                + ", ".join(f"{k} {tuple(v)}" for k, v in got.items())
            )
        # Values are checked on the host, where files are read: a probe moved to a device was checked before it moved
        # (reading a device tensor's values would wait on the device; on ``meta`` there are none).
        host = [(k, t) for k, t in zip(TENSORS, self.tensors(), strict=True) if t.device.type == "cpu"]
        bad = [k for k, t in host if not bool(torch.isfinite(t).all())]
        if bad:
            raise ValueError(f"an MLP probe's tensors must be finite; {', '.join(bad)} are not")

    @property
    def d_model(self) -> int:
        return int(self.W_HD.shape[1])

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.W_HD, self.b1_H, self.w_H, self.b

    def to(self, device: torch.device | str) -> MlpProbe:
        W, b1, w, b = (t.to(device) for t in self.tensors())
        return MlpProbe(W, b1, w, b, self.metadata)

    def scores(self, x_ND: Tensor) -> Tensor:
        """``(N,)`` scores of ``(N, D)`` activations."""
        h_NH = torch.relu(x_ND.float() @ self.W_HD.T + self.b1_H)
        return h_NH @ self.w_H + self.b

    def save(self, path: str | Path) -> Path:
        tensors = {k: t.detach().float().cpu().contiguous() for k, t in zip(TENSORS, self.tensors(), strict=True)}
        return save_atomic(tensors, path, {**self.metadata, "format": FORMAT})


def load_mlp_probe(path: str | Path) -> MlpProbe:
    """Read a file written by :meth:`MlpProbe.save`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"probe file not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
        keys = set(f.keys())
        if metadata.get("format") != FORMAT or keys != set(TENSORS):
            raise ValueError(
                f"{path}: not an MLP probe file (expected format {FORMAT!r} and tensors {list(TENSORS)}, "
                f"found format {metadata.get('format')!r} and tensors {sorted(keys)})"
            )
        W, b1, w, b = (f.get_tensor(k).float() for k in TENSORS)
    return MlpProbe(W, b1, w, b, {k: v for k, v in metadata.items() if k != "format"})
