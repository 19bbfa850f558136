"""Activations read in vLLM's workers for a server that owns the engine (``return_activations``).

A request that asks carries its sites in ``SamplingParams.extra_args["steerlib_capture"]`` (``[[layer, site], ...]``)
and a tag (:mod:`steerlib.vllm.verdicts`). Each step, the worker's site op appends the request's tokens at each of
its sites — the residual stream after any steering there, as ``steerlib.hf.recording.record`` reads it — to
``FOLDER/TAG.acts`` in the server's private folder (``$STEERLIB_VLLM_VERDICTS``); the server reads the file when the
request finishes (every token it reports was computed, and so written, before). Only the first tensor-parallel rank
writes (the residual stream is replicated). Without the folder, or without a well-formed tag, nothing is written and
the request is refused by the scheduler rather than answered without its activations.

The file is a sequence of numpy arrays: per record ``[layer, site index, n]`` then ``n`` positions then ``(n, D)``
float32 activations. Reading costs a device-to-host copy per site and step, for these requests only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from steerlib.sites import SITES, tl_name
from steerlib.vllm import verdicts

CAPTURE_KEY = "steerlib_capture"
MAX_SITES = 64


def sites_of(extra_args: Mapping[str, Any] | None) -> tuple[tuple[int, str], ...]:
    """The ``(layer, site)`` pairs a request reads (empty: none); a malformed list is a ``ValueError`` naming it."""
    raw = (extra_args or {}).get(CAPTURE_KEY)
    if raw is None:
        return ()
    if not isinstance(raw, list | tuple) or len(raw) > MAX_SITES:
        raise ValueError(f"extra_args[{CAPTURE_KEY!r}]: a list of at most {MAX_SITES} [layer, site] pairs")
    out = []
    for item in raw:
        ok = isinstance(item, list | tuple) and len(item) == 2 and isinstance(item[0], int) and item[1] in SITES
        if not ok or item[0] < 0:
            raise ValueError(f"extra_args[{CAPTURE_KEY!r}]: {item!r} is not [layer >= 0, one of {SITES}]")
        out.append((int(item[0]), str(item[1])))
    return tuple(dict.fromkeys(out))


def writable(extra_args: Mapping[str, Any] | None) -> bool:
    """Whether a worker can hand this request's activations back (a server folder and a well-formed tag)."""
    return bool(os.environ.get(verdicts.VERDICTS_ENV)) and verdicts.tag_of(extra_args) is not None


def _first_rank() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def write(tag: str, layer: int, site: str, positions_N: Tensor, x_ND: Tensor) -> None:
    """In a worker: append one step's tokens of the request tagged ``tag`` at ``(layer, site)``."""
    folder = os.environ.get(verdicts.VERDICTS_ENV)
    if not folder or not _first_rank():
        return
    pos = positions_N.detach().to("cpu", torch.int64).numpy()
    acts = x_ND.detach().to("cpu", torch.float32).numpy()
    with open(Path(folder) / f"{tag}.acts", "ab") as f:
        np.save(f, np.array([layer, SITES.index(site), len(pos)], dtype=np.int64))
        np.save(f, pos)
        np.save(f, acts)


def take(folder: Path, tag: str) -> dict[str, list[tuple[Tensor, Tensor]]]:
    """In the server: the chunks written for ``tag`` by site name (TransformerLens), in the order written; the file is
    removed."""
    path = folder / f"{tag}.acts"
    out: dict[str, list[tuple[Tensor, Tensor]]] = {}
    if not path.exists():
        return out
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        while f.tell() < size:
            layer, site, _ = (int(v) for v in np.load(f))
            pos, acts = np.load(f), np.load(f)
            out.setdefault(tl_name(layer, SITES[site]), []).append((torch.from_numpy(pos), torch.from_numpy(acts)))
    path.unlink(missing_ok=True)
    return out
