"""Training throughput and quality of sae_train vs EleutherAI's sparsify and SAELens, side by side in one run.

All trainers read the same activations (an sae_train activation cache of the embedded model: built on first use, or
an existing cache folder given with ``--cache``), see the same batches in the same order, and train the same
architecture and size (TopK, k=32, 8x expansion by default) with Adam at the same learning rate and AuxK weight.
The trainers take turns, batch by batch, in one process, so that on a shared machine they run under the same load.
Reported per trainer: tokens/s over the timed steps (the first step is warm-up and not timed, nor are the
evaluations) and the FVU on held-out rows of the cache after the same numbers of tokens (``--eval-at`` and the last
step). The torch thread count is set and recorded; the ratios are the figures to read. ``--device`` / ``--dtype`` say
where and in which dtype the model harvests the bench's own cache; ``--train-device`` (default: the CPU) where
sae_train and sparsify train (the rows reach it through pinned memory; SAELens' trainer stays on the CPU), so that
the ratios compare like with like on one device (``bench/gpu_check.py`` runs them on CUDA).

    PYTHONPATH=. V/bin/python bench/train_throughput.py --steps 300 --eval-at 40,100 \
        --cache ~/.cache/steerlib/activations/<folder> --out bench/results/train_throughput.json

sparsify is imported without its package ``__init__`` (which pulls ``datasets`` for its own trainer): only
``sparsify.sparse_coder`` is loaded, and its training step (``fvu + auxk_alpha * auxk_loss``, gradient projection,
unit-norm decoder, ``b_dec`` = mean of the first batch) is reproduced from ``sparsify/trainer.py``.
SAELens (``sae-lens``) trains its own ``TopKTrainingSAE`` with its defaults (decoder rows of norm 0.1, encoder =
decoder transpose, activations scaled by decoder norms, ``b_dec`` = 0) and its ``expected_average_only_in`` input
scaling, through ``SAETrainer.step`` (its scaling, loss, AuxK, gradient clipping and Adam step); only its
``ActivationsStore`` and model are replaced by the same batches.
Install both apart from the project environment::

    python -m venv --system-site-packages V && V/bin/pip install --no-deps eai-sparsify einops natsort \
        simple-parsing docstring-parser && V/bin/pip install sae-lens torch==<the installed torch>

and run this script with ``V/bin/python``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import logging
import platform
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor
from tqdm import tqdm

from sae_train.activations import ActivationCache, typical_rows
from sae_train.batches import TensorRows, batch_indices
from sae_train.config import ActivationConfig, DataConfig, OptimConfig, SaeConfig, TrainConfig
from sae_train.models import build_train_sae
from sae_train.pipeline import build_cache, fingerprint, sites_of
from sae_train.trainer import Trainer
from steerlib.devices import add_device_arguments, hardware_info, resolve_device
from steerlib.hf.loading import cache_root, load_model

logger = logging.getLogger("bench.train_throughput")
StepFn = Callable[[int], None]


def _load_rows(args: argparse.Namespace) -> Tensor:
    """Training and held-out rows (massive-activation tokens left out), from ``--cache`` or the bench's own cache."""
    if args.cache is not None:
        cache = ActivationCache(args.cache)
    else:
        cfg = TrainConfig(activations=ActivationConfig(n_tokens=args.tokens), sae=SaeConfig(input_site=args.site),
                          data=DataConfig(), device=args.device, dtype=args.dtype)  # fmt: skip
        folder = cache_root() / "activations" / f"bench-{args.site}-{args.tokens}"
        found = ActivationCache.find(folder, fingerprint(cfg, sites_of(cfg)))
        if found is None:
            model, tok = load_model(device=cfg.device, dtype=cfg.dtype)
            found = build_cache(cfg, model, tok, folder)
        cache = found
    return cache.rows(args.site, typical_rows(cache, args.site, args.max_norm_factor))


def _fvu(recon: Callable[[Tensor], Tensor], x_ND: Tensor) -> float:
    with torch.no_grad():
        err = sum(float((recon(c) - c).pow(2).sum()) for c in x_ND.split(2048))
    return err / float((x_ND - x_ND.mean(0)).pow(2).sum())


class Contestant(NamedTuple):
    step: StepFn
    """Trains on global batch ``i``."""
    recon: Callable[[], Callable[[Tensor], Tensor]]
    """The SAE as it is now, as a function raw activations -> reconstruction."""
    info: dict[str, Any]


def race(contestants: dict[str, Contestant], held: Tensor, steps: int, marks: list[int]) -> dict[str, Any]:
    """Steps every trainer in turn, batch by batch (so they share the machine's load alike), timing steps 1..steps-1
    (step 0 is warm-up); FVU on ``held`` after each step in ``marks`` (not timed)."""
    seconds = dict.fromkeys(contestants, 0.0)
    fvu_at: dict[str, dict[int, float]] = {n: {} for n in contestants}
    for i in tqdm(range(steps), desc="steps", unit="step"):
        for name, c in contestants.items():
            t0 = time.perf_counter()
            c.step(i)
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # a GPU step is timed to its end, not to its launch
            seconds[name] += time.perf_counter() - t0 if i else 0.0
            if i + 1 in marks:
                fvu_at[name][i + 1] = _fvu(c.recon(), held)
    return {n: {**c.info, "seconds": seconds[n], "fvu": fvu_at[n][steps], "fvu_at_step": fvu_at[n]}
            for n, c in contestants.items()}  # fmt: skip


def sae_train_contestant(
    rows: TensorRows, args: argparse.Namespace, dtype: Literal["float32", "bfloat16"]
) -> Contestant:
    d = rows.x_in_ND.shape[1]
    sae = SaeConfig(architecture="topk", input_site=args.site, d_sae=args.expansion * d, k=args.k)
    optim = OptimConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, auxk_alpha=args.auxk_alpha,
                        dead_tokens=args.dead_tokens, dtype=dtype, seed=0, warmup_steps=0, decay_fraction=0.0,
                        sparsity_coefficient=0.0)  # fmt: skip
    dev = args.train_device
    trainer = Trainer(build_train_sae(sae, d, d), optim, rows, device=dev)

    def recon() -> Callable[[Tensor], Tensor]:
        exported = trainer.export()
        return lambda x: exported(x.to(dev)).to(x.device)

    return Contestant(lambda i: _ignore(trainer.train_step()), recon, {"device": str(dev)})


def _ignore(_: object) -> None:
    return None


def _import_sparsify() -> Any:
    spec = importlib.util.find_spec("sparsify")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("sparsify is not installed (pip install --no-deps eai-sparsify, see the docstring)")
    pkg = types.ModuleType("sparsify")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules.setdefault("sparsify", pkg)
    import sparsify.sparse_coder as sc

    return sc


def sparsify_contestant(rows: TensorRows, args: argparse.Namespace) -> Contestant:
    sc = _import_sparsify()
    d = rows.x_in_ND.shape[1]
    torch.manual_seed(0)
    dev = args.train_device
    sae = sc.SparseCoder(d, sc.SparseCoderConfig(k=args.k, num_latents=args.expansion * d), device=dev)
    opt = torch.optim.Adam(sae.parameters(), lr=args.lr)
    n = len(rows)
    since = torch.zeros(sae.num_latents, dtype=torch.long, device=dev)

    def step(i: int) -> None:
        x, _ = rows.rows(batch_indices(i, args.batch_size, n, 0))
        x = x.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else x
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

    def recon() -> Callable[[Tensor], Tensor]:
        return lambda x: sae(x.to(dev)).sae_out.to(x.device)

    return Contestant(step, recon, {"version": _version("eai-sparsify"), "device": str(dev)})


def saelens_contestant(rows: TensorRows, args: argparse.Namespace, autocast: bool) -> Contestant:
    try:
        from sae_lens.config import SAETrainerConfig
        from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
        from sae_lens.training.sae_trainer import SAETrainer
    except ImportError as e:
        raise ImportError(f"sae-lens is not importable ({e}); install it as the docstring says") from e
    d = rows.x_in_ND.shape[1]
    torch.manual_seed(0)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=args.expansion * d, k=args.k,
                                                aux_loss_coefficient=args.auxk_alpha,
                                                normalize_activations="expected_average_only_in"))  # fmt: skip
    trainer = SAETrainer(
        SAETrainerConfig(total_training_samples=args.steps * args.batch_size, train_batch_size_samples=args.batch_size,
                         lr=args.lr, lr_end=args.lr, dead_feature_window=args.dead_tokens // args.batch_size,
                         autocast=autocast),
        sae, data_provider=iter(()),
    )  # fmt: skip
    n = len(rows)
    # the scale SAETrainer.fit estimates (mean norm -> sqrt(d)), from the rows sae_train's init reads
    sample = rows.rows(torch.randperm(n, generator=torch.Generator().manual_seed(0))[:4096])[0]
    trainer.activation_scaler.estimate_scaling_factor(d, iter([sample]), n_batches_for_norm_estimate=1)
    scaler = trainer.activation_scaler

    def step(i: int) -> None:
        x, _ = rows.rows(batch_indices(i, args.batch_size, n, 0))
        trainer.step(x)  # SAELens' own step: scaling, loss, AuxK, backward, grad clipping, Adam, LR schedule
        trainer.n_training_steps += 1

    def recon() -> Callable[[Tensor], Tensor]:
        def f(x: Tensor) -> Tensor:
            out: Tensor = scaler.unscale(sae(scaler.scale(x)))
            return out

        return f

    return Contestant(
        step, recon, {"version": _version("sae-lens"), "normalize_activations": "expected_average_only_in"}
    )


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


TRAINERS = ("sae_train_fp32", "sae_train_bf16", "sparsify_fp32", "saelens_fp32", "saelens_bf16")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--site", default="blocks.15.hook_resid_post")
    p.add_argument("--cache", type=Path, default=None, help="an existing sae_train activation cache folder to read")
    p.add_argument("--tokens", type=int, default=65536, help="tokens in the bench's own cache (without --cache)")
    p.add_argument("--heldout", type=int, default=4096, help="last rows of the cache used for FVU")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-at", type=lambda s: [int(v) for v in s.split(",") if v], default=[40, 100],
                   help="also report FVU after these steps (comma-separated)")  # fmt: skip
    p.add_argument("--trainers", type=lambda s: s.split(","), default=list(TRAINERS), help=",".join(TRAINERS))
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4 / (4608 / 16384) ** 0.5)
    p.add_argument("--auxk-alpha", type=float, default=1 / 32)
    p.add_argument("--dead-tokens", type=int, default=1_000_000)
    p.add_argument("--threads", type=int, default=1)
    add_device_arguments(p, what="the model that harvests the bench's own cache")
    p.add_argument("--train-device", default="cpu", help="where sae_train and sparsify train (cpu, cuda, cuda:N)")
    p.add_argument("--max-norm-factor", type=float, default=10.0, help="drop massive-activation tokens (all trainers)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "train_throughput.json")
    args = p.parse_args()
    args.train_device = resolve_device(args.train_device)
    unknown = sorted(set(args.trainers) - set(TRAINERS))
    if unknown:
        p.error(f"--trainers: unknown {unknown}; choose from {list(TRAINERS)}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    x = _load_rows(args)
    train, held = TensorRows(x[: -args.heldout], x[: -args.heldout]), x[-args.heldout :]
    makers: dict[str, Callable[[], Contestant]] = {
        "sae_train_fp32": lambda: sae_train_contestant(train, args, "float32"),
        "sae_train_bf16": lambda: sae_train_contestant(train, args, "bfloat16"),
        "sparsify_fp32": lambda: sparsify_contestant(train, args),
        "saelens_fp32": lambda: saelens_contestant(train, args, autocast=False),
        "saelens_bf16": lambda: saelens_contestant(train, args, autocast=True),
    }
    skipped: dict[str, Any] = {}
    contestants: dict[str, Contestant] = {}
    for name in args.trainers:
        try:
            contestants[name] = makers[name]()
        except ImportError as e:
            skipped[name] = {"skipped": str(e)}
            logger.warning("%s skipped: %s", name, e)
    marks = sorted({m for m in args.eval_at if 0 < m < args.steps} | {args.steps})
    results = race(contestants, held, args.steps, marks)
    for name, r in results.items():
        r["tokens_per_s"] = (args.steps - 1) * args.batch_size / r["seconds"]
        fvus = "  ".join(f"@{s}: {v:.4f}" for s, v in r["fvu_at_step"].items())
        print(f"{name:16s} {r['tokens_per_s']:8.0f} tokens/s   FVU {fvus}")
    for key, rs in _write(args, len(train), {**results, **skipped}).items():
        for n, v in rs.items():
            print(f"{n:16s} {v:5.2f}x {key[9:]} tokens/s")
    print(f"wrote {args.out}")


def _write(args: argparse.Namespace, n_train: int, results: dict[str, Any]) -> dict[str, dict[str, float]]:
    ratios = {f"ratio_to_{base}": _ratios(results, base) for base in ("sparsify_fp32", "saelens_fp32", "saelens_bf16")}
    report = {"args": {k: str(v) for k, v in vars(args).items()}, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
              "hardware": hardware_info(args.train_device),  # where the timed trainers run
              "n_train_rows": n_train, "results": results, **ratios}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return ratios


def _ratios(results: dict[str, Any], base: str) -> dict[str, float]:
    ref = results.get(base, {}).get("tokens_per_s")
    return {n: r["tokens_per_s"] / ref for n, r in results.items() if ref and "tokens_per_s" in r}


if __name__ == "__main__":
    main()
