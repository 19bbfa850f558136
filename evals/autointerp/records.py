"""The files of an autointerp run, as pydantic models: what ``index`` writes and ``explain`` / ``summary`` read.

``OUT/features.jsonl`` (:class:`FeatureRecord`, one line per latent), ``OUT/meta.json`` (:class:`IndexMeta`),
``OUT/random_contexts.jsonl`` (:class:`RandomContext`: the non-activating pool for detection scoring) and
``OUT/explanations.jsonl`` (:class:`ExplanationRecord`). Field names are a contract with the feature browser.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field

logger = logging.getLogger(__name__)

FEATURES_FILE = "features.jsonl"
META_FILE = "meta.json"
RANDOM_FILE = "random_contexts.jsonl"
EXPLANATIONS_FILE = "explanations.jsonl"
BASELINE_FILE = "explanations_shuffled.jsonl"
SUMMARY_FILE = "summary.json"


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Histogram(_Record):
    edges: list[float] = Field(description="Bin edges of non-zero activations (len(counts) + 1).")
    counts: list[int] = Field(description="Number of non-zero activations in each bin.")


class TokenContext(_Record):
    tokens: list[str] = Field(description="The context, decoded one token at a time.")
    activations: list[float] = Field(description="The latent's activation on each token.")


class FeatureRecord(_Record):
    feature: int = Field(description="Latent index.")
    frequency: float = Field(description="Fraction of indexed tokens on which the latent is > 0.")
    mean_activation: float = Field(description="Mean activation over all indexed tokens (zeros included).")
    max_activation: float = Field(description="Largest activation seen.")
    histogram: Histogram = Field(description="Histogram of the non-zero activations.")
    top_contexts: list[TokenContext] = Field(description="Contexts around the top activations, largest first.")
    vocab_top: list[tuple[str, float]] = Field(description="Tokens the decoder row promotes most (unembedding).")
    vocab_bottom: list[tuple[str, float]] = Field(description="Tokens the decoder row suppresses most.")


class IndexMeta(_Record):
    sae: str = Field(description="The SAE folder indexed.")
    site: str = Field(description="TransformerLens site the SAE reads.")
    model: str = Field(description="The model run (name or folder).")
    d_sae: int = Field(description="Number of latents.")
    n_tokens: int = Field(description="Tokens read.")
    sources: list[str] = Field(description="Text sources (held-out split where the source is a registry corpus).")


class RandomContext(_Record):
    tokens: list[str] = Field(description="A context at a uniformly drawn position of the indexed text.")
    active: list[list[int]] = Field(description="For each token, the latents active (> 0) on it.")


class ExplanationRecord(_Record):
    feature: int = Field(description="Latent index.")
    explanation: str = Field(description="The explainer's description of the latent.")
    detection: float | None = Field(description="Detection balanced accuracy; null when the judge was unparseable.")
    fuzzing: float | None = Field(description="Fuzzing balanced accuracy; null when the judge was unparseable.")
    explainer: str = Field(description="The model that wrote the explanation (or its provenance for baselines).")
    n_examples: int = Field(description="Contexts shown to the explainer.")


R = TypeVar("R", bound=BaseModel)


def read_jsonl(path: Path, cls: type[R]) -> Iterator[R]:
    """Validated rows of ``path``; a torn last line (a killed writer) is skipped with a warning."""
    lines = path.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield cls.model_validate_json(line)
        except ValueError as e:
            if n == len(lines):
                logger.warning("%s: skipping an unfinished last line (%s)", path, str(e).splitlines()[0])
                continue
            raise ValueError(f"{path}:{n}: not a valid {cls.__name__} row: {e}") from e


def read_meta(index: Path) -> IndexMeta:
    path = index / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: build the index first (python -m evals.autointerp index)")
    return IndexMeta.model_validate(json.loads(path.read_text(encoding="utf-8")))
