"""The files of a feature index folder: the on-disk form of :mod:`steerlib.feature_stats`, plus explanations.

Written by ``python -m evals.autointerp index`` (and ``explain``), read by the feature browser (``servers.browser``):
this module is the contract between them, so neither imports the other.

    meta.json            :class:`IndexMeta`: which SAE, site and model, how many latents and tokens, which texts
    features.jsonl       :class:`FeatureRecord` per latent: frequency, mean/max activation, histogram, top contexts,
                         vocabulary projection (tokens the decoder row promotes and suppresses)
    explanations.jsonl   optional, :class:`ExplanationRecord` per latent: an explanation and its detection / fuzzing
                         scores

The per-latent fields are those of SAE dashboards (Bricken et al., "Towards Monosemanticity", 2023); explanations and
their scores follow Paulo et al., "Automatically Interpreting Millions of Features in LLMs" (arXiv 2410.13928).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)

FEATURES_FILE = "features.jsonl"
META_FILE = "meta.json"
EXPLANATIONS_FILE = "explanations.jsonl"


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class IndexMeta(_Record):
    """``meta.json``."""

    sae: str = Field(description="The SAE folder indexed.")
    site: str = Field(description="TransformerLens site the SAE reads, e.g. blocks.3.hook_resid_post.")
    model: str = Field(description="The model run (name or folder).")
    d_sae: int = Field(ge=1, description="Number of latents.")
    n_tokens: int = Field(ge=0, description="Tokens read.")
    sources: list[str] = Field(description="Text sources (held-out split where the source is a registry corpus).")


class Histogram(_Record):
    edges: list[float] = Field(description="Bin edges of non-zero activations (len(counts) + 1).")
    counts: list[int] = Field(description="Number of non-zero activations in each bin.")


class TokenContext(_Record):
    tokens: list[str] = Field(description="The context, decoded one token at a time.")
    activations: list[float] = Field(description="The latent's activation on each token.")


class FeatureRecord(_Record):
    """One line of ``features.jsonl``."""

    feature: int = Field(ge=0, description="Latent index.")
    frequency: float = Field(description="Fraction of indexed tokens on which the latent is > 0.")
    mean_activation: float = Field(description="Mean activation over all indexed tokens (zeros included).")
    max_activation: float = Field(description="Largest activation seen.")
    histogram: Histogram = Field(description="Histogram of the non-zero activations.")
    top_contexts: list[TokenContext] = Field(description="Contexts around the top activations, largest first.")
    vocab_top: list[tuple[str, float]] = Field(description="Tokens the decoder row promotes most (unembedding).")
    vocab_bottom: list[tuple[str, float]] = Field(description="Tokens the decoder row suppresses most.")


class ExplanationRecord(_Record):
    """One line of ``explanations.jsonl``."""

    feature: int = Field(ge=0, description="Latent index.")
    explanation: str = Field(description="The explainer's description of the latent.")
    detection: float | None = Field(description="Detection balanced accuracy; null when the judge was unparseable.")
    fuzzing: float | None = Field(description="Fuzzing balanced accuracy; null when the judge was unparseable.")
    explainer: str = Field(description="The model that wrote the explanation (or its provenance for baselines).")
    n_examples: int = Field(ge=0, description="Contexts shown to the explainer.")


R = TypeVar("R", bound=BaseModel)


def read_jsonl(path: Path, cls: type[R]) -> Iterator[R]:
    """Validated rows of ``path``; a torn last line (a killed writer) is skipped with a warning.

    Any other bad line raises ``ValueError`` naming the file, the line and the field.
    """
    lines = path.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield cls.model_validate_json(line)
        except ValueError as e:
            if n == len(lines):
                log.warning("%s: skipping an unfinished last line (%s)", path, str(e).splitlines()[0])
                continue
            raise ValueError(f"{path}:{n}: not a valid {cls.__name__} row: {e}") from e
