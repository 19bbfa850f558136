"""Sparse autoencoders and transcoders: one class per architecture, loaders for the common file formats.

sae = load_sae("path/to/sae")        # steerlib, SAELens, sparsify, Gemma Scope or dictionary_learning
z = sae.encode(x)                    # (..., d_sae)
x_hat = sae.decode(z, x)             # (..., d_out)
save_sae(sae, "out/sae")             # steerlib's own format, written atomically
"""

from __future__ import annotations

from steerlib.sae.architectures import (
    ARCHITECTURES,
    BatchTopKSae,
    GatedSae,
    JumpReluSae,
    ReluSae,
    TopKSae,
    get_architecture,
    register,
)
from steerlib.sae.base import Sae, SaeMeta, SparseLatents
from steerlib.sae.formats.native import save_sae
from steerlib.sae.loading import load_sae

__all__ = [
    "ARCHITECTURES",
    "BatchTopKSae",
    "GatedSae",
    "JumpReluSae",
    "ReluSae",
    "Sae",
    "SaeMeta",
    "SparseLatents",
    "TopKSae",
    "get_architecture",
    "load_sae",
    "register",
    "save_sae",
]
