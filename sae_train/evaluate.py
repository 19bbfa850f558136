"""Measure any SAE on a training config's held-out domains: the same numbers as a run's ``eval.json``.

    python -m sae_train.evaluate CONFIG.yaml SAE_FOLDER [--out EVAL.json] [--contexts N] [--domains D ...]
        [--note TEXT]

``CONFIG`` supplies the model, the sources, ``data.eval_domains``, the held-out split and ``run.eval_contexts``;
``SAE_FOLDER`` is anything ``steerlib.load_sae`` reads (a release folder included). This is how a release's
``eval.json`` is measured on the weights it ships (bf16), and how an older SAE is compared on a newer mix.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from sae_train.checkpoint import atomic_write_bytes
from sae_train.config import TrainConfig
from sae_train.pipeline import evaluate_domains
from steerlib.devices import resolve_device
from steerlib.hf.loading import load_model
from steerlib.sae import load_sae


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", type=Path, help="training config whose held-out domains to measure on")
    p.add_argument("sae", type=Path, help="SAE folder (steerlib.load_sae)")
    p.add_argument("--out", type=Path, default=None, help="write the report here (JSON)")
    p.add_argument("--contexts", type=int, default=None, help="held-out contexts per domain (default: the config's)")
    p.add_argument("--domains", nargs="*", default=None, help="only these of the config's eval_domains")
    p.add_argument("--note", default=None, help="free text stored in the report (e.g. which weights)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = TrainConfig.from_file(args.config)
    if args.contexts is not None:
        cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"eval_contexts": args.contexts})})
    if args.domains:
        chosen = cfg.data.eval_domains or {}
        unknown = sorted(set(args.domains) - set(chosen))
        if unknown:
            raise SystemExit(f"unknown domains {unknown}; the config has {sorted(chosen)}")
        data = cfg.data.model_copy(update={"eval_domains": {k: chosen[k] for k in args.domains}})
        cfg = cfg.model_copy(update={"data": data})
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    t0 = time.perf_counter()
    model, tok = load_model(cfg.model, device=resolve_device(cfg.device), dtype=cfg.dtype)
    sae = load_sae(args.sae).to(next(model.parameters()).device)
    _, report = evaluate_domains(cfg, model, tok, sae)
    report = {**report, "sae": str(args.sae), "eval_seconds": round(time.perf_counter() - t0, 1)}
    if args.note:
        report["note"] = args.note
    text = json.dumps(report, indent=2) + "\n"
    if args.out is not None:
        atomic_write_bytes(args.out, text.encode())
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
