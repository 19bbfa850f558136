"""Gemma Scope SAEs (Lieberum et al., arXiv 2408.05147): one ``params.npz`` per SAE.

The archive holds ``W_enc`` (d_model, d_sae), ``W_dec`` (d_sae, d_model), ``b_enc``, ``b_dec`` and ``threshold``
(d_sae,); SAELens' Gemma loader also accepts ``w_``-prefixed names. The SAE is JumpReLU and its input is used as is:
``pre = x @ W_enc + b_enc``, ``z = relu(pre) * (pre > threshold)``, ``x_hat = z @ W_dec + b_dec`` (the Gemma Scope
tutorial's ``JumpReLUSAE``; SAELens ``get_gemma_2_config_from_hf`` sets ``apply_b_dec_to_input: False``).

The release's folder names carry the site: ``gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71/params.npz``.
They are read when present; embedding SAEs, whose SAELens loader rescales the weights, get no site.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from steerlib.sae.base import Sae, SaeMeta
from steerlib.sae.formats._common import SaeFormat, build_sae, dims_of
from steerlib.sites import tl_name

PARAMS_FILE = "params.npz"

_RELEASE = re.compile(r"gemma-scope-(\d+b)-(pt|it)-(res|mlp|att)\b")
_LAYER = re.compile(r"^layer_(\d+)$")
_SITES = {"res": "resid_post", "mlp": "mlp_out"}


def _sites_and_model(file: Path) -> tuple[str | None, str | None]:
    """``(site, model)`` from a path like ``.../gemma-scope-2b-pt-res/layer_20/...``; None for what is not there."""
    release = _RELEASE.search(file.as_posix())
    model = None
    if release is not None:
        model = f"google/gemma-2-{release.group(1)}" + ("-it" if release.group(2) == "it" else "")
    layers = [int(m.group(1)) for part in file.parts if (m := _LAYER.match(part))]
    if release is None or len(layers) != 1 or "embedding" in file.as_posix():
        return None, model
    layer, kind = layers[0], release.group(3)
    site = f"blocks.{layer}.attn.hook_z" if kind == "att" else tl_name(layer, _SITES[kind])
    return site, model


def _load(path: Path, dtype: torch.dtype | None) -> Sae:
    file = path if path.is_file() else path / PARAMS_FILE
    with np.load(file, allow_pickle=False) as data:
        tensors = {
            ("W_" + key[2:] if key.startswith("w_") else key): torch.from_numpy(np.array(data[key]))
            for key in data.files
        }
    d_in, d_sae, d_out = dims_of(tensors, file)
    site, model = _sites_and_model(file.absolute())  # not resolve(): HF caches symlink to blobs
    meta = SaeMeta(
        architecture="jumprelu",
        d_in=d_in,
        d_sae=d_sae,
        d_out=d_out,
        input_site=site,
        output_site=site,
        model=model,
        source_format="gemma_scope",
    )
    return build_sae(meta, tensors, subtract_b_dec=False, dtype=dtype, source=file)


FORMAT = SaeFormat(
    name="gemma_scope",
    files=PARAMS_FILE,
    detect=lambda folder: (folder / PARAMS_FILE).is_file(),
    load=_load,
)
