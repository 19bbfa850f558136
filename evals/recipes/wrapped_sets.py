"""The prompts a wrapping-robust detector is fitted and judged on: plain and wrapped, harmful and harmless, per side.

- ``fit``: the ``train`` halves of the recipes' plain sets, MMLU questions of the train half, and the wrapped
  prompts of the fit families (:mod:`evals.wrapped`);
- ``eval``: the ``heldout`` halves, held-out-half MMLU questions, and the wrapped prompts of the held-out families.

Every prompt carries ``meta`` ``kind`` (harmful / harmless), ``group`` (``plain`` or a wrapper group) and
``family`` (for plain prompts, the dataset), so results can be reported per family and folds drawn by family.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from evals.datasets import HARMFUL_SETS, HARMLESS_SETS, Kind, Part, Prompt, load_dataset, split
from evals.jailbreak_templates import Side, Template, load_templates
from evals.recipes.detector import mmlu_questions
from evals.wrapped import WrapPlan, messages_of, wrapped_prompts

MMLU_PER_SIDE = 300


def tagged(p: Prompt, kind: Kind, group: str, family: str) -> Prompt:
    return Prompt(p.id, p.text, p.dataset, {**p.meta, "kind": kind, "group": group, "family": family})


def plain_prompts(side: Side, *, mmlu: int = MMLU_PER_SIDE, cache_dir: str | Path | None = None) -> list[Prompt]:
    part: Part = "train" if side == "fit" else "heldout"
    kinds: tuple[tuple[tuple[str, ...], Kind], ...] = ((HARMFUL_SETS, "harmful"), (HARMLESS_SETS, "harmless"))
    out = [
        tagged(p, kind, "plain", name)
        for names, kind in kinds
        for name in names
        for p in split(load_dataset(name, cache_dir), part)
    ]
    return out + [tagged(p, "harmless", "plain", "mmlu") for p in mmlu_questions(train=side == "fit", n=mmlu)]


def side_prompts(
    side: Side,
    *,
    plan: WrapPlan | None = None,
    mmlu: int = MMLU_PER_SIDE,
    templates: Sequence[Template] | None = None,
    cache_dir: str | Path | None = None,
) -> list[Prompt]:
    """Plain then wrapped prompts of one side (wrapped prompts keep their own ``kind``/``group``/``family``)."""
    ts = templates if templates is not None else load_templates(cache_dir)
    kinds: tuple[Kind, ...] = ("harmful", "harmless")
    wrapped = [p for kind in kinds for p in wrapped_prompts(side, kind, plan=plan, templates=ts, cache_dir=cache_dir)]
    return plain_prompts(side, mmlu=mmlu, cache_dir=cache_dir) + wrapped


def conversation(p: Prompt) -> tuple[list[dict[str, str]], str]:
    """The chat messages of a prompt and the text at which its ask starts."""
    return messages_of(p), p.meta.get("ask", p.text.strip())
