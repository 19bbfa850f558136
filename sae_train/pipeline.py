"""The whole run behind ``python -m sae_train CONFIG``: text -> activations (cached) -> training -> metrics -> folder.

Output folder (``run.out_dir``):

- ``sae/``: the trained SAE in steerlib's format (``steerlib.load_sae`` reads it; scales folded in);
- ``saelens/``: the same SAE in SAELens' layout (when ``run.export_saelens``);
- ``train_config.json``: the config that produced it; ``eval.json``: held-out metrics (per domain with
  ``data.eval_domains``);
- ``metrics.jsonl``: training metrics per interval; ``checkpoint.pt``: the last checkpoint (resume).

Activations come from the on-disk cache (harvested once, reused by later runs) or, with ``activations.cache:
false``, stream from the model through a shuffle buffer while training (:mod:`sae_train.stream`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from sae_train.activations import ActivationCache, harvest, typical_rows
from sae_train.batches import CacheRows
from sae_train.checkpoint import atomic_write_bytes
from sae_train.config import TrainConfig
from sae_train.data import Tokenizer, contexts, packing_for
from sae_train.dist import DistInfo, init_from_env, process_device
from sae_train.export import export_saelens
from sae_train.metrics import SaeMetrics, evaluate
from sae_train.models import TrainSae, build_train_sae
from sae_train.stream import Chunks, StreamBatches
from sae_train.trainer import Trainer
from steerlib.devices import resolve_device
from steerlib.hf.loading import cache_root, load_model
from steerlib.sae import Sae, save_sae

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunResult:
    out_dir: Path
    sae: Sae
    metrics: dict[str, SaeMetrics]
    """Held-out metrics per evaluation domain (``all`` without ``data.eval_domains``; empty when skipped)."""
    train_seconds: float


def fingerprint(cfg: TrainConfig, sites: list[str]) -> str:
    # eval_domains is evaluation only; weights are left out while unset, so older caches keep their fingerprint
    data = cfg.data.model_dump(exclude={"eval_domains"} | (set() if cfg.data.weights else {"weights"}))
    key = {"model": cfg.model, "data": data, "sites": sites, **cfg.activations.model_dump()}
    for training_only in ("cache_dir", "harvest_batch", "max_norm_factor", "cache", "shuffle_buffer"):
        key.pop(training_only)
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def sites_of(cfg: TrainConfig) -> list[str]:
    return list(dict.fromkeys([cfg.sae.input_site, cfg.sae.out_site]))


def build_cache(cfg: TrainConfig, model: torch.nn.Module, tok: Tokenizer, folder: Path) -> ActivationCache:
    """The activation cache for ``cfg`` at ``folder``: reused when its fingerprint matches, else harvested (an
    interrupted harvest of the same cache continues from its last completed chunk)."""
    sites = sites_of(cfg)
    fp = fingerprint(cfg, sites)
    found = ActivationCache.find(folder, fp)
    if found is not None:
        logger.info("reusing activation cache %s", folder)
        return found
    a = cfg.activations
    done = ActivationCache.resume_rows(folder, a.n_tokens, fp, a.dtype)
    per_ctx = cfg.data.ctx_len - int(a.skip_bos)
    if done % per_ctx:
        raise RuntimeError(f"{folder}: an interrupted harvest stopped inside a context ({done} rows); remove it")
    if done:
        logger.info("continuing the harvest into %s after %d of %d tokens", folder, done, a.n_tokens)
    ids = train_contexts(cfg, tok)[done // per_ctx :]
    chunks = harvest(model, ids, sites, batch_size=a.harvest_batch, skip_bos=a.skip_bos)
    return ActivationCache.write(folder, chunks, a.n_tokens, dtype=a.dtype, fingerprint=fp, progress=True)


def _harvester(
    cfg: TrainConfig, model: torch.nn.Module, tok: Tokenizer, progress: bool, info: DistInfo | None = None
) -> Callable[[], Chunks]:
    """A function that starts a harvest of the training contexts from the first one each time it is called; with
    ``info``, of this process's share of them."""
    a = cfg.activations
    ids, sites = train_contexts(cfg, tok, info), sites_of(cfg)
    return lambda: harvest(model, ids, sites, batch_size=a.harvest_batch, skip_bos=a.skip_bos, progress=progress)


def train_contexts(cfg: TrainConfig, tok: Tokenizer, info: DistInfo | None = None) -> torch.Tensor:
    """The training contexts ``(N, T)``; with ``info``, this process's share: every ``world``-th from ``rank``."""
    a, d = cfg.activations, cfg.data
    per_ctx = d.ctx_len - int(a.skip_bos)
    ids = contexts(d.sources, tok, packing_for(tok, d.ctx_len, d.bos), "train", heldout_fraction=d.heldout_fraction,
                   max_contexts=math.ceil(a.n_tokens / per_ctx), weights=d.weights)  # fmt: skip
    return ids if info is None or info.world == 1 else ids[info.rank :: info.world]


def stream_source(
    cfg: TrainConfig, model: torch.nn.Module, tok: Tokenizer, info: DistInfo | None = None
) -> StreamBatches:
    """Batches harvested while training, through a shuffle buffer (``activations.cache: false``). With several
    processes each harvests its own share of the contexts and yields its own share of every batch."""
    a = cfg.activations
    world = 1 if info is None else info.world
    if cfg.optim.batch_size % world or a.shuffle_buffer % world:
        raise ValueError(
            f"optim.batch_size={cfg.optim.batch_size} and activations.shuffle_buffer={a.shuffle_buffer} must divide "
            f"by the {world} processes"
        )
    return StreamBatches(
        _harvester(cfg, model, tok, progress=False, info=info),
        cfg.sae.input_site,
        cfg.sae.out_site,
        batch_size=cfg.optim.batch_size // world,
        buffer_rows=a.shuffle_buffer // world,
        seed=cfg.optim.seed,
        max_norm_factor=a.max_norm_factor,
        norm_sample=cfg.optim.init_sample,
    )


def make_sae(cfg: TrainConfig, d_in: int, d_out: int) -> TrainSae:
    """The training SAE ``cfg.sae`` describes, for the widths found in the activations."""
    return build_train_sae(cfg.sae, d_in, d_out, model=cfg.model or "SmolLM2-135M-Instruct")


def make_trainer(
    cfg: TrainConfig,
    sae: TrainSae,
    source: CacheRows | StreamBatches,
    n_rows: int,
    out: Path | None = None,
    info: DistInfo | None = None,
    device: torch.device | None = None,
) -> Trainer:
    """The trainer for ``sae``: ``cfg.optim`` resolved for its size and ``n_rows`` rows per epoch, ``cfg.run``."""
    optim = cfg.optim.resolved(sae.d_sae, n_rows)
    return Trainer(sae, optim, source, out, info, device, run=cfg.run, progress=True)


def run(cfg: TrainConfig, base_dir: Path, info: DistInfo | None = None) -> RunResult:
    """Train and evaluate the SAE ``cfg`` describes; paths in ``cfg`` are relative to ``base_dir``."""
    device = process_device(resolve_device(cfg.device))
    info = info or init_from_env(device)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    out = (base_dir / cfg.run.out_dir).resolve()
    model, tok = load_model(cfg.model, device=device, dtype=cfg.dtype)
    source, d_in, d_out, n_rows = _source(cfg, model, tok, base_dir, info)
    trainer = make_trainer(cfg, make_sae(cfg, d_in, d_out), source, n_rows, out, info, device)
    t0 = time.perf_counter()
    try:
        trainer.fit()
    finally:
        if isinstance(source, StreamBatches):
            source.close()  # the harvest's recording hooks leave the model before it is evaluated
    seconds = time.perf_counter() - t0
    sae = trainer.export()
    metrics: dict[str, SaeMetrics] = {}
    if info.is_main:
        save_sae(sae, out / "sae", overwrite=True)
        atomic_write_bytes(out / "train_config.json", cfg.model_dump_json(indent=2).encode())
        if cfg.run.export_saelens:
            export_saelens(sae, out / "saelens")
        metrics = _evaluate(cfg, model, tok, sae, out, seconds)
    return RunResult(out, sae, metrics, seconds)


def _source(
    cfg: TrainConfig, model: torch.nn.Module, tok: Tokenizer, base_dir: Path, info: DistInfo
) -> tuple[CacheRows | StreamBatches, int, int, int]:
    """The training rows (cached or streamed), the input and output widths, and the number of rows per epoch."""
    in_site, out_site = cfg.sae.input_site, cfg.sae.out_site
    if not cfg.activations.cache:
        stream = stream_source(cfg, model, tok, info)
        d_in, d_out = stream.dims()
        return stream, d_in, d_out, cfg.activations.n_tokens
    cache_dir = (
        base_dir / cfg.activations.cache_dir
        if cfg.activations.cache_dir
        else cache_root() / "activations" / fingerprint(cfg, sites_of(cfg))
    )
    if info.world > 1 and not info.is_main:
        torch.distributed.barrier()  # rank 0 harvests; the others wait, then open the same cache
    cache = build_cache(cfg, model, tok, cache_dir)
    if info.world > 1 and info.is_main:
        torch.distributed.barrier()
    factor = cfg.activations.max_norm_factor
    rows = CacheRows(cache, in_site, out_site, None if factor is None else typical_rows(cache, in_site, factor))
    return rows, cache.meta.d[in_site], cache.meta.d[out_site], len(rows)


MASSIVE_FACTOR = 10.0
"""Where training keeps every token (``max_norm_factor: null``), held-out FVU is still also reported without the
tokens above this times the median norm (``fvu_typical``), so releases compare with and without them."""


def heldout_sets(cfg: TrainConfig, tok: Tokenizer) -> dict[str, tuple[list[str], torch.Tensor]]:
    """Per evaluation domain, its sources and up to ``run.eval_contexts`` held-out contexts of them."""
    d = cfg.data
    packing = packing_for(tok, d.ctx_len, d.bos)
    domains = d.eval_domains or {"all": d.sources}
    out = {}
    for name, srcs in domains.items():
        # a named domain's sources weigh alike (by characters): one long document must not fill the domain
        weights = [1.0] * len(srcs) if d.eval_domains else None
        ids = contexts(srcs, tok, packing, "heldout", heldout_fraction=d.heldout_fraction,
                       max_contexts=cfg.run.eval_contexts, weights=weights)  # fmt: skip
        out[name] = (srcs, ids)
    return out


def evaluate_domains(
    cfg: TrainConfig, model: torch.nn.Module, tok: Tokenizer, sae: Sae
) -> tuple[dict[str, SaeMetrics], dict[str, object]]:
    """Held-out metrics of ``sae`` per domain, and the report written as ``eval.json``: flat metrics for a single
    unnamed set (no ``data.eval_domains``), else ``{"domains": {name: metrics + sources}}``."""
    a = cfg.activations
    metrics: dict[str, SaeMetrics] = {}
    rows: dict[str, object] = {}
    for name, (srcs, ids) in heldout_sets(cfg, tok).items():
        m = evaluate(model, sae, ids, skip_bos=a.skip_bos, max_norm_factor=a.max_norm_factor or MASSIVE_FACTOR)
        metrics[name] = m
        rows[name] = {**m._asdict(), "eval_contexts": int(ids.shape[0]), "sources": srcs}
        logger.info("held-out metrics, %s: %s", name, rows[name])
    if cfg.data.eval_domains is None:
        only = rows["all"]
        assert isinstance(only, dict)
        return metrics, {k: v for k, v in only.items() if k != "sources"}
    return metrics, {"domains": rows}


def _evaluate(
    cfg: TrainConfig, model: torch.nn.Module, tok: Tokenizer, sae: Sae, out: Path, secs: float
) -> dict[str, SaeMetrics]:
    if cfg.run.eval_contexts == 0:
        return {}
    metrics, report = evaluate_domains(cfg, model, tok, sae)
    report = {**report, "train_seconds": round(secs, 1)}
    atomic_write_bytes(out / "eval.json", (json.dumps(report, indent=2) + "\n").encode())
    return metrics
