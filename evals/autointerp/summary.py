"""Summary of an autointerp run: mean, median and histogram of detection and fuzzing, beside the shuffled baseline.

Reads ``explanations.jsonl`` (and ``explanations_shuffled.jsonl`` when present) and writes ``summary.json``.
Null scores are counted, never averaged in. The paired difference (explanation minus shuffled explanation on the
same latent and the same examples) is reported with the fraction of latents where the real explanation wins.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from evals.autointerp.records import BASELINE_FILE, EXPLANATIONS_FILE, SUMMARY_FILE, ExplanationRecord, read_jsonl

BINS = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]


class ScoreStats(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n: int = Field(description="Latents with a score.")
    n_null: int = Field(description="Latents whose score is null (unparseable judge answers or too few examples).")
    mean: float | None = Field(description="Mean score.")
    median: float | None = Field(description="Median score.")
    ci95: tuple[float, float] | None = Field(description="Normal-approximation 95% interval of the mean (n >= 2).")
    histogram: list[int] = Field(description="Counts per bin of BINS (the last bin includes 1.0).")


class Paired(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n: int = Field(description="Latents scored both with their explanation and with a shuffled one.")
    mean_difference: float | None = Field(description="Mean of (explanation - shuffled) over those latents.")
    wins: int = Field(description="Latents where the explanation scored higher than the shuffled one.")
    ties: int = Field(description="Latents where they scored the same.")


class Summary(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n_features: int = Field(description="Lines in explanations.jsonl.")
    explainers: list[str] = Field(description="Explainer models seen.")
    bins: list[float] = Field(default_factory=lambda: list(BINS), description="Histogram bin edges.")
    scores: dict[str, ScoreStats] = Field(description="detection / fuzzing of the explanations.")
    baseline: dict[str, ScoreStats] = Field(description="detection / fuzzing of shuffled explanations (if run).")
    paired: dict[str, Paired] = Field(description="Explanation minus shuffled explanation, per latent.")

    def to_text(self) -> str:
        lines = [f"{self.n_features} features explained by {', '.join(self.explainers) or '-'}"]
        for name, table in (("explanations", self.scores), ("shuffled baseline", self.baseline)):
            for kind, s in table.items():
                mean = "-" if s.mean is None else f"{s.mean:.3f}"
                median = "-" if s.median is None else f"{s.median:.3f}"
                ci = "-" if s.ci95 is None else f"[{s.ci95[0]:.3f}, {s.ci95[1]:.3f}]"
                lines.append(
                    f"{name:18s} {kind:9s} n={s.n:4d} null={s.n_null:4d} mean={mean} ci95={ci} "
                    f"median={median} hist={s.histogram}"
                )
        for kind, p in self.paired.items():
            diff = "-" if p.mean_difference is None else f"{p.mean_difference:+.3f}"
            lines.append(f"paired {kind}: n={p.n} mean(expl - shuffled)={diff} wins={p.wins} ties={p.ties}")
        return "\n".join(lines)


def score_stats(values: Sequence[float | None]) -> ScoreStats:
    got = [v for v in values if v is not None]
    hist = [0] * (len(BINS) - 1)
    for v in got:
        hist[min(int(v * 10), len(hist) - 1)] += 1
    mean = statistics.fmean(got) if got else None
    ci = None
    if mean is not None and len(got) >= 2:
        half = 1.96 * statistics.stdev(got) / len(got) ** 0.5
        ci = (mean - half, mean + half)
    return ScoreStats(
        n=len(got),
        n_null=len(values) - len(got),
        mean=mean,
        median=statistics.median(got) if got else None,
        ci95=ci,
        histogram=hist,
    )


def _paired(real: dict[int, float | None], base: dict[int, float | None]) -> Paired:
    pairs = [(r, b) for f, r in real.items() if r is not None and (b := base.get(f)) is not None]
    diffs = [r - b for r, b in pairs]
    return Paired(
        n=len(pairs),
        mean_difference=statistics.fmean(diffs) if diffs else None,
        wins=sum(d > 0 for d in diffs),
        ties=sum(d == 0 for d in diffs),
    )


def _unique(rows: Iterable[ExplanationRecord]) -> list[ExplanationRecord]:
    """One row per latent, the first written (two runs resumed on the same folder can both finish a latent)."""
    seen: dict[int, ExplanationRecord] = {}
    for r in rows:
        seen.setdefault(r.feature, r)
    return list(seen.values())


def summarize(index: Path) -> Summary:
    path = index / EXPLANATIONS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `python -m evals.autointerp explain` first")
    rows = _unique(read_jsonl(path, ExplanationRecord))
    base_path = index / BASELINE_FILE
    base = _unique(read_jsonl(base_path, ExplanationRecord)) if base_path.is_file() else []
    kinds = ("detection", "fuzzing")
    return Summary(
        n_features=len(rows),
        explainers=sorted({r.explainer for r in rows}),
        scores={k: score_stats([getattr(r, k) for r in rows]) for k in kinds},
        baseline={k: score_stats([getattr(r, k) for r in base]) for k in kinds} if base else {},
        paired={
            k: _paired({r.feature: getattr(r, k) for r in rows}, {r.feature: getattr(r, k) for r in base})
            for k in kinds
        }
        if base
        else {},
    )


def write_summary(summary: Summary, index: Path) -> Path:
    path = index / SUMMARY_FILE
    path.write_text(json.dumps(summary.model_dump(), indent=2) + "\n", encoding="utf-8")
    return path
