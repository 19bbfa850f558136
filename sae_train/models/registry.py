"""Training architectures by name, filled by :func:`register`; an unknown name lists the valid ones."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from sae_train.config import SaeConfig
from sae_train.models.base import TrainSae

T = TypeVar("T", bound=type[TrainSae])

TRAIN_ARCHITECTURES: dict[str, type[TrainSae]] = {}


def register(name: str) -> Callable[[T], T]:
    def add(cls: T) -> T:
        if name in TRAIN_ARCHITECTURES:
            raise ValueError(f"training architecture {name!r} is already registered")
        cls.name = name
        TRAIN_ARCHITECTURES[name] = cls
        return cls

    return add


def get_train_architecture(name: str) -> type[TrainSae]:
    try:
        return TRAIN_ARCHITECTURES[name]
    except KeyError:
        valid = ", ".join(sorted(TRAIN_ARCHITECTURES))
        raise ValueError(f"unknown training architecture {name!r}; valid: {valid}") from None


def build_train_sae(cfg: SaeConfig, d_in: int, d_out: int, model: str | None = None) -> TrainSae:
    """The training SAE ``cfg.architecture`` names, for inputs of width ``d_in`` and targets of width ``d_out``."""
    return get_train_architecture(cfg.architecture)(cfg, d_in, d_out, model)
