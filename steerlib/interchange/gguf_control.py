"""GGUF control vectors, the file format of llama.cpp's ``--control-vector`` and repeng's ``export_gguf``.

A control vector file is a GGUF with ``general.architecture = "controlvector"``, the string
``controlvector.model_hint`` (the model's architecture, e.g. ``llama``), the integer ``controlvector.layer_count``
(the number of direction tensors) and one 1-D F32 tensor ``direction.N`` per steered layer. llama.cpp's loader reads
only the tensors; repeng's ``import_gguf`` also requires the model hint. steerlib keeps its own vector-file metadata in
extra ``steerlib.<key>`` string fields, which both of them ignore.

Where ``direction.N`` goes (read in ggml-org/llama.cpp and in repeng 0.4.0):

- ``common/common.cpp`` ``common_control_vector_load_one`` rejects a file with ``direction.0`` ("invalid (zero)
  direction tensor layer index") or a non-F32 / non-1-D tensor, and stores ``direction.N`` (times the file's scale)
  at row ``N - 1`` of one buffer, summing files and repeated tensors;
- ``src/llama-adapter.cpp`` ``llama_adapter_cvec::apply`` copies row ``il - 1`` into ``tensors[il]`` for
  ``il = 1 .. n_layer - 1`` ("there's never a tensor for layer 0"), and ``tensor_for(il)`` returns it only when
  ``layer_start <= il <= layer_end``;
- ``src/models/llama.cpp`` (every architecture alike) runs ``for (il = 0; il < n_layer; ++il)`` and ends each block
  with ``cur = ggml_add(ctx0, cur, ffn_inp); cur = build_cvec(cur, il); cb(cur, "l_out", il);``.

So ``direction.N`` is added, at every position, to the output of decoder block ``N`` (0-based): transformers'
``hidden_states[N + 1]``, steerlib's ``(layer=N, site="resid_post")``. No shift by one. repeng agrees: its
``ControlModel`` wraps ``model.model.layers[N]`` and adds ``directions[N]`` to that block's output
(``repeng/control.py`` ``ControlModule.forward``), ``read_representations`` measures ``directions[N]`` on
``hidden_states[N + 1]`` (``repeng/extract.py`` ``batched_get_hiddens``: ``hidden_idx = layer + 1``), and
``export_gguf`` names it ``direction.N``. Layer 0's output can never be steered by llama.cpp, so a ``direction.0``
is refused here too, on reading and on writing.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from steerlib.interchange import placement
from steerlib.interchange.placement import resid_post_directions
from steerlib.vectors import SteeringVector

log = logging.getLogger(__name__)

ARCH = "controlvector"
MODEL_HINT_KEY = f"{ARCH}.model_hint"
LAYER_COUNT_KEY = f"{ARCH}.layer_count"
META_PREFIX = "steerlib."
FORMAT = "gguf_control_vector"
_RESERVED = ("GGUF.", "general.", MODEL_HINT_KEY, LAYER_COUNT_KEY)


def read_gguf(path: str | Path) -> SteeringVector:
    """A control vector file as a per-layer :class:`SteeringVector` whose layer ``N`` is ``direction.N``.

    The vectors are added at ``resid_post`` of their layer (metadata ``site``); metadata also carries ``model_hint``,
    ``layers`` and the file's other scalar fields (``steerlib.<key>`` as ``<key>``, any other under its full name).
    """
    import gguf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"control vector file not found: {path}")
    reader = gguf.GGUFReader(str(path))
    fields = {name: field.contents() for name, field in reader.fields.items()}
    arch = fields.get("general.architecture")
    if arch is not None and arch != ARCH:
        raise ValueError(f"{path}: not a control vector: general.architecture is {arch!r}, expected {ARCH!r}")
    by_layer: dict[int, Tensor] = {}
    for t in reader.tensors:
        layer = _direction_layer(t.name, path)
        if t.tensor_type != gguf.GGMLQuantizationType.F32 or len(t.shape) != 1:
            raise ValueError(
                f"{path}: {t.name} is {t.tensor_type.name} with shape {list(t.shape)}; llama.cpp's loader accepts "
                "1-D F32 direction tensors only"
            )
        v = torch.from_numpy(np.array(t.data, dtype=np.float32, copy=True))
        by_layer[layer] = by_layer[layer] + v if layer in by_layer else v  # repeated tensors sum, as in llama.cpp
    if not by_layer:
        raise ValueError(f"{path}: no direction.N tensors")
    return SteeringVector(dict(sorted(by_layer.items())), _metadata(fields, sorted(by_layer)))


def _direction_layer(name: str, path: Path) -> int:
    prefix, _, index = name.partition(".")
    if prefix != "direction" or not index.isdigit():
        raise ValueError(f"{path}: tensor {name!r} is not named direction.N (N = layer index)")
    if int(index) == 0:
        raise ValueError(
            f"{path}: direction.0 found; llama.cpp rejects the file (layer 0's output is never steered), so it is "
            "not read here either"
        )
    return int(index)


def _metadata(fields: dict[str, object], layers: list[int]) -> dict[str, str]:
    meta = {
        (k[len(META_PREFIX) :] if k.startswith(META_PREFIX) else k): v if isinstance(v, str) else json.dumps(v)
        for k, v in fields.items()
        if not k.startswith(_RESERVED) and isinstance(v, str | int | float | bool)
    }
    hint = fields.get(MODEL_HINT_KEY)
    if isinstance(hint, str):
        meta["model_hint"] = hint
    return {**meta, "site": "resid_post", "layers": json.dumps(layers), "format": FORMAT}


def write_gguf(directions: dict[int, Tensor], path: str | Path, model_hint: str, metadata: dict[str, str]) -> Path:
    """Write ``{layer: (D,) vector}`` (added at ``resid_post`` of ``layer``) as a control vector file, atomically.

    ``metadata`` goes into ``steerlib.<key>`` string fields (keys already written by the format are skipped).
    """
    import gguf

    path = Path(path)
    if not directions:
        raise ValueError("no layers to write: a control vector needs at least one direction")
    if 0 in directions:
        raise ValueError(
            "layer 0 cannot be written: llama.cpp rejects a direction.0 tensor and never steers layer 0's output"
        )
    dims = {int(v.numel()) for v in directions.values()}
    if len(dims) != 1 or any(v.dim() != 1 for v in directions.values()):
        raise ValueError(
            f"directions must be 1-D of one width; got shapes {[list(v.shape) for v in directions.values()]}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, ARCH)
        writer.add_string(MODEL_HINT_KEY, model_hint)
        writer.add_uint32(LAYER_COUNT_KEY, len(directions))  # the number of tensors, as repeng and llama.cpp write it
        for key, value in sorted(metadata.items()):
            if key not in ("model_hint", "format"):
                writer.add_string(META_PREFIX + key, value)
        for layer in sorted(directions):
            writer.add_tensor(f"direction.{layer}", directions[layer].detach().cpu().float().contiguous().numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("wrote control vector %s: layers %s, model hint %r", path, sorted(directions), model_hint)
    return path


def save_gguf(vector: SteeringVector, path: str | Path, *, model_hint: str | None = None) -> Path:
    """Write a steerlib vector (per-layer, or one layer named in its metadata) as a control vector file.

    Its ``site`` must be ``resid_post`` (or ``resid_pre`` of a layer >= 1, written one block earlier); the model hint
    is ``model_hint``, else the metadata's ``model_hint`` or ``model``.
    """
    directions = resid_post_directions(vector, str(path))
    return write_gguf(directions, path, placement.model_hint(vector.metadata, model_hint), _portable(vector.metadata))


def _portable(metadata: dict[str, str]) -> dict[str, str]:
    # site/layer/layers describe the file being converted, not the GGUF (always resid_post, its own tensors).
    return {k: v for k, v in metadata.items() if k not in ("site", "layer", "layers")}
