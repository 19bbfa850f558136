"""A recipe's config measured on the held-out halves: refusal per set and pooled, benign-text cost, MMLU.

Every arm (by default the unsteered model, the recipe, and a same-norm random vector under the same gate,
:func:`evals.controls.random_control`) answers the ``heldout`` halves of the recipes' benchmarks
(:data:`evals.datasets.HARMFUL_SETS`, :data:`~evals.datasets.HARMLESS_SETS`). Refusal counts only when coherent
(:mod:`evals.coherence`), with Wilson intervals; each arm with a config gets its CE cost on fixed benign text, each
that is not a control its MMLU accuracy on held-out questions next to the unsteered model's.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from evals.benign_text import BENIGN_PARAGRAPHS
from evals.capability import mmlu_accuracy, text_cost
from evals.controls import random_control
from evals.datasets import HARMFUL_SETS, HARMLESS_SETS, McQuestion, in_train, load_dataset, load_mmlu, split, subset
from evals.metrics import Rate, rate
from evals.runner import Arm, PromptSet, Row, Scorer, perplexity_scorer, run, summarise
from evals.targets import InProcessTarget
from steerlib.config import SteeringConfig

ROWS_FILE = "heldout_rows.jsonl"

SHIPPED_PRESETS = Path(__file__).resolve().parents[2] / "servers" / "presets"
"""The server's preset folder in this source tree: the recipes' default inputs are named files in it."""


@dataclass(frozen=True)
class HeldoutSettings:
    """How much of the held-out halves a measurement reads, and how it generates."""

    cap: int = 32
    """Held-out prompts per dataset."""
    mmlu: int = 100
    """Held-out MMLU questions."""
    batch_size: int = 16
    max_new_tokens: int = 48


def heldout_sets(cap: int) -> list[PromptSet]:
    """The first ``cap`` held-out prompts of each of the recipes' harmful and harmless sets."""
    sets = [PromptSet(n, "harmful", subset(split(load_dataset(n), "heldout"), cap)) for n in HARMFUL_SETS]
    return sets + [PromptSet(n, "harmless", subset(split(load_dataset(n), "heldout"), cap)) for n in HARMLESS_SETS]


def heldout_mmlu(n: int) -> list[McQuestion]:
    """The first ``n`` MMLU questions of the held-out half."""
    return [q for q in load_mmlu() if not in_train(q.question)][:n]


def pooled(rows: Sequence[Row], arm: str, kind: str) -> Rate:
    """The coherent refusal rate of ``arm`` over every set of one kind."""
    return rate([r.refused and not r.degenerate for r in rows if r.arm == arm and r.kind == kind])


def default_arms(config: SteeringConfig) -> list[Arm]:
    """The unsteered model, the recipe, and a same-norm random vector under the same gate (the recipe's control)."""
    control = random_control(config, seed=0)
    return [Arm("baseline", None), Arm("recipe", config), Arm("random(recipe)", control, control_of="recipe")]


def heldout(
    model: nn.Module,
    tok: Any,
    arms: Sequence[Arm],
    settings: HeldoutSettings,
    out: Path,
    *,
    sets: Sequence[PromptSet] | None = None,
    questions: Sequence[McQuestion] | None = None,
) -> dict[str, Any]:
    """``arms`` on ``sets`` (default: :func:`heldout_sets`) and ``questions`` (default: :func:`heldout_mmlu`); the
    rows go to ``out/heldout_rows.jsonl``, the report (per dataset, pooled, benign-text CE, MMLU) is returned."""
    sets = heldout_sets(settings.cap) if sets is None else sets
    scorer = Scorer(perplexity=perplexity_scorer(model, tok))
    target = InProcessTarget(model, tok, batch_size=settings.batch_size)
    rows = run(target, list(sets), list(arms), max_new_tokens=settings.max_new_tokens, scorer=scorer, progress=True)
    with (out / ROWS_FILE).open("w") as f:
        f.writelines(json.dumps(r.as_dict()) + "\n" for r in rows)
    report = refusal_report(rows, arms)
    configs = [(a.name, a.steering, a.control_of) for a in arms if isinstance(a.steering, SteeringConfig)]
    if configs:
        report["benign_text_ce"] = {n: asdict(text_cost(model, tok, BENIGN_PARAGRAPHS, c)) for n, c, _ in configs}
    questions = heldout_mmlu(settings.mmlu) if questions is None else questions
    scored: list[tuple[str, SteeringConfig | None]] = [("baseline", None)]
    scored += [(n, c) for n, c, control_of in configs if not control_of]
    report["mmlu"] = {
        name: mmlu_accuracy(model, tok, questions, cfg, batch_size=settings.batch_size).as_json()
        for name, cfg in scored
    }
    return report


def refusal_report(rows: Sequence[Row], arms: Sequence[Arm]) -> dict[str, Any]:
    """Refusal per (dataset, arm) and pooled per arm and kind, with the share of degenerate text among refusals."""
    per_set = {
        s.dataset + " / " + s.arm: {
            "refusal": s.refusal.as_json(),
            "refusal_any": s.refusal_any.as_json(),
            "degenerate_refusals": s.degenerate_refusals,
        }
        for s in summarise(rows)
    }
    report: dict[str, Any] = {"per_dataset": per_set, "pooled": {}}
    for a in arms:
        counted = [r for r in rows if r.arm == a.name and r.refused]
        report["pooled"][a.name] = {
            "harmful": pooled(rows, a.name, "harmful").as_json(),
            "harmless": pooled(rows, a.name, "harmless").as_json(),
            "degenerate_among_refusals": rate([r.degenerate for r in counted]).as_json(),
        }
    return report
