"""EleutherAI sparsify folders: ``cfg.json`` + ``sae.safetensors``, one folder per hookpoint (e.g. ``layers.6``).

Semantics follow ``sparsify/sparse_coder.py`` (``SparseCoder``) and ``sparsify/fused_encoder.py``:

- tensors ``encoder.weight`` (d_sae, d_in), ``encoder.bias`` (d_sae), ``W_dec`` (d_sae, d_in), ``b_dec`` (d_in),
  optional ``W_skip`` (d_in, d_in) applied as ``x @ W_skip.mT``;
- ``encode`` subtracts ``b_dec`` from the input only when ``cfg.transcode`` is false (since the Feb 2025 "fix
  decoder bias on transcoders" commit; older configs have no ``transcode`` key and always subtracted);
- latents are the top ``k`` of ``relu(encoder(x))``; ``decode`` is ``embedding_bag(W_dec) + b_dec``, plus the
  skip term;
- ``d_sae`` is ``num_latents`` or, when that is 0, ``d_in * expansion_factor``.

Only the ``topk`` activation is supported (not ``groupmax``, nor the 2024 ``signed`` option).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from steerlib.sae.base import Sae, SaeMeta
from steerlib.sae.formats._common import SaeFormat, build_sae, check_dim, dims_of, read_json
from steerlib.sites import tl_name

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"

_HOOKPOINT = re.compile(r"^(?:model\.|gpt_neox\.|transformer\.)?(?:layers|h|blocks)\.(\d+)(\.mlp)?$")


def hookpoint_sites(hookpoint: str, transcode: bool) -> tuple[str | None, str | None]:
    """``(input_site, output_site)`` of a sparsify hookpoint; ``(None, None)`` for names not of a layer or its MLP.

    An SAE on ``layers.L`` reads the layer's output (``resid_post``), one on ``layers.L.mlp`` the MLP's output; a
    transcoder reads the module's input and writes its output.
    """
    m = _HOOKPOINT.match(hookpoint)
    if m is None:
        return None, None
    layer, mlp = int(m.group(1)), m.group(2) is not None
    out = tl_name(layer, "mlp_out" if mlp else "resid_post")
    if not transcode:
        return out, out
    return tl_name(layer, "mlp_in" if mlp else "resid_pre"), out


def _model_name(folder: Path) -> str | None:
    run_cfg = folder.parent / "config.json"  # the trainer's RunConfig, saved beside the hookpoint folders
    if not run_cfg.is_file():
        return None
    model = read_json(run_cfg).get("model")
    return model if isinstance(model, str) else None


def _check_supported(cfg: dict[str, Any], folder: Path) -> None:
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise ValueError(f"{folder}: sparsify activation {activation!r} is not supported; supported: 'topk'")
    if cfg.get("signed"):
        raise ValueError(f"{folder}: signed sparsify SAEs (cfg signed=true) are not supported")
    if "d_in" not in cfg:
        raise ValueError(f"{folder / CFG_FILE}: a sparsify config needs d_in")


def _load(folder: Path, dtype: torch.dtype | None) -> Sae:
    cfg = read_json(folder / CFG_FILE)
    _check_supported(cfg, folder)
    raw = load_file(str(folder / WEIGHTS_FILE))
    renames = {"encoder.weight": "W_enc", "encoder.bias": "b_enc"}
    tensors = {renames.get(name, name): t for name, t in raw.items()}
    for name in ("W_enc", "W_skip"):  # stored as (out, in) for x @ W.mT
        if name in tensors:
            tensors[name] = tensors[name].T.contiguous()
    d_in, d_sae, d_out = dims_of(tensors, folder)
    check_dim(folder, "d_in", cfg["d_in"], d_in)
    check_dim(folder, "d_sae", cfg.get("num_latents") or d_in * int(cfg.get("expansion_factor", 32)), d_sae)
    transcode = bool(cfg.get("transcode", False))
    skip = bool(cfg.get("skip_connection", False))
    if skip != ("W_skip" in tensors):
        stored = "stored" if "W_skip" in tensors else "not stored"
        raise ValueError(f"{folder}: cfg skip_connection={skip} but W_skip is {stored}")
    input_site, output_site = hookpoint_sites(folder.name, transcode)
    meta = SaeMeta(
        architecture="topk",
        d_in=d_in,
        d_sae=d_sae,
        d_out=d_out,
        input_site=input_site,
        output_site=output_site,
        model=_model_name(folder),
        k=int(cfg.get("k", 32)),
        source_format="sparsify",
        transcoder=transcode,
    )
    return build_sae(meta, tensors, subtract_b_dec=not transcode, dtype=dtype, source=folder)


FORMAT = SaeFormat(
    name="sparsify",
    files=f"{CFG_FILE} + {WEIGHTS_FILE} (one folder per hookpoint)",
    detect=lambda folder: (folder / CFG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file(),
    load=_load,
)
