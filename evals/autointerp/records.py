"""The files of an autointerp run: the feature index's (``steerlib.feature_index``, shared with the feature browser)
plus this package's own.

``OUT/features.jsonl`` (:class:`FeatureRecord`, one line per latent), ``OUT/meta.json`` (:class:`IndexMeta`) and
``OUT/explanations.jsonl`` (:class:`ExplanationRecord`) are the feature index; ``OUT/random_contexts.jsonl``
(:class:`RandomContext`: the non-activating pool for detection scoring), the shuffled-explanation baseline and the
summary are autointerp's.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from steerlib.feature_index import (
    EXPLANATIONS_FILE,
    FEATURES_FILE,
    META_FILE,
    ExplanationRecord,
    FeatureRecord,
    Histogram,
    IndexMeta,
    TokenContext,
    read_jsonl,
)

RANDOM_FILE = "random_contexts.jsonl"
BASELINE_FILE = "explanations_shuffled.jsonl"
SUMMARY_FILE = "summary.json"

__all__ = [
    "BASELINE_FILE",
    "EXPLANATIONS_FILE",
    "FEATURES_FILE",
    "META_FILE",
    "RANDOM_FILE",
    "SUMMARY_FILE",
    "ExplanationRecord",
    "FeatureRecord",
    "Histogram",
    "IndexMeta",
    "RandomContext",
    "TokenContext",
    "read_jsonl",
    "read_meta",
]


class RandomContext(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tokens: list[str] = Field(description="A context at a uniformly drawn position of the indexed text.")
    active: list[list[int]] = Field(description="For each token, the latents active (> 0) on it.")


def read_meta(index: Path) -> IndexMeta:
    path = index / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: build the index first (python -m evals.autointerp index)")
    return IndexMeta.model_validate(json.loads(path.read_text(encoding="utf-8")))
