"""Load an SAE from any supported format, chosen by the files a folder holds.

``load_sae`` never runs code from the files it reads: safetensors and ``.npz`` archives (without pickle) hold arrays
only, and dictionary_learning's ``ae.pt`` is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch

from steerlib.sae.base import Sae
from steerlib.sae.formats import FORMATS, SaeFormat, gemma_scope

logger = logging.getLogger(__name__)


def _natural_key(name: str) -> list[int | str]:
    """``layers.2`` sorts before ``layers.10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _supported() -> str:
    return "; ".join(f"{fmt.name} ({fmt.files})" for fmt in FORMATS)


def detect_format(folder: Path) -> SaeFormat | None:
    """The first format whose files ``folder`` holds, or None."""
    return next((fmt for fmt in FORMATS if fmt.detect(folder)), None)


def _unrecognised(folder: Path) -> ValueError:
    children = sorted(
        (child.name for child in folder.iterdir() if child.is_dir() and detect_format(child) is not None),
        key=_natural_key,
    )
    if children:
        return ValueError(
            f"{folder} holds no SAE itself but {len(children)} subfolder(s) do, one per hookpoint: "
            f"{', '.join(children)}; pass one of them, e.g. {folder / children[0]}"
        )
    seen = sorted(child.name + ("/" if child.is_dir() else "") for child in folder.iterdir())
    return ValueError(f"unrecognised SAE folder {folder}: files seen: {seen}; supported formats: {_supported()}")


def load_sae(
    path: str | os.PathLike[str],
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> Sae:
    """Load the SAE at ``path``: a folder in any supported format, or a file inside one (or a Gemma Scope ``.npz``).

    ``dtype`` None keeps the stored dtype; ``device`` None leaves the weights on the CPU. The SAE keeps where it was
    trained (``sae.meta``), which steering ops use as their default layer and site:

    >>> import tempfile, torch
    >>> from steerlib.sae import SaeMeta, get_architecture, load_sae, save_sae
    >>> meta = SaeMeta("topk", d_in=64, d_sae=256, d_out=64, k=8, input_site="blocks.0.hook_resid_post")
    >>> sae = get_architecture("topk")(meta)
    >>> _ = torch.nn.init.normal_(sae.W_enc, generator=torch.Generator().manual_seed(0))
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     loaded = load_sae(save_sae(sae, f"{tmp}/sae"), dtype=torch.bfloat16)
    >>> loaded.architecture, loaded.d_sae, loaded.meta.k, loaded.meta.input_site, loaded.W_enc.dtype
    ('topk', 256, 8, 'blocks.0.hook_resid_post', torch.bfloat16)
    >>> torch.equal(loaded.W_enc, sae.W_enc.to(torch.bfloat16))
    True
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"SAE path {path} does not exist")
    if path.is_file() and path.suffix == ".npz":
        fmt, where = gemma_scope.FORMAT, path
    else:
        where = path.parent if path.is_file() else path
        found = detect_format(where)
        if found is None:
            raise _unrecognised(where)
        fmt = found
    sae = fmt.load(where, dtype)
    logger.info("loaded %s SAE from %s (%s format, %d latents)", sae.architecture, where, fmt.name, sae.d_sae)
    return sae if device is None else sae.to(device)
