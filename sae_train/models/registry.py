"""Training architectures by name, filled by :func:`register`; an unknown name lists the valid ones."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from sae_train.config import SaeConfig
from sae_train.models.base import TrainSae
from steerlib.registry import class_register, lookup

T = TypeVar("T", bound=type[TrainSae])

TRAIN_ARCHITECTURES: dict[str, type[TrainSae]] = {}


def register(name: str) -> Callable[[T], T]:
    """Class decorator: make ``cls`` the training architecture called ``name``."""
    return class_register(TRAIN_ARCHITECTURES, "training architecture", "name", name)


def get_train_architecture(name: str) -> type[TrainSae]:
    return lookup(TRAIN_ARCHITECTURES, "training architecture", name)


def build_train_sae(cfg: SaeConfig, d_in: int, d_out: int, model: str | None = None) -> TrainSae:
    """The training SAE ``cfg.architecture`` names, for inputs of width ``d_in`` and targets of width ``d_out``."""
    return get_train_architecture(cfg.architecture)(cfg, d_in, d_out, model)
