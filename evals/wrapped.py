"""Wrapped requests: harmful and harmless requests inside jailbreak templates, role-play, reformulations and
multi-turn conversations, split by wrapper family into a fit side and an evaluation side.

The same wrappers are applied to harmful *and* to harmless requests, so a detector fitted on them must learn the
request, not the template. Nothing is shared between the sides: the fit side wraps requests of the benchmarks'
``train`` halves in fit families, the evaluation side wraps ``heldout`` requests in the other families
(:func:`evals.jailbreak_templates.split_families` for the templates, :data:`EVAL_WRAPPER_FAMILIES` for the
rule-made wrappers of :mod:`evals.wrappers`). Which templates and which requests are used is fixed by
hashes of their names and ids, so a subsample is the same on every run and does not depend on order.

A wrapped prompt is an :class:`evals.datasets.Prompt` whose ``text`` is its last user turn and whose ``meta`` holds
``messages`` (the JSON conversation; longer than one turn for the multi-turn family), ``ask`` (the text at which the
request starts), ``side``, ``group``, ``family``, ``wrapper``, ``kind`` and ``base`` (the wrapped request's id).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evals.datasets import HARMFUL_SETS, HARMLESS_SETS, Kind, Part, Prompt, load_dataset, split
from evals.jailbreak_templates import Side, Template, family_groups, hash_key, load_templates, split_families
from evals.wrappers import Wrapped, Wrapper, wrappers

GROUPS = ("jailbreakchat", "in_the_wild", "pliny", "arth_singh", "roleplay", "reformulation", "multiturn")


@dataclass(frozen=True)
class WrapPlan:
    """How many wrapped prompts one side gets (the compute budget: templates are hundreds of tokens long)."""

    max_templates: int
    """Templates used, spread over the side's families (each family's first template before any second)."""
    per_family_templates: int
    """At most this many templates of one family."""
    harmful_per_template: int
    harmless_per_template: int
    harmful_per_family: int
    """Requests per rule-made family (role-play, reformulation, multi-turn), shared out over its wrappers."""
    harmless_per_family: int


PLANS: dict[Side, WrapPlan] = {
    "fit": WrapPlan(60, 2, 2, 2, 40, 40),
    "eval": WrapPlan(100, 2, 3, 2, 40, 24),
}


def request_pool(side: Side, kind: Kind, cache_dir: str | Path | None = None) -> list[Prompt]:
    """The requests a side wraps: the ``train`` (fit) or ``heldout`` (eval) halves of the recipes' sets."""
    part: Part = "train" if side == "fit" else "heldout"
    names = HARMFUL_SETS if kind == "harmful" else HARMLESS_SETS
    return [p for n in names for p in split(load_dataset(n, cache_dir), part)]


def pick(pool: Sequence[Prompt], n: int, *key: str) -> list[Prompt]:
    """``n`` requests of ``pool`` in an order fixed by hashing ``key`` with each request's id."""
    return sorted(pool, key=lambda p: hash_key(*key, p.id))[:n]


def side_templates(templates: Sequence[Template], side: Side, plan: WrapPlan) -> list[Template]:
    """The side's templates: its families' templates ranked by (position within the family, hash)."""
    sides = split_families(family_groups(templates))
    mine = sorted((t for t in templates if sides[t.family] == side), key=lambda t: hash_key("template", t.name))
    rank: dict[str, int] = {}
    ranked: list[tuple[int, bytes, Template]] = []
    for t in mine:
        r = rank[t.family] = rank.get(t.family, -1) + 1
        if r < plan.per_family_templates:
            ranked.append((r, hash_key("template", t.name), t))
    return [t for _, _, t in sorted(ranked, key=lambda x: x[:2])[: plan.max_templates]]


EVAL_WRAPPER_FAMILIES = frozenset(
    {"grandma", "persona", "novel", "past", "hypothetical", "research", "split_halves", "define_then_trigger"}
)
"""The rule-made families held out for evaluation, chosen (before any measurement) to include the three the issue
saw fail: a character who "used to" explain (grandma), a persona without rules, and the past tense."""


def side_wrappers(side: Side) -> list[Wrapper]:
    """The rule-made wrappers of the side's families (:data:`EVAL_WRAPPER_FAMILIES` on the eval side)."""
    return [w for w in wrappers() if (w.family in EVAL_WRAPPER_FAMILIES) == (side == "eval")]


def make_prompt(
    dataset: str, side: Side, kind: Kind, base: Prompt, wrapped: Wrapped, *, group: str, family: str, wrapper: str
) -> Prompt:
    meta = {
        "side": side,
        "kind": kind,
        "group": group,
        "family": family,
        "wrapper": wrapper,
        "base": base.id,
        "ask": wrapped.ask,
        "messages": json.dumps(list(wrapped.messages)),
    }
    return Prompt("", wrapped.messages[-1]["content"], dataset, meta)


def wrapped_prompts(
    side: Side,
    kind: Kind,
    *,
    cache_dir: str | Path | None = None,
    plan: WrapPlan | None = None,
    templates: Sequence[Template] | None = None,
    pool: Sequence[Prompt] | None = None,
) -> list[Prompt]:
    """Every wrapped prompt of one side and kind, ids ``wrapped_<kind>[_fit]/<i>`` in a fixed order. ``pool``
    replaces the requests of :func:`request_pool`, ``templates`` the pyrit templates."""
    plan = plan or PLANS[side]
    dataset = f"wrapped_{kind}" + ("_fit" if side == "fit" else "")
    pool = pool if pool is not None else request_pool(side, kind, cache_dir)
    per_template = plan.harmful_per_template if kind == "harmful" else plan.harmless_per_template
    out: list[Prompt] = []
    for t in side_templates(templates if templates is not None else load_templates(cache_dir), side, plan):
        for base in pick(pool, per_template, t.name, kind):
            filled = Wrapped(({"role": "user", "content": t.fill(base.text)},), base.text.strip())
            out.append(make_prompt(dataset, side, kind, base, filled, group=t.source, family=t.family, wrapper=t.name))
    per_family = plan.harmful_per_family if kind == "harmful" else plan.harmless_per_family
    by_family: dict[str, list[Wrapper]] = {}
    for w in side_wrappers(side):
        by_family.setdefault(w.family, []).append(w)
    for family, ws in by_family.items():
        for i, base in enumerate(pick(pool, per_family, family, kind)):
            w = ws[i % len(ws)]
            out.append(
                make_prompt(dataset, side, kind, base, w.wrap(base.text), group=w.group, family=family, wrapper=w.name)
            )
    return [Prompt(f"{dataset}/{i}", p.text, p.dataset, p.meta) for i, p in enumerate(out)]


def messages_of(p: Prompt) -> list[dict[str, str]]:
    """The conversation of a prompt: its ``messages`` meta, or one user turn of its text."""
    raw = p.meta.get("messages")
    if raw is None:
        return [{"role": "user", "content": p.text}]
    msgs: Any = json.loads(raw)
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in msgs]


def single_turn(prompts: Sequence[Prompt]) -> list[Prompt]:
    """The prompts that are one user turn (what a string-prompt eval target can send)."""
    return [p for p in prompts if len(messages_of(p)) == 1]
