"""Activations for training: a streaming harvest through steerlib's recording, a shuffle buffer, a memory-mapped cache.

One model pass records every requested site at once (``steerlib.hf.recording.record(..., on_step=..., keep=False)``
hands each step's activations over and keeps nothing). They either stream through a :class:`ShuffleBuffer` into the
trainer, or are written once to an :class:`ActivationCache`: one ``<site>.npy`` per site, opened as a numpy memmap,
so several SAEs, a sweep or a benchmark reuse one pass. A cache is written into a ``.partial`` folder, flushed and
marked chunk by chunk so that a killed harvest continues where it stopped, and renamed into place with its
description (``meta.json``) last, so a half-written cache is never read.

The first token of each context (BOS) is dropped by default: its residual stream is an outlier of very large norm
that every SAE trainer excludes (sparsify, SAELens' ``exclude_special_tokens``).
The forward pass stops after the last layer a site needs (the layers above it and the unembedding are never run):
for a middle layer of SmolLM2 that halves the cost of a harvest.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from steerlib.hf.layout import get_layout
from steerlib.hf.recording import record
from steerlib.sites import parse_site

logger = logging.getLogger(__name__)

META_FILE = "meta.json"
PROGRESS_FILE = "progress.json"
CacheDtype = Literal["float32", "float16"]


def _file_of(site: str) -> str:
    return site.replace("/", "_") + ".npy"


def harvest(
    model: nn.Module,
    contexts_NT: Tensor,
    sites: Sequence[str],
    *,
    batch_size: int = 8,
    skip_bos: bool = True,
    progress: bool = False,
) -> Iterator[dict[str, Tensor]]:
    """Per batch of contexts, ``{site: (n, D)}`` for every recorded token (all sites from one forward pass)."""
    out: list[dict[str, Tensor]] = []
    select = {"window": [1, None]} if skip_bos else None

    def on_step(acts: dict[str, Tensor], rows: Tensor, pos: Tensor) -> None:
        out.append({k: v.float() for k, v in acts.items()})

    n = contexts_NT.shape[0]
    device = next(model.parameters()).device
    bar = tqdm(range(0, n, batch_size), desc="harvest", unit="batch", disable=not progress)
    with record(model, list(sites), select=select, on_step=on_step, keep=False):
        # registered after record's hooks, so on the same module it runs after them
        stop = get_layout(model).layers[_last_layer(sites)].register_forward_hook(_stop_forward)
        try:
            for start in bar:
                ids = contexts_NT[start : start + batch_size].to(device)
                # no_grad around the forward only: a mode entered around the yields would stay on in the caller's
                # code (a streamed training step) while this generator is suspended
                with torch.no_grad(), contextlib.suppress(_StopForward):
                    model(input_ids=ids, attention_mask=torch.ones_like(ids))
                if not out:
                    raise RuntimeError(f"harvest: the forward pass recorded nothing at {list(sites)}")
                yield from out
                out.clear()
        finally:
            stop.remove()


class _StopForward(Exception):
    """Raised after the last layer a harvest needs, to skip the rest of the model."""


def _stop_forward(module: nn.Module, args: object, output: object) -> None:
    raise _StopForward


def _last_layer(sites: Sequence[str]) -> int:
    """The decoder layer after whose output every site has been seen (resid_pre L is resid_post L-1)."""
    last = 0
    for s in sites:
        layer, name = parse_site(s)
        if layer is None:
            raise ValueError(f"site {s!r}: give a TransformerLens name like blocks.3.hook_resid_post")
        last = max(last, layer - 1 if name == "resid_pre" and layer > 0 else layer)
    return last


def _partial(target: Path) -> Path:
    return target.parent / f".{target.name}.partial"


def _reopen(part: Path) -> dict[str, np.ndarray]:
    """The arrays of an interrupted write, opened for writing."""
    sites = json.loads((part / PROGRESS_FILE).read_text())["sites"]
    return {s: np.load(part / _file_of(s), mmap_mode="r+") for s in sites}


def _mark(part: Path, arrays: dict[str, np.ndarray], filled: int, n_tokens: int, dtype: str, fp: str) -> None:
    """Flush the rows written so far, then record their count (atomically: a kill leaves the old count)."""
    for a in arrays.values():
        a.flush()  # type: ignore[attr-defined]  # a numpy memmap
    p = {"sites": list(arrays), "filled": filled, "n_tokens": n_tokens, "dtype": dtype, "fingerprint": fp}
    tmp = part / (PROGRESS_FILE + ".tmp")
    tmp.write_text(json.dumps(p))
    os.replace(tmp, part / PROGRESS_FILE)


class ShuffleBuffer:
    """Mixes activations from many contexts: fill to ``capacity`` rows, hand out random batches, refill at half.

    Adjacent tokens of one context are strongly correlated; training on them in order biases every step.
    """

    def __init__(self, capacity: int, batch_size: int, seed: int = 0) -> None:
        if capacity < 2 * batch_size:
            raise ValueError(f"shuffle buffer capacity {capacity} must be at least 2x the batch size {batch_size}")
        self.capacity, self.batch_size = capacity, batch_size
        self.gen = torch.Generator(device="cpu").manual_seed(seed)  # the buffer lives on the host

    def batches(self, chunks: Iterator[dict[str, Tensor]]) -> Iterator[dict[str, Tensor]]:
        """Random batches of ``batch_size`` rows (every site shuffled with the same permutation)."""
        pool: dict[str, Tensor] = {}
        exhausted = False
        while True:
            while not exhausted and _rows(pool) < self.capacity:
                chunk = next(chunks, None)
                if chunk is None:
                    exhausted = True
                else:
                    pool = {k: torch.cat([pool[k], v]) if k in pool else v for k, v in chunk.items()}
            n = _rows(pool)
            if n < self.batch_size:
                return
            perm = torch.randperm(n, generator=self.gen, device="cpu")
            pool = {k: v[perm] for k, v in pool.items()}
            take = n - self.capacity // 2 if not exhausted else n  # keep half the buffer for mixing
            take = max(self.batch_size, take - take % self.batch_size)
            for i in range(0, take - self.batch_size + 1, self.batch_size):
                yield {k: v[i : i + self.batch_size] for k, v in pool.items()}
            pool = {k: v[take:] for k, v in pool.items()}


def _rows(pool: dict[str, Tensor]) -> int:
    return next(iter(pool.values())).shape[0] if pool else 0


def typical_rows(cache: ActivationCache, site: str, max_norm_factor: float, chunk: int = 65536) -> Tensor:
    """Indices of the rows whose norm at ``site`` is at most ``max_norm_factor`` times the median norm."""
    norms = torch.cat([cache.rows(site, slice(s, s + chunk)).norm(dim=1) for s in range(0, len(cache), chunk)])
    keep = (norms <= max_norm_factor * norms.median()).nonzero().squeeze(1)
    logger.info("%d of %d tokens above %.0fx the median norm left out", len(cache) - len(keep), len(cache),
                max_norm_factor)  # fmt: skip
    return keep


@dataclass(frozen=True)
class CacheMeta:
    """What a cache holds, written as ``meta.json``."""

    sites: tuple[str, ...]
    n_tokens: int
    d: dict[str, int]
    dtype: CacheDtype
    fingerprint: str
    """Caller-chosen description of the model, data and settings; a cache is reused only when it matches."""


class ActivationCache:
    """A folder of per-site activation arrays ``(n_tokens, D)``, memory-mapped read-only."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        meta_path = self.folder / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{self.folder} is not an activation cache (no {META_FILE})")
        raw = json.loads(meta_path.read_text())
        self.meta = CacheMeta(tuple(raw["sites"]), raw["n_tokens"], raw["d"], raw["dtype"], raw["fingerprint"])
        self._arrays = {s: np.load(self.folder / _file_of(s), mmap_mode="r") for s in self.meta.sites}

    def __len__(self) -> int:
        return self.meta.n_tokens

    def array(self, site: str) -> np.ndarray:
        if site not in self._arrays:
            raise KeyError(f"site {site} is not in the cache at {self.folder}; cached: {list(self.meta.sites)}")
        return self._arrays[site]

    def rows(self, site: str, index: Tensor | slice) -> Tensor:
        """fp32 rows of ``site`` (``index``: a slice or an index tensor)."""
        arr = self.array(site)
        picked = arr[index] if isinstance(index, slice) else arr[np.sort(index.numpy())]
        return torch.from_numpy(np.array(picked, dtype=np.float32))  # a copy: the memmap is read-only

    @staticmethod
    def resume_rows(folder: str | os.PathLike[str], n_tokens: int, fingerprint: str, dtype: CacheDtype) -> int:
        """Rows already written by an interrupted :meth:`write` of this very cache (same size, dtype and
        fingerprint); 0 when there is none."""
        progress = _partial(Path(folder)) / PROGRESS_FILE
        if not progress.is_file():
            return 0
        p = json.loads(progress.read_text())
        same = (p["n_tokens"], p["fingerprint"], p["dtype"]) == (n_tokens, fingerprint, dtype)
        return int(p["filled"]) if same else 0

    @staticmethod
    def write(
        folder: str | os.PathLike[str],
        chunks: Iterator[dict[str, Tensor]],
        n_tokens: int,
        *,
        dtype: CacheDtype = "float32",
        fingerprint: str = "",
        progress: bool = False,
    ) -> ActivationCache:
        """Fill a new cache with ``n_tokens`` rows of ``chunks``; fewer rows available is an error.

        Rows are written into ``.<name>.partial/`` beside ``folder``, flushed chunk by chunk with the count of
        completed rows in its ``progress.json``; a killed write continues from there: ``chunks`` must then start
        at row :meth:`resume_rows` (the pipeline skips the contexts already harvested). The finished folder is
        renamed into place with ``meta.json`` written last.
        """
        target = Path(folder)
        part = _partial(target)
        filled = ActivationCache.resume_rows(target, n_tokens, fingerprint, dtype)
        if filled == 0 and part.exists():
            shutil.rmtree(part)  # another cache's leftovers
        part.mkdir(parents=True, exist_ok=True)
        arrays = _reopen(part) if filled else {}
        bar = tqdm(total=n_tokens, initial=filled, desc="harvest", unit="tok", unit_scale=True, disable=not progress)
        try:
            for chunk in chunks:
                if filled == n_tokens:
                    break
                if not arrays:
                    arrays = {
                        s: np.lib.format.open_memmap(part / _file_of(s), "w+", dtype, (n_tokens, v.shape[-1]))
                        for s, v in chunk.items()
                    }
                take = min(n_tokens - filled, next(iter(chunk.values())).shape[0])
                for s, v in chunk.items():
                    arrays[s][filled : filled + take] = v[:take].numpy()
                filled += take
                _mark(part, arrays, filled, n_tokens, dtype, fingerprint)
                bar.update(take)
        finally:
            bar.close()
        if filled < n_tokens:
            shutil.rmtree(part, ignore_errors=True)
            raise ValueError(f"activation cache wanted {n_tokens} tokens but the data gave only {filled}")
        meta: dict[str, object] = {
            "sites": list(arrays),
            "n_tokens": n_tokens,
            "d": {s: int(a.shape[1]) for s, a in arrays.items()},
            "dtype": dtype,
            "fingerprint": fingerprint,
        }
        del arrays
        (part / PROGRESS_FILE).unlink()
        (part / META_FILE).write_text(json.dumps(meta, indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(part, target)
        logger.info("wrote activation cache %s: %d tokens", target, n_tokens)
        return ActivationCache(target)

    @staticmethod
    def find(folder: str | os.PathLike[str], fingerprint: str) -> ActivationCache | None:
        """The cache at ``folder`` if it exists with this fingerprint, else None."""
        try:
            cache = ActivationCache(folder)
        except FileNotFoundError:
            return None
        return cache if cache.meta.fingerprint == fingerprint else None
