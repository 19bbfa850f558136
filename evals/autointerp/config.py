"""The configs of ``python -m evals.autointerp index`` and ``explain``: pydantic models (``extra="forbid"``) that the
command line's flags and a JSON config file (``--config``) are both validated into; and the latent selection syntax.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from sae_train.config import DEFAULT_SOURCES
from steerlib.devices import DEVICE_HELP, DTYPE_HELP, DtypeName, check_device_name, dtype_name


class IndexPlan(BaseModel):
    """How much an index reads and keeps (the one definition of these fields: ``IndexConfig`` extends it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tokens: int = Field(200_000, gt=0, description="Tokens to read (whole chunks: approximately).")
    chunk_tokens: int = Field(128, gt=0, description="Tokens per text chunk (documents are cut into such chunks).")
    top_k: int = Field(20, gt=0, description="Max-activating contexts kept per latent.")
    window: int = Field(8, ge=0, description="Tokens kept each side of a context's peak.")
    n_random: int = Field(400, ge=0, description="Random contexts kept for detection's non-activating examples.")
    vocab_k: int = Field(10, gt=0, description="Vocabulary tokens kept per latent (VocabProj, promoted and demoted).")
    heldout_fraction: float = Field(0.05, gt=0, le=1, description="Held-out fraction used when the SAE was trained.")
    batch_size: int = Field(8, gt=0, description="Chunks per forward pass.")
    seed: int = Field(0, description="Seed of the random-context pool.")


class IndexConfig(IndexPlan):
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
