"""Training throughput of sae_train vs EleutherAI's sparsify (and SAELens when importable), side by side.

All trainers read the same activations (an sae_train activation cache of the embedded model, built on first use),
see the same batches in the same order, and train the same architecture and size (TopK, k=32, 8x expansion by
default) with Adam at the same learning rate and AuxK weight. Reported per trainer: tokens/s over the timed steps
(the first step is warm-up and not timed) and FVU on held-out rows of the cache after the same number of tokens.
The torch thread count is set and recorded: on a shared 2-core machine the numbers move with the load, which is
why the trainers run interleaved in one process and the ratio is the figure to read.

    python bench/train_throughput.py --tokens 65536 --steps 30 --threads 1

sparsify is imported without its package ``__init__`` (which pulls ``datasets`` for its own trainer): only
``sparsify.sparse_coder`` is loaded, and its training step (``fvu + auxk_alpha * auxk_loss``, gradient projection,
unit-norm decoder) is reproduced from ``sparsify/trainer.py``. Install it apart from the project environment:
``python -m venv --system-site-packages V && V/bin/pip install --no-deps eai-sparsify einops natsort simple-parsing
docstring-parser`` and run this script with ``V/bin/python``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import platform
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sae_train.activations import ActivationCache, typical_rows
from sae_train.batches import TensorRows, batch_indices
from sae_train.config import ActivationConfig, DataConfig, SaeConfig, TrainConfig
from sae_train.models import ArchSpec, get_train_architecture
from sae_train.pipeline import build_cache, fingerprint, sites_of
from sae_train.trainer import Trainer, TrainPlan
from steerlib.hf.loading import cache_root, load_model

logger = logging.getLogger("bench.train_throughput")
StepFn = Callable[[int], None]


def _load_cache(site: str, tokens: int) -> ActivationCache:
    cfg = TrainConfig(activations=ActivationConfig(n_tokens=tokens), sae=SaeConfig(input_site=site), data=DataConfig())
    folder = cache_root() / "activations" / f"bench-{site}-{tokens}"
    found = ActivationCache.find(folder, fingerprint(cfg, sites_of(cfg)))
    if found is not None:
        return found
    model, tok = load_model()
    return build_cache(cfg, model, tok, folder)


def _fvu(recon: Callable[[Tensor], Tensor], x_ND: Tensor) -> float:
    with torch.no_grad():
        err = sum(float((recon(c) - c).pow(2).sum()) for c in x_ND.split(2048))
    return err / float((x_ND - x_ND.mean(0)).pow(2).sum())


def _ignore(_: object) -> None:
    return None


def _timed(step: StepFn, steps: int) -> float:
    step(0)  # warm-up, untimed
    t0 = time.perf_counter()
    for i in range(1, steps):
        step(i)
    return time.perf_counter() - t0


def run_sae_train(rows: TensorRows, held: Tensor, args: argparse.Namespace, dtype: str) -> dict[str, Any]:
    d = rows.x_in_ND.shape[1]
    spec = ArchSpec(d_in=d, d_sae=args.expansion * d, d_out=d, k=args.k)
    plan = TrainPlan(steps=args.steps, batch_size=args.batch_size, lr=args.lr, auxk_alpha=args.auxk_alpha,
                     dead_tokens=args.dead_tokens, dtype=dtype, seed=0)  # fmt: skip
    trainer = Trainer(get_train_architecture("topk")(spec), plan, rows)
    secs = _timed(lambda i: _ignore(trainer.train_step()), args.steps)
    sae = trainer.export()
    return {"seconds": secs, "fvu": _fvu(sae, held)}


def _import_sparsify() -> Any:
    spec = importlib.util.find_spec("sparsify")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("sparsify is not installed (pip install --no-deps eai-sparsify, see the docstring)")
    pkg = types.ModuleType("sparsify")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules.setdefault("sparsify", pkg)
    import sparsify.sparse_coder as sc

    return sc


def run_sparsify(rows: TensorRows, held: Tensor, args: argparse.Namespace) -> dict[str, Any]:
    sc = _import_sparsify()
    d = rows.x_in_ND.shape[1]
    torch.manual_seed(0)
    sae = sc.SparseCoder(d, sc.SparseCoderConfig(k=args.k, num_latents=args.expansion * d))
    opt = torch.optim.Adam(sae.parameters(), lr=args.lr)
    n = len(rows)
    since = torch.zeros(sae.num_latents, dtype=torch.long)

    def step(i: int) -> None:
        x, _ = rows.rows(batch_indices(i, args.batch_size, n, 0))
        if i == 0:
            sae.b_dec.data = x.mean(0)  # as sparsify's trainer does on its first batch
        out = sae(x, dead_mask=since > args.dead_tokens)
        (out.fvu + args.auxk_alpha * out.auxk_loss).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        sae.set_decoder_norm_to_unit_norm()
        since.add_(x.shape[0])
        since[out.latent_indices.flatten()] = 0

    secs = _timed(step, args.steps)
    return {"seconds": secs, "fvu": _fvu(lambda x: sae(x).sae_out, held), "version": _version("eai-sparsify")}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--site", default="blocks.15.hook_resid_post")
    p.add_argument("--tokens", type=int, default=65536, help="tokens in the activation cache")
    p.add_argument("--heldout", type=int, default=4096, help="last rows of the cache used for FVU")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4 / (4608 / 16384) ** 0.5)
    p.add_argument("--auxk-alpha", type=float, default=1 / 32)
    p.add_argument("--dead-tokens", type=int, default=1_000_000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-norm-factor", type=float, default=10.0, help="drop massive-activation tokens (all trainers)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "train_throughput.json")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    cache = _load_cache(args.site, args.tokens)
    x = cache.rows(args.site, typical_rows(cache, args.site, args.max_norm_factor))
    train, held = TensorRows(x[: -args.heldout], x[: -args.heldout]), x[-args.heldout :]
    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "sae_train_fp32": lambda: run_sae_train(train, held, args, "float32"),
        "sae_train_bf16": lambda: run_sae_train(train, held, args, "bfloat16"),
        "sparsify_fp32": lambda: run_sparsify(train, held, args),
    }
    results: dict[str, Any] = {}
    for name, fn in runners.items():
        try:
            r = fn()
        except ImportError as e:
            results[name] = {"skipped": str(e)}
            continue
        r["tokens_per_s"] = (args.steps - 1) * args.batch_size / r["seconds"]
        results[name] = r
        print(f"{name:16s} {r['tokens_per_s']:10.0f} tokens/s   FVU {r['fvu']:.4f}")
    results["saelens"] = {"skipped": "sae-lens needs transformer-lens, datasets, plotly, nltk...; not installed here"}
    base = results.get("sparsify_fp32", {}).get("tokens_per_s")
    ratios = {n: r["tokens_per_s"] / base for n, r in results.items() if base and "tokens_per_s" in r}
    for n, v in ratios.items():
        print(f"{n:16s} {v:5.2f}x sparsify")
    report = {"args": {k: str(v) for k, v in vars(args).items()}, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
              "n_train_rows": len(train), "results": results, "ratio_to_sparsify": ratios}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
