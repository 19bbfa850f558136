"""A feature index folder as the browser reads it, and search over it.

The folder is written by ``python -m evals.autointerp index``; its file formats are ``steerlib.feature_index``'s
(``servers`` never imports ``evals``). The browser reads them strictly: any bad line, the last one included, is an
error naming the file and line, so a half-written index is never served as if complete.
"""

from __future__ import annotations

import json
import logging
import lzma
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from pydantic import BaseModel, ValidationError

from servers.registry import check_name
from steerlib.feature_index import EXPLANATIONS_FILE, FEATURES_FILE, META_FILE, FeatureRecord, IndexMeta
from steerlib.feature_index import ExplanationRecord as Explanation
from steerlib.sites import parse_site

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)


class FeatureIndexError(ValueError):
    """A feature index folder that cannot be served; the message names the file and what is wrong."""


class Hit(NamedTuple):
    feature: int
    score: float
    matched: list[str]
    """Which fields matched: explanation, context, vocab."""


@dataclass(frozen=True)
class FeatureIndex:
    """One index folder, loaded whole (a few MB even for tens of thousands of latents)."""

    name: str
    folder: Path
    meta: IndexMeta
    sae_path: Path
    layer: int
    site: str
    """Short site name (resid_post, ...) for a steering op at ``layer``."""
    features: dict[int, FeatureRecord]
    explanations: dict[int, Explanation]

    def check_feature(self, feature: int) -> None:
        if not 0 <= feature < self.meta.d_sae:
            raise FeatureIndexError(
                f"feature {feature} out of range: index {self.name!r} has {self.meta.d_sae} latents "
                f"(0..{self.meta.d_sae - 1})"
            )

    def summary(self, feature: int) -> dict[str, Any]:
        rec, expl = self.features.get(feature), self.explanations.get(feature)
        return {
            "feature": feature,
            "explanation": expl.explanation if expl else None,
            "frequency": rec.frequency if rec else 0.0,
            "max_activation": rec.max_activation if rec else 0.0,
        }

    def search(self, query: str, limit: int) -> list[Hit]:
        """Latents whose explanation contains ``query`` (case-insensitive), or one of whose top-context tokens or
        promoted vocabulary tokens equals it (ignoring surrounding spaces), best first.

        Score: 2 for an explanation match, plus the strongest matching context token's activation relative to the
        latent's max (0..1), plus 0.5 for a vocabulary match; ties go to the more frequent latent. An empty query
        lists the most frequent latents.
        """
        q = query.strip().lower()
        hits: list[Hit] = []
        for f, rec in self.features.items():
            if not q:
                hits.append(Hit(f, 0.0, []))
                continue
            matched, score = [], 0.0
            expl = self.explanations.get(f)
            if expl is not None and q in expl.explanation.lower():
                matched.append("explanation")
                score += 2.0
            ctx = _context_match(rec, q)
            if ctx > 0:
                matched.append("context")
                score += ctx
            if any(tok.strip().lower() == q for tok, _ in rec.vocab_top):
                matched.append("vocab")
                score += 0.5
            if matched:
                hits.append(Hit(f, score, matched))
        hits.sort(key=lambda h: (-h.score, -self.features[h.feature].frequency, h.feature))
        return hits[:limit]


def _context_match(rec: FeatureRecord, q: str) -> float:
    best = 0.0
    for row in rec.top_contexts:
        for tok, act in zip(row.tokens, row.activations, strict=False):
            if act > best and tok.strip().lower() == q:
                best = act
    if best <= 0:
        return 0.0
    return min(best / rec.max_activation, 1.0) if rec.max_activation > 0 else 1.0


def load_index(folder: Path) -> FeatureIndex:
    """Read and check one index folder; the index is named after the folder."""
    folder = folder.resolve()
    if not folder.is_dir():
        raise FeatureIndexError(f"feature index folder not found: {folder}")
    name = check_name(folder.name, "feature index")
    meta_file = folder / META_FILE
    if not meta_file.is_file():
        raise FeatureIndexError(
            f"{folder}: no meta.json (is it a folder written by `python -m evals.autointerp index`?)"
        )
    meta = _parse(IndexMeta, meta_file, meta_file.read_text())
    layer, site = parse_site(meta.site)
    if layer is None:
        raise FeatureIndexError(
            f"{folder / 'meta.json'}: site {meta.site!r} names no layer (want blocks.<L>.hook_<site>)"
        )
    features = {r.feature: r for r in _lines(FeatureRecord, folder / FEATURES_FILE, required=True)}
    explanations = {e.feature: e for e in _lines(Explanation, folder / EXPLANATIONS_FILE, required=False)}
    for f in [*features, *explanations]:
        if f >= meta.d_sae:
            raise FeatureIndexError(f"{folder}: feature {f} out of range for d_sae={meta.d_sae}")
    index = FeatureIndex(name, folder, meta, _sae_path(folder, meta.sae), layer, site, features, explanations)
    log.info(
        "feature index %r: %d latents, %d explained, SAE %s", name, len(features), len(explanations), index.sae_path
    )
    return index


def load_indexes(folders: list[Path]) -> dict[str, FeatureIndex]:
    out: dict[str, FeatureIndex] = {}
    for folder in folders:
        index = load_index(folder)
        if index.name in out:
            raise FeatureIndexError(
                f"two feature indexes are named {index.name!r} ({out[index.name].folder}, {folder})"
            )
        out[index.name] = index
    return out


def _sae_path(folder: Path, sae: str) -> Path:
    """``meta.sae`` as written: absolute, or relative to the index folder, else to the working directory."""
    given = Path(sae)
    candidates = [given] if given.is_absolute() else [folder / given, Path.cwd() / given]
    for c in candidates:
        if c.exists():
            return c.resolve()
    tried = ", ".join(str(c) for c in candidates)
    raise FeatureIndexError(f"{folder / 'meta.json'}: SAE {sae!r} not found (tried {tried})")


def _parse(cls: type[M], path: Path, text: str, line: int | None = None) -> M:
    where = f"{path}" + (f" line {line}" if line is not None else "")
    try:
        return cls.model_validate(json.loads(text))
    except json.JSONDecodeError as e:
        raise FeatureIndexError(f"{where}: not JSON ({e})") from e
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "(root)"
        raise FeatureIndexError(f"{where}: {loc}: {first['msg']}") from e


def _lines(cls: type[M], path: Path, *, required: bool) -> list[M]:
    """The records of a JSON-lines file, or of its xz-compressed copy ``<name>.xz`` (how the shipped index travels)."""
    packed = path.with_name(path.name + ".xz")
    if not path.is_file() and not packed.is_file():
        if required:
            raise FeatureIndexError(f"{path} not found (nor {packed.name})")
        return []
    with path.open() if path.is_file() else lzma.open(packed, "rt") as fh:
        return [_parse(cls, path, text, i) for i, text in enumerate(fh, 1) if text.strip()]
