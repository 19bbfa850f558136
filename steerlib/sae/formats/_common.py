"""What every SAE file format shares: the format record, weight validation and site-name helpers.

Each loader turns its files into steerlib's canonical tensors (``W_enc`` (d_in, d_sae), ``b_enc``, ``W_dec``
(d_sae, d_out), ``b_dec``, ``W_skip`` (d_in, d_out), ``threshold``, ``b_gate``, ``r_mag``, ``b_mag``) plus a
:class:`SaeMeta`, and :func:`build_sae` checks names and shapes before anything is loaded.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from steerlib.sae.architectures import get_architecture
from steerlib.sae.base import Sae, SaeMeta
from steerlib.sites import tl_name


@dataclass(frozen=True)
class SaeFormat:
    """One on-disk format: how to recognise a folder of it and how to load it."""

    name: str
    files: str
    """The files that identify the format, for error messages."""
    detect: Callable[[Path], bool]
    """True when a folder holds this format."""
    load: Callable[[Path, torch.dtype | None], Sae]
    """Load from a folder (or, for single-file formats, the file); dtype None keeps the stored dtype."""


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; anything else is a ValueError naming the file."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def check_dim(source: Path, name: str, declared: object, actual: int) -> None:
    """A dimension a config declares must match the weights."""
    if declared is not None and declared != actual:
        raise ValueError(f"{source}: config says {name}={declared} but the weights have {name}={actual}")


def build_sae(
    meta: SaeMeta, tensors: Mapping[str, Tensor], *, subtract_b_dec: bool, dtype: torch.dtype | None, source: Path
) -> Sae:
    """An SAE of ``meta.architecture`` holding exactly ``tensors`` (canonical names), cast to ``dtype``.

    Missing or unexpected tensor names and wrong shapes are errors naming the tensor: a loader that silently
    dropped or zero-filled a weight would run a different SAE than the one on disk.
    """
    cls = get_architecture(meta.architecture)
    stored = tensors["W_dec"].dtype if "W_dec" in tensors else torch.float32
    target = dtype if dtype is not None else stored
    if not target.is_floating_point:
        raise ValueError(f"{source}: SAE weights must be floating point, got {target}")
    sae = cls.for_tensors(meta, tensors.keys(), subtract_b_dec=subtract_b_dec, dtype=target)
    expected = sae.state_dict()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{source}: tensors do not match a {meta.architecture} SAE: missing {missing}, unexpected {unexpected}"
        )
    for name, want in expected.items():
        if tuple(tensors[name].shape) != tuple(want.shape):
            raise ValueError(
                f"{source}: tensor {name} has shape {tuple(tensors[name].shape)}, expected {tuple(want.shape)} "
                f"(d_in={meta.d_in}, d_sae={meta.d_sae}, d_out={meta.d_out})"
            )
    sae.load_state_dict({name: t.to(target) for name, t in tensors.items()}, strict=True)
    return sae


_BLOCK_SITE = re.compile(r"^blocks\.(\d+)\.(.+)$")
_MLP_IN_ALIASES = ("ln2.hook_normalized", "mlp.hook_in", "hook_mlp_in")


def tl_site(hook_name: object) -> str | None:
    """A TransformerLens hook name as a steerlib site: the MLP-input aliases become ``blocks.L.hook_mlp_in``."""
    if not isinstance(hook_name, str) or not hook_name:
        return None
    m = _BLOCK_SITE.match(hook_name)
    if m and m.group(2) in _MLP_IN_ALIASES:
        return tl_name(int(m.group(1)), "mlp_in")
    return hook_name


def dims_of(tensors: Mapping[str, Tensor], source: Path) -> tuple[int, int, int]:
    """``(d_in, d_sae, d_out)`` read from canonical ``W_enc`` and ``W_dec``."""
    for name in ("W_enc", "W_dec"):
        if name not in tensors or tensors[name].dim() != 2:
            raise ValueError(f"{source}: needs a 2-D tensor {name}; found {sorted(tensors)}")
    (d_in, d_sae), (d_sae_dec, d_out) = tensors["W_enc"].shape, tensors["W_dec"].shape
    if d_sae != d_sae_dec:
        raise ValueError(f"{source}: W_enc has {d_sae} latents but W_dec has {d_sae_dec}")
    return int(d_in), int(d_sae), int(d_out)
