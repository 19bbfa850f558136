"""The ``python -m evals.autointerp`` command line: ``index``, ``explain`` and ``summary``.

Flags are parsed by argparse and then validated into the pydantic configs of :mod:`evals.autointerp.config`, which
are also what a JSON config file (``--config``) must match; flags given on the command line win over the file.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from evals.autointerp.config import ExplainConfig, IndexConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m evals.autointerp", description="Automatic feature explanations.")
    p.add_argument("--config", type=Path, default=None, help="JSON file with the subcommand's fields")
    p.add_argument("--log-level", default="INFO")
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("index", help="feature statistics, top contexts and VocabProj of every latent")
    for name, field in IndexConfig.model_fields.items():
        _add(i, name, field)
    e = sub.add_parser("explain", help="explain and score latents with an OpenAI-compatible endpoint")
    for name, field in ExplainConfig.model_fields.items():
        _add(e, name, field)
    s = sub.add_parser("summary", help="mean, median and distribution of the scores")
    s.add_argument("--index", type=Path, required=True)
    return p


def _add(parser: argparse.ArgumentParser, name: str, field: Any) -> None:
    flag = "--" + name.replace("_", "-")
    if field.annotation is bool:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=field.description)
    elif name == "corpus":
        parser.add_argument(flag, nargs="+", default=None, help=field.description)
    else:
        parser.add_argument(flag, default=None, help=field.description)


def _config(args: argparse.Namespace, cls: type[BaseModel]) -> Any:
    data: dict[str, Any] = json.loads(args.config.read_text()) if args.config else {}
    data |= {k: v for k, v in vars(args).items() if k in cls.model_fields and v is not None}
    return cls.model_validate(data)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpx2"):  # one INFO line per request would bury the progress and the warnings
        logging.getLogger(noisy).setLevel(logging.WARNING)
    command: Literal["index", "explain", "summary"] = args.command
    if command == "index":
        return _index(_config(args, IndexConfig))
    if command == "explain":
        return _explain(_config(args, ExplainConfig))
    return _summary(args.index)


def _index(cfg: IndexConfig) -> int:
    import torch

    from evals.autointerp.config import IndexPlan
    from evals.autointerp.index import build_index, chunk_texts
    from steerlib import load_model
    from steerlib.sae import load_sae

    torch.set_num_threads(cfg.threads)
    model, tokenizer = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    sae = load_sae(cfg.sae, device=next(model.parameters()).device)
    plan = IndexPlan.model_validate(cfg.model_dump(include=set(IndexPlan.model_fields)))
    texts = chunk_texts(cfg.corpus, tokenizer, plan)
    name = cfg.model or "SmolLM2-135M-Instruct"
    build_index(
        model, tokenizer, sae, texts, cfg.out, plan=plan, sae_name=str(cfg.sae), model_name=name, sources=cfg.corpus
    )
    return 0


def _explain(cfg: ExplainConfig) -> int:
    from evals.autointerp.explain import run_explain

    run_explain(cfg)
    return 0


def _summary(index: Path) -> int:
    from evals.autointerp.summary import summarize, write_summary

    summary = summarize(index)
    write_summary(summary, index)
    sys.stdout.write(summary.to_text() + "\n")
    return 0
