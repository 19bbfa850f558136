"""Run a refusal eval: prompt sets x steering arms on one target, judged, scored for coherence, summarised.

An *arm* is a named steering (a config, preset names, or none) with the coefficient it was swept at and, for a
control, the arm it controls. Every generation becomes one :class:`Row` (written as JSONL by :mod:`evals.report`);
:func:`summarise` turns rows into refusal rates with Wilson 95% intervals, where a refusal found in degenerate text
(:mod:`evals.coherence`) is counted apart from coherent refusals and never as a success.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from evals.coherence import PERPLEXITY_MAX, REPETITION_MAX, Coherence, response_perplexity, score
from evals.datasets import Kind, Prompt
from evals.judges import Judge, SubstringJudge
from evals.metrics import Agreement, Rate, agreement, rate
from evals.targets import Steering, Target

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Arm:
    name: str
    steering: Steering
    coefficient: float | None = None
    """The coefficient this arm was swept at (None: as written / not swept)."""
    control_of: str | None = None
    """For a random-vector control, the name of the arm it controls."""
    layer: int | None = None
    """The layer this arm was swept at (None: as written)."""


@dataclass(frozen=True)
class PromptSet:
    name: str
    kind: Kind
    prompts: list[Prompt]


@dataclass(frozen=True, kw_only=True)
class Cell:
    """Where a row or a summary belongs: its prompt set and its arm (with what the arm was swept at)."""

    dataset: str
    kind: str
    arm: str
    coefficient: float | None
    layer: int | None
    control_of: str | None


@dataclass(frozen=True, kw_only=True)
class Row(Cell):
    prompt_id: str
    prompt: str
    response: str
    refused: bool
    """Substring judge."""
    matched: list[str]
    refused_llm: bool | None
    repetition: float
    perplexity: float
    degenerate: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Scorer:
    """How generations are judged and scored."""

    llm_judge: Judge | None = None
    perplexity: Callable[[Sequence[str], Sequence[str], str | None], list[float]] | None = None
    """(prompts, responses, system) -> perplexity under the unsteered model; None: repetition only."""
    repetition_max: float = REPETITION_MAX
    perplexity_max: float = PERPLEXITY_MAX


def perplexity_scorer(model: Any, tokenizer: Any, batch_size: int = 8) -> Callable[..., list[float]]:
    def ppl(prompts: Sequence[str], responses: Sequence[str], system: str | None) -> list[float]:
        return response_perplexity(model, tokenizer, prompts, responses, system=system, batch_size=batch_size)

    return ppl


def run(
    target: Target,
    sets: Sequence[PromptSet],
    arms: Sequence[Arm],
    *,
    max_new_tokens: int = 48,
    system: str | None = None,
    scorer: Scorer | None = None,
    progress: bool = False,
    on_rows: Callable[[list[Row]], None] | None = None,
) -> list[Row]:
    """Every (set, arm) pair: generate, judge, score. ``on_rows`` sees each pair's rows as they are done."""
    scorer = scorer or Scorer()
    substring = SubstringJudge()
    pairs = [(s, a) for a in arms for s in sets]
    bar: Any = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(len(s.prompts) for s, _ in pairs), desc="generations", unit="gen")
    out: list[Row] = []
    for pset, arm in pairs:
        texts = [p.text for p in pset.prompts]
        responses = target.complete(texts, arm.steering, max_new_tokens=max_new_tokens, system=system)
        llm = scorer.llm_judge.judge(texts, responses) if scorer.llm_judge else [None] * len(texts)
        ppl = scorer.perplexity(texts, responses, system) if scorer.perplexity else None
        coh = score(responses, ppl, repetition_max=scorer.repetition_max, perplexity_max=scorer.perplexity_max)
        rows = _rows(pset, arm, responses, llm, coh, substring)
        logger.info(
            "%s / %s: %d of %d refused (substring)", pset.name, arm.name, sum(r.refused for r in rows), len(rows)
        )
        out += rows
        if on_rows is not None:
            on_rows(rows)
        if bar is not None:
            bar.update(len(rows))
    if bar is not None:
        bar.close()
    return out


def _rows(
    pset: PromptSet,
    arm: Arm,
    responses: Sequence[str],
    llm: Sequence[bool | None],
    coh: Sequence[Coherence],
    substring: SubstringJudge,
) -> list[Row]:
    """One row per prompt of ``pset`` answered under ``arm``."""
    return [
        Row(
            dataset=pset.name,
            kind=pset.kind,
            arm=arm.name,
            coefficient=arm.coefficient,
            layer=arm.layer,
            control_of=arm.control_of,
            prompt_id=p.id,
            prompt=p.text,
            response=r,
            refused=bool(substring.matches(r)),
            matched=substring.matches(r),
            refused_llm=v,
            repetition=c.repetition,
            perplexity=c.perplexity,
            degenerate=c.degenerate,
        )
        for p, r, v, c in zip(pset.prompts, responses, llm, coh, strict=True)
    ]


@dataclass(frozen=True, kw_only=True)
class Summary(Cell):
    n: int
    refusal: Rate
    """Substring refusals among coherent generations, over all generations: the headline rate."""
    refusal_any: Rate
    """Substring refusals including those in degenerate text (what a naive eval would report)."""
    degenerate: Rate
    degenerate_refusals: int
    refusal_llm: Rate | None
    """LLM-judge refusals among coherent generations (None when no LLM judge ran)."""
    agreement: Agreement | None


def summarise(rows: Sequence[Row]) -> list[Summary]:
    """One summary per (dataset, arm, coefficient, layer), in first-seen order."""
    groups: dict[tuple[str, str, float | None, int | None], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.dataset, r.arm, r.coefficient, r.layer), []).append(r)
    return [_summary(rs) for rs in groups.values()]


def _summary(rs: Sequence[Row]) -> Summary:
    """The summary of one (dataset, arm, coefficient, layer) group of rows."""
    judged = [r.refused_llm for r in rs]
    llm, ag = None, None
    if any(v is not None for v in judged):
        llm = rate([r.refused_llm is True and not r.degenerate for r in rs if r.refused_llm is not None])
        ag = agreement([r.refused for r in rs], judged)
    first = rs[0]
    return Summary(
        dataset=first.dataset,
        kind=first.kind,
        arm=first.arm,
        coefficient=first.coefficient,
        layer=first.layer,
        control_of=first.control_of,
        n=len(rs),
        refusal=rate([r.refused and not r.degenerate for r in rs]),
        refusal_any=rate([r.refused for r in rs]),
        degenerate=rate([r.degenerate for r in rs]),
        degenerate_refusals=sum(r.refused and r.degenerate for r in rs),
        refusal_llm=llm,
        agreement=ag,
    )
