"""Training-side SAE architectures, one file each over :class:`~sae_train.models.base.TrainSae`.

Importing this package registers every architecture in :data:`TRAIN_ARCHITECTURES`.
"""

from __future__ import annotations

from sae_train.models import batchtopk, gated, jumprelu, matryoshka, relu, topk
from sae_train.models.base import TrainOutput, TrainSae
from sae_train.models.registry import TRAIN_ARCHITECTURES, build_train_sae, get_train_architecture, register

__all__ = [
    "TRAIN_ARCHITECTURES",
    "TrainOutput",
    "TrainSae",
    "batchtopk",
    "build_train_sae",
    "gated",
    "get_train_architecture",
    "jumprelu",
    "matryoshka",
    "register",
    "relu",
    "topk",
]
