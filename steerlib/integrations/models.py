"""What both eval integrations share: a model loaded once per process, and steering given as a file, dict or config.

An Inspect eval may ask for the same model under several steering configs (one ``get_model`` per config, e.g. a
solver that compares configs per sample); the weights are loaded once and shared. Steering hooks live on the model
object, so every forward under steering holds the model's lock: two configs never steer one forward together.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from steerlib.config import SteeringConfig

EMBEDDED_ALIASES = frozenset({"SmolLM2-135M-Instruct", "embedded"})
"""Model names that mean the embedded SmolLM2-135M-Instruct (unless a folder of that name exists)."""

SteeringArg = SteeringConfig | dict[str, Any] | str | Path | None
"""A steering config as a tool hands it over: a YAML/JSON file path, a dict (a config's fields), a config, or None."""


@dataclass(frozen=True)
class SharedModel:
    """A loaded model and tokenizer, with the lock that every forward through it holds."""

    model: Any
    tokenizer: Any
    name: str
    lock: threading.Lock = field(default_factory=threading.Lock, compare=False)


def model_name_arg(name: str | None) -> str | None:
    """The :func:`steerlib.load_model` name for a tool's model name: None (the embedded model) for its aliases."""
    if name is None or (name in EMBEDDED_ALIASES and not Path(name).exists()):
        return None
    return name


def shared_model(name: str | None, device: str = "auto", dtype: str = "auto") -> SharedModel:
    """The model ``name`` (a folder, ``.gguf`` file, hub id, or an embedded alias) on ``device`` in ``dtype``, loaded
    on first use and shared by every later call with the same arguments."""
    return _load(model_name_arg(name), str(device), str(dtype))


@lru_cache(maxsize=4)
def _load(name: str | None, device: str, dtype: str) -> SharedModel:
    from steerlib.hf.loading import load_model

    model, tokenizer = load_model(name, device=device, dtype=dtype)
    return SharedModel(model, tokenizer, name or "SmolLM2-135M-Instruct")


def steering_config(value: SteeringArg, *, base_dir: str | Path | None = None) -> SteeringConfig | None:
    """A steering config from a file path, a dict of its fields (file references resolve against ``base_dir``,
    default the working folder), a config, or None (unsteered). An empty string means None too (``-M steering=``)."""
    if value is None or isinstance(value, SteeringConfig):
        return value
    if isinstance(value, dict):
        return SteeringConfig.from_dict(value, base_dir=Path(base_dir) if base_dir is not None else Path.cwd())
    if isinstance(value, str | Path):
        if str(value) == "":
            return None
        path = Path(value).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"steering: no config file {str(value)!r} (give a .yaml/.json steering config)")
        return SteeringConfig.from_file(path)
    raise TypeError(f"steering: expected a config file path, a dict or a SteeringConfig, got {type(value).__name__}")


def check_steering(shared: SharedModel, config: SteeringConfig | None) -> None:
    """Raise now (a :class:`~steerlib.SteeringConfigError`) if ``config`` does not fit the model, so a bad config
    fails when the tool builds its model, not on every sample."""
    if config is None:
        return
    from steerlib.hf.layout import get_layout
    from steerlib.plan import build_plan, spec_of

    layout = get_layout(shared.model)
    build_plan(config, spec_of(shared.model, layout.n_layers, layout.d_model), shared.tokenizer)
