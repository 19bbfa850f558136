"""Prompts, answer parsing and score arithmetic of automatic interpretability, with no I/O.

Explainer. As in Bills et al. ("Language models can explain neurons in language models", OpenAI 2023) the explainer
reads max-activating text excerpts with the firing tokens marked (``<<tok>>``, the delimiters of Paulo et al.) and
writes a short explanation. Here the explainer sees the even-ranked top contexts; the odd-ranked ones are kept for
scoring so that the judge is not tested on the very examples the explanation was written from.

Scores (Paulo et al., "Automatically interpreting millions of features in large language models", arXiv 2410.13928,
section 3; Bills et al.'s simulation scoring needs per-token log-probabilities, which an OpenAI-compatible chat
endpoint need not give, so it is not used):

- **detection**: the judge reads the explanation and one context at a time, activating (odd-ranked top contexts) or
  not (random contexts where the latent is zero on every token), and answers whether the context contains what the
  explanation describes.
- **fuzzing**: the judge reads the explanation and an activating context with some tokens marked: either the tokens
  the latent fires on, or as many other tokens of the same context drawn at random; it answers whether the marks
  match the explanation. Using the same contexts for both kinds isolates the marking.

Each judge call asks for Yes or No at temperature 0 (a sentence verdict, "does (not) match", is read too), and each
score is the balanced accuracy (mean of true-positive and true-negative rates; 0.5 is chance). One unparseable
answer makes that score ``None``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from evals.autointerp.cache import Message
from evals.autointerp.records import RandomContext, TokenContext

OPEN, CLOSE = "<<", ">>"

EXPLAINER_SYSTEM = (
    "You explain features of a language model. A feature fires on some tokens of a text. You will see short "
    f"excerpts where the tokens the feature fires on are marked {OPEN}like this{CLOSE}. Reply with one short phrase "
    "(under 12 words) saying what the marked tokens have in common."
)
DETECTION_SYSTEM = "You check if a text matches a description. Reply with only Yes or No."
FUZZING_SYSTEM = (
    f"You check if the tokens marked {OPEN}like this{CLOSE} in a text match a description. Reply with only Yes or No."
)
EXPLAIN_MAX_TOKENS = 32
JUDGE_MAX_TOKENS = 8
"""Room for a verdict sentence: SmolLM2-135M-Instruct answers "The text does not match the description." more
often than a bare Yes or No (measured on the embedded model, 21 of 24 answers)."""

# The first verdict wins: a bare yes / no, or the sentence form of the question ("does (not) match").
_YES_NO = re.compile(r"\b(yes|no|(?:does|do) not match|(?:doesn't|don't) match|(?:does|do) match|matches)\b", re.I)
_PREFIX = re.compile(r"^(explanation|answer|the marked tokens (are|have in common)|feature)\s*[:\-]?\s*", re.IGNORECASE)


def render(tokens: Sequence[str], marked: set[int]) -> str:
    """The text of ``tokens``; runs of marked tokens wrapped in ``<<`` ``>>`` (leading whitespace left outside)."""
    out: list[str] = []
    for i, tok in enumerate(tokens):
        starts = i in marked and (i - 1) not in marked
        ends = i in marked and (i + 1) not in marked
        if starts:
            body = tok.lstrip()
            out.append(tok[: len(tok) - len(body)] + OPEN + body)
        else:
            out.append(tok)
        if ends:
            out.append(CLOSE)
    return "".join(out)


def active(ctx: TokenContext) -> set[int]:
    """Positions where the latent fires (activation > 0)."""
    return {i for i, a in enumerate(ctx.activations) if a > 0}


def explainer_messages(contexts: Sequence[TokenContext]) -> list[Message]:
    lines = [f"{n}. {render(c.tokens, active(c))}".replace("\n", " ") for n, c in enumerate(contexts, 1)]
    user = "Excerpts:\n" + "\n".join(lines) + "\n\nWhat do the marked tokens have in common? One short phrase."
    return [{"role": "system", "content": EXPLAINER_SYSTEM}, {"role": "user", "content": user}]


def parse_explanation(answer: str) -> str | None:
    """The first non-empty line, without a leading label or quotes; None when nothing is left."""
    for line in answer.splitlines():
        text = _PREFIX.sub("", line.strip()).strip().strip("\"'*").strip()
        if text:
            return text[:300]
    return None


def detection_messages(explanation: str, tokens: Sequence[str]) -> list[Message]:
    text = render(tokens, set()).replace("\n", " ")
    user = f"Description: {explanation}\nText: {text}\nDoes the text match the description? Reply Yes or No."
    return [{"role": "system", "content": DETECTION_SYSTEM}, {"role": "user", "content": user}]


def fuzzing_messages(explanation: str, tokens: Sequence[str], marked: set[int]) -> list[Message]:
    text = render(tokens, marked).replace("\n", " ")
    user = f"Description: {explanation}\nText: {text}\nDo the marked tokens match the description? Reply Yes or No."
    return [{"role": "system", "content": FUZZING_SYSTEM}, {"role": "user", "content": user}]


def parse_yes_no(answer: str) -> bool | None:
    """True for yes / "does match" / "matches", False for no / "does not match", by the first one; else None."""
    m = _YES_NO.search(answer)
    if m is None:
        return None
    verdict = m.group(1).lower()
    return verdict in ("yes", "matches") or (
        verdict.endswith(" match") and "not" not in verdict and "n't" not in verdict
    )


def balanced_accuracy(labels: Sequence[bool], predictions: Sequence[bool]) -> float:
    """Mean of the true-positive and true-negative rates; both classes must be present."""
    if len(labels) != len(predictions):
        raise ValueError(f"got {len(labels)} labels and {len(predictions)} predictions")
    pos = [p for y, p in zip(labels, predictions, strict=True) if y]
    neg = [not p for y, p in zip(labels, predictions, strict=True) if not y]
    if not pos or not neg:
        raise ValueError(f"balanced accuracy needs both classes: {len(pos)} positive, {len(neg)} negative")
    return (sum(pos) / len(pos) + sum(neg) / len(neg)) / 2


@dataclass(frozen=True)
class Item:
    """One judge question: the messages and the right answer."""

    messages: list[Message]
    label: bool


@dataclass(frozen=True)
class Examples:
    """What a latent is explained from and scored on (drawn once per latent, reproducibly)."""

    explain: list[TokenContext]
    activating: list[TokenContext]
    """Scoring contexts where the latent fires (odd-ranked top contexts)."""
    quiet: list[list[str]]
    """Random contexts where the latent is zero on every token."""
    fuzz_marks: list[set[int]]
    """For each ``activating`` context, random positions where it does not fire (as many as where it does)."""


def select_examples(
    feature: int, top: Sequence[TokenContext], pool: Sequence[RandomContext], *, n_explain: int, n_score: int, seed: int
) -> Examples:
    """Even-ranked top contexts to explain from; odd-ranked ones, quiet random contexts and decoy marks to score."""
    rng = random.Random(f"{seed}:{feature}")
    explain = list(top[0::2])[:n_explain]
    held = list(top[1::2])
    activating = rng.sample(held, min(n_score, len(held)))
    quiet_all = [c.tokens for c in pool if all(feature not in a for a in c.active)]
    quiet = rng.sample(quiet_all, min(n_score, len(quiet_all)))
    marks = []
    for c in activating:
        on = active(c)
        off = [i for i in range(len(c.tokens)) if i not in on]
        marks.append(set(rng.sample(off, min(len(on), len(off)))))
    return Examples(explain, activating, quiet, marks)


def detection_items(explanation: str, ex: Examples) -> list[Item]:
    pos = [Item(detection_messages(explanation, c.tokens), True) for c in ex.activating]
    return pos + [Item(detection_messages(explanation, t), False) for t in ex.quiet]


def fuzzing_items(explanation: str, ex: Examples) -> list[Item]:
    """Correctly marked and decoy-marked versions of each activating context (decoys need a non-firing token)."""
    right = [Item(fuzzing_messages(explanation, c.tokens, active(c)), True) for c in ex.activating]
    decoys = [
        Item(fuzzing_messages(explanation, c.tokens, m), False)
        for c, m in zip(ex.activating, ex.fuzz_marks, strict=True)
        if m
    ]
    return right + decoys


def score_answers(items: Sequence[Item], answers: Sequence[str]) -> tuple[float | None, str]:
    """(balanced accuracy, "") or (None, why): any unparseable answer or a missing class gives None."""
    preds = [parse_yes_no(a) for a in answers]
    bad = [a for a, p in zip(answers, preds, strict=True) if p is None]
    if bad:
        return None, f"{len(bad)}/{len(answers)} answers are neither Yes nor No, e.g. {bad[0][:80]!r}"
    labels = [it.label for it in items]
    if all(labels) or not any(labels):
        return None, f"only one class of examples ({len(labels)} items, all {labels[0] if labels else '-'})"
    return balanced_accuracy(labels, [bool(p) for p in preds]), ""
