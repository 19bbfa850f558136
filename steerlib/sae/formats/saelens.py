"""SAELens folders: ``cfg.json`` + ``sae_weights.safetensors`` (jbloomAus/SAELens, ``SAE.save_model``).

Semantics follow SAELens' own classes (``sae_lens/saes/*.py`` for 6.x, ``sae_lens/sae.py`` for 5.x):

- every architecture encodes ``x - b_dec * apply_b_dec_to_input`` (default True), except transcoders, whose
  ``process_sae_in`` never subtracts ``b_dec``;
- ``standard``: ``relu(pre)``; 5.x configs with ``activation_fn_str: topk`` and ``activation_fn_kwargs.k`` are TopK;
- ``topk``: ``relu(topk(pre))`` - the same dense latents as top-k of ``relu(pre)``; with
  ``rescale_acts_by_decoder_norm`` the decoder norms are folded in (``_fold_norm_topk``), which gives the same
  latents and reconstruction;
- ``jumprelu``: ``relu(pre) * (pre > threshold)``; a training checkpoint's ``log_threshold`` is exponentiated;
- ``gated``: gate ``sae_in @ W_enc + b_gate > 0``, magnitude ``relu(sae_in @ (W_enc * exp(r_mag)) + b_mag)``;
- ``transcoder`` / ``skip_transcoder`` / ``jumprelu_transcoder``: W_dec is (d_sae, d_out); ``W_skip`` is stored
  (d_out, d_in) and applied as ``x @ W_skip.T``;
- a 5.x ``scaling_factor`` (``finetuning_scaling_factor``) multiplies latents before decoding; it is folded into W_dec.

Only ``normalize_activations: none`` is supported: the other modes either rescale each token at run time or need a
norm factor that is not stored in the folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from steerlib.sae.base import Sae, SaeMeta
from steerlib.sae.formats._common import SaeFormat, build_sae, check_dim, dims_of, read_json, tl_site

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"

# SAELens architecture -> (steerlib architecture, is a transcoder)
_ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "standard": ("relu", False),
    "topk": ("topk", False),
    "jumprelu": ("jumprelu", False),
    "gated": ("gated", False),
    "transcoder": ("relu", True),
    "skip_transcoder": ("relu", True),
    "jumprelu_transcoder": ("jumprelu", True),
}


def _normalize_mode(cfg: dict[str, Any]) -> str:
    value = cfg.get("normalize_activations")
    if value is None or value is False:  # 5.x wrote booleans or null
        return "none"
    if value is True:
        return "expected_average_only_in"
    return str(value)


def _architecture(cfg: dict[str, Any], source: Path) -> tuple[str, bool, int | None]:
    """``(steerlib architecture, transcoder, k)`` from a 5.x or 6.x config."""
    name = cfg.get("architecture", "standard")
    if name not in _ARCHITECTURES:
        raise ValueError(
            f"{source}: SAELens architecture {name!r} is not supported; supported: {', '.join(_ARCHITECTURES)}"
        )
    arch, transcoder = _ARCHITECTURES[name]
    activation = cfg.get("activation_fn_str", cfg.get("activation_fn", "relu"))
    kwargs = cfg.get("activation_fn_kwargs") or {}
    k = cfg.get("k", kwargs.get("k"))
    if activation == "topk" and name == "standard":
        arch = "topk"  # 5.x spelled TopK as a standard SAE with a topk activation
    elif activation == "topk" and name != "topk":
        raise ValueError(f"{source}: SAELens architecture {name!r} with activation_fn 'topk' is not supported")
    elif activation not in ("relu", "topk"):
        raise ValueError(f"{source}: SAELens activation_fn {activation!r} is not supported; supported: relu, topk")
    if arch == "topk" and not isinstance(k, int):
        raise ValueError(f"{source}: a SAELens topk SAE needs an integer k, got {k!r}")
    return arch, transcoder, (k if arch == "topk" else None)


def _canonical(cfg: dict[str, Any], raw: dict[str, Tensor], arch: str, source: Path) -> dict[str, Tensor]:
    tensors = dict(raw)
    if "log_threshold" in tensors and "threshold" not in tensors:
        tensors["threshold"] = tensors.pop("log_threshold").exp()
    if "W_skip" in tensors:
        tensors["W_skip"] = tensors["W_skip"].T.contiguous()
    if "scaling_factor" in tensors:
        scale_F = tensors.pop("scaling_factor")
        if not torch.allclose(scale_F, torch.ones_like(scale_F)):
            if not cfg.get("finetuning_scaling_factor"):
                raise ValueError(f"{source}: scaling_factor is stored but finetuning_scaling_factor is false")
            tensors["W_dec"] = tensors["W_dec"] * scale_F[:, None]
    if arch == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
        norm_F = tensors["W_dec"].norm(dim=-1)
        tensors["W_enc"] = tensors["W_enc"] * norm_F
        tensors["b_enc"] = tensors["b_enc"] * norm_F
        tensors["W_dec"] = tensors["W_dec"] / norm_F[:, None]
    return tensors


def _load(folder: Path, dtype: torch.dtype | None) -> Sae:
    cfg = read_json(folder / CFG_FILE)
    md: dict[str, Any] = cfg.get("metadata") or {}

    def field(key: str) -> Any:  # 6.x moved run details under "metadata"
        return md.get(key, cfg.get(key))

    mode = _normalize_mode(cfg)
    if mode != "none":
        raise ValueError(f"{folder}: SAELens normalize_activations={mode!r} is not supported; supported: 'none'")
    if field("hook_head_index") is not None:
        raise ValueError(f"{folder}: SAEs on a single attention head (hook_head_index) are not supported")
    arch, transcoder, k = _architecture(cfg, folder)
    tensors = _canonical(cfg, load_file(str(folder / WEIGHTS_FILE)), arch, folder)
    d_in, d_sae, d_out = dims_of(tensors, folder)
    check_dim(folder, "d_in", cfg.get("d_in"), d_in)
    check_dim(folder, "d_sae", cfg.get("d_sae"), d_sae)
    check_dim(folder, "d_out", cfg.get("d_out", d_in if not transcoder else None), d_out)
    site = tl_site(field("hook_name") or field("hook_point"))
    meta = SaeMeta(
        architecture=arch,
        d_in=d_in,
        d_sae=d_sae,
        d_out=d_out,
        input_site=site,
        output_site=tl_site(field("hook_name_out")) if transcoder else site,
        model=field("model_name"),
        k=k,
        source_format="saelens",
        transcoder=transcoder,
    )
    subtract = bool(cfg.get("apply_b_dec_to_input", True)) and not transcoder
    return build_sae(meta, tensors, subtract_b_dec=subtract, dtype=dtype, source=folder)


FORMAT = SaeFormat(
    name="saelens",
    files=f"{CFG_FILE} + {WEIGHTS_FILE}",
    detect=lambda folder: (folder / CFG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file(),
    load=_load,
)
