"""The ``python -m evals.autointerp`` command line: ``index``, ``explain`` and ``summary``.

Flags are parsed by argparse and then validated into pydantic configs (``extra="forbid"``), which are also what a
JSON config file (``--config``) must match; flags given on the command line win over the file.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from steerlib.devices import DEVICE_HELP, DTYPE_HELP, DtypeName, check_device_name, dtype_name

logger = logging.getLogger("evals.autointerp")

DEFAULT_SOURCES = ["corpus:sotu", "corpus:moby-dick", "corpus:shakespeare", "corpus:python-docs"]


class IndexConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sae: Path = Field(description="SAE folder (steerlib, SAELens or sparsify layout).")
    out: Path = Field(description="Output folder for features.jsonl, random_contexts.jsonl and meta.json.")
    model: str | None = Field(None, description="Model folder or hub id; None = the embedded SmolLM2-135M-Instruct.")
    device: Annotated[str, AfterValidator(check_device_name)] = Field(
        "auto", description=f"Where the model and the SAE run: {DEVICE_HELP}."
    )
    dtype: Annotated[DtypeName, BeforeValidator(dtype_name)] = Field(
        "auto", description=f"The model's dtype (the SAE keeps its own): {DTYPE_HELP}."
    )
    corpus: list[str] = Field(
        default_factory=lambda: list(DEFAULT_SOURCES),
        description="Text sources; registry corpora are read on their held-out split.",
    )
    tokens: int = Field(200_000, gt=0, description="Tokens to read.")
    top_k: int = Field(20, gt=0, description="Max-activating contexts kept per latent.")
    window: int = Field(8, ge=0, description="Tokens kept each side of a context's peak.")
    n_random: int = Field(400, ge=0, description="Random contexts kept for detection's non-activating examples.")
    heldout_fraction: float = Field(0.05, gt=0, le=1, description="Held-out fraction used when the SAE was trained.")
    threads: int = Field(1, gt=0, description="torch threads.")


class ExplainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    index: Path = Field(description="Folder written by `index`; explanations.jsonl is written there too.")
    endpoint: str = Field(description="OpenAI-compatible base URL, e.g. http://127.0.0.1:8011/v1.")
    model: str = Field(description="Model name sent to the endpoint (explainer and judge).")
    judge_model: str | None = Field(None, description="A different model for the judge (default: --model).")
    api_key: str = Field("not-needed", description="Bearer key for the endpoint.")
    features: str = Field("0-199", description="Latents: 'all', a range '0-199', or a list '1,5,9' (mixable).")
    concurrency: int = Field(4, gt=0, description="Features processed at once (requests in flight).")
    n_explain: int = Field(10, gt=0, description="Top contexts shown to the explainer (even-ranked ones).")
    n_score: int = Field(5, gt=0, description="Examples per class for detection and for fuzzing.")
    min_contexts: int = Field(4, gt=0, description="Latents with fewer top contexts are skipped (logged).")
    shuffled_baseline: bool = Field(True, description="Also score each latent with another latent's explanation.")
    retries: int = Field(4, ge=0, description="Retries of a failed request (exponential backoff).")
    timeout: float = Field(120.0, gt=0, description="Seconds per request.")
    seed: int = Field(0, description="Seed for example sampling, fuzzing highlights and the baseline shuffle.")

    @field_validator("endpoint")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"endpoint must be an http(s) URL like http://127.0.0.1:8011/v1, got {v!r}")
        return v.rstrip("/")


def parse_features(spec: str, d_sae: int) -> list[int]:
    """'all', 'A-B' (inclusive) and 'i' items, comma-separated, checked against ``d_sae``."""
    if spec.strip() == "all":
        return list(range(d_sae))
    out: list[int] = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        try:
            lo, _, hi = item.partition("-")
            span = range(int(lo), int(hi or lo) + 1)
        except ValueError:
            raise ValueError(f"features: cannot read {item!r}; use 'all', 'A-B' or 'i' (comma-separated)") from None
        if not span or span.start < 0 or span.stop > d_sae:
            raise ValueError(f"features: {item!r} out of range: the SAE has {d_sae} latents (0..{d_sae - 1})")
        out.extend(span)
    return sorted(set(out))


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

    from evals.autointerp.index import IndexPlan, build_index, chunk_texts
    from steerlib import load_model
    from steerlib.sae import load_sae

    torch.set_num_threads(cfg.threads)
    model, tokenizer = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    sae = load_sae(cfg.sae, device=next(model.parameters()).device)
    plan = IndexPlan(
        tokens=cfg.tokens,
        top_k=cfg.top_k,
        window=cfg.window,
        n_random=cfg.n_random,
        heldout_fraction=cfg.heldout_fraction,
    )
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
