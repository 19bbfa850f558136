"""steerlib's own SAE format: a folder holding ``cfg.json`` (:class:`NativeSaeConfig`) and ``sae.safetensors``.

The weights may instead be stored xz-compressed as ``sae.safetensors.xz`` (``save_sae(..., compress=True)``): the
same safetensors bytes, about 70% of the size for bf16 weights (the exponent bytes compress, the mantissas do not),
for SAEs shipped inside a repository or a wheel. Reading decompresses in memory; nothing is written.

Tensors use steerlib's names and layouts (``W_enc`` (d_in, d_sae), ``W_dec`` (d_sae, d_out), ``W_skip`` (d_in, d_out),
``threshold``, ``b_gate``, ``r_mag``, ``b_mag``), so a save and a load give back the same SAE bit for bit.
:func:`save_sae` writes into a temporary folder beside the target and renames it into place, so a reader never sees
a half-written SAE.
"""

from __future__ import annotations

import json
import lzma
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import load, load_file, save, save_file

from steerlib.sae.base import Sae, SaeMeta
from steerlib.sae.formats._common import SaeFormat, build_sae, read_json

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"
COMPRESSED_WEIGHTS_FILE = WEIGHTS_FILE + ".xz"
FORMAT_VERSION = 1

ThresholdKind = Literal["none", "global", "per_latent"]


class NativeSaeConfig(BaseModel):
    """The ``cfg.json`` of an SAE saved by steerlib."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: Literal[1] = Field(description="Version of this file layout; 1 is the only one so far.")
    architecture: str = Field(description="Architecture name, a key of steerlib.sae.ARCHITECTURES.")
    d_in: int = Field(gt=0, description="Width of the activation the SAE reads.")
    d_sae: int = Field(gt=0, description="Number of latents.")
    d_out: int = Field(gt=0, description="Width of the reconstruction it writes.")
    k: int | None = Field(None, gt=0, description="Active latents per token (topk; batchtopk's top-k fallback).")
    threshold: ThresholdKind = Field(
        "none", description="Which `threshold` tensor is stored: none, global (a scalar) or per_latent (d_sae,)."
    )
    subtract_b_dec: bool = Field(description="Whether b_dec is subtracted from the input before encoding.")
    skip: bool = Field(False, description="Whether a W_skip (d_in, d_out) skip connection is stored.")
    transcoder: bool = Field(False, description="Whether the source declared the weights a transcoder.")
    input_site: str | None = Field(None, description="Site read, e.g. blocks.6.hook_resid_post.")
    output_site: str | None = Field(None, description="Site written; differs from input_site for transcoders.")
    model: str | None = Field(None, description="Model the SAE was trained on, as its source named it.")
    source_format: str = Field("steerlib", description="The format the weights were first read from.")


def _threshold_kind(tensors: dict[str, torch.Tensor]) -> ThresholdKind:
    if "threshold" not in tensors:
        return "none"
    return "global" if tensors["threshold"].dim() == 0 else "per_latent"


def config_of(sae: Sae) -> NativeSaeConfig:
    """The ``cfg.json`` contents describing ``sae``."""
    m = sae.meta
    return NativeSaeConfig(
        format_version=FORMAT_VERSION,
        architecture=sae.architecture,
        d_in=m.d_in,
        d_sae=m.d_sae,
        d_out=m.d_out,
        k=m.k,
        threshold=_threshold_kind(dict(sae.state_dict())),
        subtract_b_dec=sae.subtract_b_dec,
        skip=sae.W_skip is not None,
        transcoder=m.transcoder,
        input_site=m.input_site,
        output_site=m.output_site,
        model=m.model,
        source_format=m.source_format,
    )


def save_sae(sae: Sae, folder: str | os.PathLike[str], *, overwrite: bool = False, compress: bool = False) -> Path:
    """Write ``sae`` as ``folder/cfg.json`` + ``folder/sae.safetensors``; returns the folder.

    ``compress`` writes ``sae.safetensors.xz`` instead (the same bytes, xz-compressed).

    An existing ``folder`` is an error unless ``overwrite``; then the old folder is moved aside, the new one renamed
    in and the old one deleted.
    """
    target = Path(folder)
    if target.exists() and not (overwrite and target.is_dir()):
        raise FileExistsError(f"{target} already exists; pass overwrite=True to replace an SAE folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    cfg = config_of(sae)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in sae.state_dict().items()}
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        metadata = {"format": "steerlib-sae"}
        if compress:
            (tmp / COMPRESSED_WEIGHTS_FILE).write_bytes(lzma.compress(save(tensors, metadata=metadata), preset=9))
        else:
            save_file(tensors, str(tmp / WEIGHTS_FILE), metadata=metadata)
        (tmp / CFG_FILE).write_text(json.dumps(cfg.model_dump(), indent=2) + "\n")
        if target.exists():
            old = target.parent / f".{target.name}.{uuid.uuid4().hex}.old"
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _weights_file(folder: Path) -> Path | None:
    found = [folder / name for name in (WEIGHTS_FILE, COMPRESSED_WEIGHTS_FILE) if (folder / name).is_file()]
    if len(found) > 1:
        raise ValueError(f"{folder} holds both {WEIGHTS_FILE} and {COMPRESSED_WEIGHTS_FILE}; keep one")
    return found[0] if found else None


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.name == COMPRESSED_WEIGHTS_FILE:
        try:
            return load(lzma.decompress(path.read_bytes()))
        except lzma.LZMAError as e:
            raise ValueError(f"{path}: not a valid xz-compressed safetensors file: {e}") from None
    return load_file(str(path))


def _detect(folder: Path) -> bool:
    cfg = folder / CFG_FILE
    if not (cfg.is_file() and _weights_file(folder) is not None):
        return False
    try:
        return "format_version" in json.loads(cfg.read_text())
    except (json.JSONDecodeError, TypeError):
        return False


def _load(folder: Path, dtype: torch.dtype | None) -> Sae:
    raw = read_json(folder / CFG_FILE)
    try:
        cfg = NativeSaeConfig.model_validate(raw)
    except ValidationError as e:
        raise ValueError(f"{folder / CFG_FILE}: invalid steerlib SAE config:\n{e}") from None
    weights = _weights_file(folder)
    if weights is None:
        raise FileNotFoundError(f"{folder}: no {WEIGHTS_FILE} or {COMPRESSED_WEIGHTS_FILE}")
    tensors = _read_weights(weights)
    if _threshold_kind(tensors) != cfg.threshold:
        raise ValueError(
            f"{folder}: cfg.json says threshold={cfg.threshold!r} but the weights hold {_threshold_kind(tensors)!r}"
        )
    if ("W_skip" in tensors) != cfg.skip:
        stored = "stored" if "W_skip" in tensors else "not stored"
        raise ValueError(f"{folder}: cfg.json says skip={cfg.skip} but W_skip is {stored}")
    meta = SaeMeta(
        architecture=cfg.architecture,
        d_in=cfg.d_in,
        d_sae=cfg.d_sae,
        d_out=cfg.d_out,
        input_site=cfg.input_site,
        output_site=cfg.output_site,
        model=cfg.model,
        k=cfg.k,
        source_format=cfg.source_format,
        transcoder=cfg.transcoder,
    )
    return build_sae(meta, tensors, subtract_b_dec=cfg.subtract_b_dec, dtype=dtype, source=folder)


FORMAT = SaeFormat(
    name="steerlib",
    files=f"{CFG_FILE} with format_version + {WEIGHTS_FILE} (or {COMPRESSED_WEIGHTS_FILE})",
    detect=_detect,
    load=_load,
)
