"""saprmarks/dictionary_learning folders: ``ae.pt`` (a state dict) + ``config.json`` (``trainer.dict_class``, ...).

``ae.pt`` is read with ``torch.load(weights_only=True)``, which unpickles tensors and containers only and refuses
anything that would run code. Parameter names and maths follow ``dictionary_learning/dictionary.py`` and
``trainers/{top_k,batch_top_k,matryoshka_batch_top_k}.py``; ``nn.Linear`` weights are stored (out, in):

- ``AutoEncoder``: ``relu(encoder(x - bias))``, ``decoder(z) + bias``. Like ``AutoEncoder.from_pretrained`` (which
  ``utils.load_dictionary`` calls with its default ``normalize_decoder=True``), decoder columns that are not unit
  norm are normalised and the norms moved into the encoder weight and bias: same reconstruction, rescaled latents;
- ``AutoEncoderNew``: ``relu(encoder(x))`` and ``decoder(z)``, both with biases, no input centring;
- ``AutoEncoderTopK``: top ``k`` of ``relu(encoder(x - b_dec))`` (``encode`` ignores ``threshold`` by default);
  ``k`` comes from ``config.json`` and must agree with the ``k`` buffer, as ``from_pretrained`` checks;
- ``BatchTopKSAE`` / ``MatryoshkaBatchTopKSAE``: ``encode(use_threshold=True)`` is
  ``relu(pre) * (relu(pre) > threshold)``. A negative ``threshold`` is the "never estimated" initial -1, with which
  dictionary_learning would return the dense ReLU; steerlib falls back to per-token top-k instead;
- ``JumpReluAutoEncoder``: ``relu(pre * (pre > threshold))`` on ``x @ W_enc + b_enc`` (``apply_b_dec_to_input`` is
  False and is not saved);
- ``GatedAutoEncoder``: ``x_enc = encoder(x - decoder_bias)`` (no encoder bias), gate ``x_enc + gate_bias > 0``,
  magnitude ``relu(exp(r_mag) * x_enc + mag_bias)``.

``trainSAE`` scales the biases back by the activation norm factor before the final save, so ``ae.pt`` runs on raw
activations.
"""

from __future__ import annotations

import logging
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from steerlib.sae.base import Sae, SaeMeta
from steerlib.sae.formats._common import SaeFormat, build_sae, check_dim, dims_of, read_json
from steerlib.sites import SITES, tl_name

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "ae.pt"
CFG_FILE = "config.json"

_SUBMODULE = re.compile(rf"^({'|'.join(SITES)})_layer_(\d+)$")


class _Converted(NamedTuple):
    architecture: str
    tensors: dict[str, Tensor]
    subtract_b_dec: bool
    k: int | None = None


class _StateDict:
    """Their state dict, emptied as it is read so that leftovers can be reported."""

    def __init__(self, sd: dict[str, Tensor], source: Path) -> None:
        self.sd, self.source = dict(sd), source

    def take(self, name: str) -> Tensor:
        if name not in self.sd:
            raise ValueError(f"{self.source}: ae.pt lacks tensor {name!r}; it has {sorted(self.sd)}")
        return self.sd.pop(name)

    def optional(self, name: str) -> Tensor | None:
        return self.sd.pop(name, None)

    def has(self, name: str) -> bool:
        return name in self.sd

    def linear_T(self, name: str) -> Tensor:
        """An ``nn.Linear`` weight (out, in) as steerlib's (in, out)."""
        return self.take(name).T.contiguous()

    def k(self, trainer: dict[str, Any], required: bool) -> int | None:
        stored = int(self.sd.pop("k").item()) if "k" in self.sd else None
        declared = trainer.get("k")
        if stored is not None and declared is not None and stored != declared:
            raise ValueError(f"{self.source}: config.json k={declared} != {stored}=state_dict['k']")
        k = declared if declared is not None else stored
        if required and k is None:
            raise ValueError(f"{self.source}: a top-k SAE needs k in config.json trainer or in ae.pt")
        return None if k is None else int(k)


def _autoencoder(sd: _StateDict, trainer: dict[str, Any]) -> _Converted:
    enc_FD, b_enc_F, dec_DF = sd.take("encoder.weight"), sd.take("encoder.bias"), sd.take("decoder.weight")
    norm_F = dec_DF.norm(dim=0)
    if not torch.allclose(norm_F, torch.ones_like(norm_F)):
        dec_DF, enc_FD, b_enc_F = dec_DF / norm_F, enc_FD * norm_F[:, None], b_enc_F * norm_F
    tensors = {"W_enc": enc_FD.T.contiguous(), "b_enc": b_enc_F, "W_dec": dec_DF.T.contiguous()}
    tensors["b_dec"] = sd.take("bias")
    return _Converted("relu", tensors, subtract_b_dec=True)


def _autoencoder_new(sd: _StateDict, trainer: dict[str, Any]) -> _Converted:
    tensors = {
        "W_enc": sd.linear_T("encoder.weight"),
        "b_enc": sd.take("encoder.bias"),
        "W_dec": sd.linear_T("decoder.weight"),
        "b_dec": sd.take("decoder.bias"),
    }
    return _Converted("relu", tensors, subtract_b_dec=False)


def _topk(sd: _StateDict, trainer: dict[str, Any]) -> _Converted:
    k = sd.k(trainer, required=True)
    sd.optional("threshold")  # AutoEncoderTopK.encode defaults to use_threshold=False
    # Before Dec 2024 the decoder was a bare Parameter "decoder" already shaped (d_sae, d_in).
    W_dec = sd.linear_T("decoder.weight") if sd.has("decoder.weight") else sd.take("decoder")
    tensors = {"W_enc": sd.linear_T("encoder.weight"), "b_enc": sd.take("encoder.bias"), "W_dec": W_dec}
    tensors["b_dec"] = sd.take("b_dec")
    return _Converted("topk", tensors, subtract_b_dec=True, k=k)


def _batch_topk(sd: _StateDict, trainer: dict[str, Any]) -> _Converted:
    if sd.has("W_enc"):  # MatryoshkaBatchTopKSAE keeps bare Parameters
        sd.optional("group_sizes")  # with every group active, the group cut-off zeroes nothing
        tensors = {name: sd.take(name) for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    else:
        tensors = {"W_enc": sd.linear_T("encoder.weight"), "b_enc": sd.take("encoder.bias")}
        tensors |= {"W_dec": sd.linear_T("decoder.weight"), "b_dec": sd.take("b_dec")}
    threshold = sd.optional("threshold")
    if threshold is not None and float(threshold) >= 0:
        tensors["threshold"] = threshold.reshape(())
    else:
        logger.warning(
            "%s: no BatchTopK threshold was estimated (threshold=%s); using per-token top-k",
            sd.source,
            None if threshold is None else float(threshold),
        )
    k = sd.k(trainer, required="threshold" not in tensors)
    return _Converted("batchtopk", tensors, subtract_b_dec=True, k=k)


def _jumprelu(sd: _StateDict, trainer: dict[str, Any]) -> _Converted:
    tensors = {name: sd.take(name) for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")}
    return _Converted("jumprelu", tensors, subtract_b_dec=False)


def _gated(sd: _StateDict, trainer: dict[str, Any]) -> _Converted:
    tensors = {
        "W_enc": sd.linear_T("encoder.weight"),
        "W_dec": sd.linear_T("decoder.weight"),
        "b_dec": sd.take("decoder_bias"),
        "b_gate": sd.take("gate_bias"),
        "r_mag": sd.take("r_mag"),
        "b_mag": sd.take("mag_bias"),
    }
    return _Converted("gated", tensors, subtract_b_dec=True)


_DICT_CLASSES: dict[str, Callable[[_StateDict, dict[str, Any]], _Converted]] = {
    "AutoEncoder": _autoencoder,
    "AutoEncoderNew": _autoencoder_new,
    "AutoEncoderTopK": _topk,
    "BatchTopKSAE": _batch_topk,
    "MatryoshkaBatchTopKSAE": _batch_topk,
    "JumpReluAutoEncoder": _jumprelu,
    "GatedAutoEncoder": _gated,
}


def _read_state_dict(file: Path) -> dict[str, Tensor]:
    try:
        sd = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{file}: refused to load: it is not a plain tensor state dict ({e})") from None
    if isinstance(sd, dict) and "ae" in sd and "optimizer" in sd:
        raise ValueError(f"{file} is a training backup (ae + optimizer state), not a final dictionary")
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in sd.items()):
        raise ValueError(f"{file}: expected a state dict of named tensors")
    return sd


def _site(trainer: dict[str, Any]) -> str | None:
    m = _SUBMODULE.match(str(trainer.get("submodule_name")))
    return tl_name(int(m.group(2)), m.group(1)) if m else None


def _load(folder: Path, dtype: torch.dtype | None) -> Sae:
    trainer = read_json(folder / CFG_FILE).get("trainer")
    if not isinstance(trainer, dict) or "dict_class" not in trainer:
        raise ValueError(f"{folder / CFG_FILE}: needs a 'trainer' object with 'dict_class'")
    name = trainer["dict_class"]
    if name not in _DICT_CLASSES:
        raise ValueError(f"{folder}: dict_class {name!r} is not supported; supported: {', '.join(_DICT_CLASSES)}")
    sd = _StateDict(_read_state_dict(folder / WEIGHTS_FILE), folder / WEIGHTS_FILE)
    conv = _DICT_CLASSES[name](sd, trainer)
    if sd.sd:
        raise ValueError(f"{folder / WEIGHTS_FILE}: unexpected tensors for {name}: {sorted(sd.sd)}")
    d_in, d_sae, d_out = dims_of(conv.tensors, folder)
    check_dim(folder, "activation_dim", trainer.get("activation_dim"), d_in)
    check_dim(folder, "dict_size", trainer.get("dict_size"), d_sae)
    site = _site(trainer)
    meta = SaeMeta(
        architecture=conv.architecture,
        d_in=d_in,
        d_sae=d_sae,
        d_out=d_out,
        input_site=site,
        output_site=site,
        model=trainer.get("lm_name"),
        k=conv.k,
        source_format="dictionary_learning",
    )
    return build_sae(meta, conv.tensors, subtract_b_dec=conv.subtract_b_dec, dtype=dtype, source=folder)


FORMAT = SaeFormat(
    name="dictionary_learning",
    files=f"{WEIGHTS_FILE} + {CFG_FILE}",
    detect=lambda folder: (folder / WEIGHTS_FILE).is_file() and (folder / CFG_FILE).is_file(),
    load=_load,
)
