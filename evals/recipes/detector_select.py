"""Choosing the detector recipe's probe on prompt sets, and judging the recipe by nested cross-validation.

:func:`choose` scores every candidate (pooling, layer, L2, weighting of the harmless sets) out of fold and keeps the
one flagging the most harmful prompts at a threshold that holds each harmless set's false positives within a budget.
:func:`nested_cv` runs that whole choice again without each outer fold and scores the fold with what it chose: every
prompt is judged by a detector that never saw it, so the rates are the recipe's, on every prompt there is.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from evals.datasets import Prompt
from evals.recipes.probe import ProbeFit, out_of_fold_scores, rate_above, roc_auc, threshold_at_fpr
from steerlib.extract.probes import Probe, fit_logistic_probe, fit_mlp_probe

EXTRA_HARMLESS_TRAIN = ("mmlu_questions",)
"""Benign questions added to the harmless training prompts only (never scored): more varied benign text."""
L2_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 1.0)
OVERREFUSAL = "rho_overrefusal"
NEG_WEIGHTS: dict[str, Callable[[list[str]], Tensor | None]] = {
    "uniform": lambda names: None,
    "per_set": lambda names: torch.tensor([1.0 / names.count(n) for n in names], device="cpu"),
    "overrefusal_x3": lambda names: torch.tensor([3.0 if n == OVERREFUSAL else 1.0 for n in names], device="cpu"),
    "overrefusal_x10": lambda names: torch.tensor([10.0 if n == OVERREFUSAL else 1.0 for n in names], device="cpu"),
}
"""How the negative class's loss is spread over the harmless prompts, by the dataset each comes from."""
MLP_WEIGHT_DECAY = 1e-2
MLP_WEIGHTS = "per_set"
"""MLP candidates are tried with this one weighting and weight decay (their ``l2``), over pooling, layer and width."""
Features = dict[str, dict[int, Tensor]]
"""``{pool: {layer: (N, D)}}``: prompt activations by pooling (``last`` / ``mean``) and layer."""


@dataclass(frozen=True)
class Sets:
    """Prompts by dataset name, for one part of the split."""

    harmful: dict[str, list[Prompt]]
    harmless: dict[str, list[Prompt]]

    def texts(self, kind: str) -> list[str]:
        return [p.text for ps in getattr(self, kind).values() for p in ps]

    def names(self, kind: str) -> list[str]:
        """The dataset of each prompt, in the order of :meth:`texts`."""
        return [name for name, ps in getattr(self, kind).items() for _ in ps]

    def where(self, keep: Callable[[str, Prompt], bool]) -> Sets:
        """The prompts for which ``keep(dataset, prompt)`` holds, in the same order."""
        return Sets(
            {n: [p for p in ps if keep(n, p)] for n, ps in self.harmful.items()},
            {n: [p for p in ps if keep(n, p)] for n, ps in self.harmless.items()},
        )

    def by_set(self, kind: str, values: Tensor) -> dict[str, Tensor]:
        """Per-row ``values`` (in the order of :meth:`texts` ``(kind)``) grouped by dataset."""
        names = self.names(kind)
        return {
            n: values[torch.tensor([m == n for m in names], dtype=torch.bool, device=values.device)]
            for n in getattr(self, kind)
        }

    def mask(self, kind: str, keep: Callable[[str, Prompt], bool]) -> Tensor:
        """Boolean rows of :meth:`texts` ``(kind)`` for which ``keep`` holds (to slice activations alike)."""
        keep_N = [keep(n, p) for n, ps in getattr(self, kind).items() for p in ps]
        return torch.tensor(keep_N, dtype=torch.bool, device="cpu")  # activations are recorded to the CPU


def rows(acts: Features, mask: Tensor) -> Features:
    return {pool: {layer: a[mask] for layer, a in by_layer.items()} for pool, by_layer in acts.items()}


def fold_of(text: str, folds: int, salt: str = "detector-fold") -> int:
    """A fixed fold per prompt (hash of its text), so runs are reproducible."""
    return int.from_bytes(hashlib.sha256((salt + "\x00" + text).encode()).digest()[:4], "big") % folds


@dataclass(frozen=True)
class Choice:
    pool: str
    layer: int
    l2: float
    weights: str
    """A key of :data:`NEG_WEIGHTS`."""
    auc: float
    """Out of fold, all training harmful against all training harmless prompts."""
    threshold: float
    """At most ``max_fpr`` of each scored harmless training set's out-of-fold scores are above it."""
    tpr: float
    """Out-of-fold share of the training harmful prompts above ``threshold``."""
    probe: str = "linear"
    """``linear`` (logistic regression; ``l2`` its penalty) or ``mlp{H}`` (H hidden ReLUs; ``l2`` the weight
    decay)."""

    @property
    def key(self) -> str:
        head = "" if self.probe == "linear" else f"{self.probe}, "
        return f"{head}pool {self.pool}, layer {self.layer}, l2 {self.l2:g}, weights {self.weights}"

    def fitter(self) -> ProbeFit:
        if self.probe == "linear":
            return lambda pos, neg, w: fit_logistic_probe(pos, neg, l2=self.l2, neg_weight_N=w)
        hidden = int(self.probe.removeprefix("mlp"))
        return lambda pos, neg, w: fit_mlp_probe(pos, neg, hidden=hidden, weight_decay=self.l2, neg_weight_N=w)


def score_candidate(
    s_pos: Tensor, s_neg: Tensor, train: Sets, max_fpr: float
) -> tuple[float, dict[str, float], dict[str, float]]:
    """The candidate's threshold (the strictest of the per-set ones) and its true / false positive rates per set.

    Every scored harmless set (not only their union) must stay within ``max_fpr``: a large easy set must not buy a
    loose threshold for the hard ones (over-refusal prompts). The extra benign questions are trained on, not scored.
    """
    pos, neg = train.by_set("harmful", s_pos), train.by_set("harmless", s_neg)
    threshold = max(threshold_at_fpr(s, max_fpr) for n, s in neg.items() if n not in EXTRA_HARMLESS_TRAIN)
    tpr = {n: rate_above(s, threshold) for n, s in pos.items()}
    fpr = {n: rate_above(s, threshold) for n, s in neg.items()}
    return threshold, tpr | {"all": rate_above(s_pos, threshold)}, fpr


def choose(
    acts_pos: Features,
    acts_neg: Features,
    train: Sets,
    max_fpr: float,
    folds: int = 5,
    l2_grid: tuple[float, ...] = L2_GRID,
    mlp_hidden: tuple[int, ...] = (),
) -> tuple[Choice, dict[str, dict[str, Any]]]:
    """The candidate flagging the most training harmful prompts out of fold at the per-set ``max_fpr`` threshold.

    Candidates: every pooling and layer in ``acts_pos``, with a linear probe for each L2 in ``l2_grid`` and
    weighting in :data:`NEG_WEIGHTS`, and an MLP probe for each width in ``mlp_hidden``. Ties go to the higher
    out-of-fold AUC. Returns the choice and every candidate's out-of-fold facts.
    """
    fp = torch.tensor([fold_of(t, folds) for t in train.texts("harmful")], device="cpu")
    fn = torch.tensor([fold_of(t, folds) for t in train.texts("harmless")], device="cpu")
    neg_names = train.names("harmless")
    kinds = [("linear", l2, weights) for l2 in l2_grid for weights in NEG_WEIGHTS]
    kinds += [(f"mlp{h}", MLP_WEIGHT_DECAY, MLP_WEIGHTS) for h in mlp_hidden]
    grid: dict[str, dict[str, Any]] = {}
    best: Choice | None = None
    for pool, by_layer in acts_pos.items():
        for layer, pos in by_layer.items():
            for probe, l2, weights in kinds:
                c = Choice(pool, layer, l2, weights, 0.0, 0.0, 0.0, probe)
                neg = acts_neg[pool][layer]
                s_pos, s_neg = out_of_fold_scores(
                    pos, neg, fp, fn, fit=c.fitter(), folds=folds, neg_weight_N=NEG_WEIGHTS[weights](neg_names)
                )
                threshold, tpr, fpr = score_candidate(s_pos, s_neg, train, max_fpr)
                c = replace(c, auc=roc_auc(s_pos, s_neg), threshold=threshold, tpr=tpr["all"])
                grid[c.key] = {"auc": c.auc, "threshold": threshold, "tpr": tpr, "fpr": fpr}
                if best is None or (c.tpr, c.auc) > (best.tpr, best.auc):
                    best = c
    if best is None:
        raise ValueError("choose: no candidates (acts_pos is empty)")
    return best, grid


@dataclass(frozen=True)
class NestedCv:
    """Each scored prompt's margin ``score - threshold`` under the detector chosen and fitted without its outer fold
    (flagged where the margin is positive), by dataset, and what each outer fold chose."""

    harmful: dict[str, Tensor]
    harmless: dict[str, Tensor]
    choices: list[Choice]


def fit_choice(acts_pos: Features, acts_neg: Features, sets: Sets, choice: Choice) -> Probe:
    """The probe ``choice`` describes, fitted on all of ``sets``."""
    weights = NEG_WEIGHTS[choice.weights](sets.names("harmless"))
    return choice.fitter()(acts_pos[choice.pool][choice.layer], acts_neg[choice.pool][choice.layer], weights)


def nested_cv(
    acts_pos: Features,
    acts_neg: Features,
    sets: Sets,
    max_fpr: float,
    folds: int = 5,
    l2_grid: tuple[float, ...] = L2_GRID,
    mlp_hidden: tuple[int, ...] = (),
) -> NestedCv:
    """The whole recipe (:func:`choose`, then the probe refitted on everything it was given) run ``folds`` times,
    each time without one outer fold of the prompts, which it then scores.

    Outer folds hash the prompt text with another salt than :func:`choose`'s inner folds. The extra harmless
    training prompts (:data:`EXTRA_HARMLESS_TRAIN`) are in every fit and never scored.
    """
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")

    def outer(n: str, p: Prompt) -> int:
        return -1 if n in EXTRA_HARMLESS_TRAIN else fold_of(p.text, folds, salt="detector-outer")

    margins = {
        kind: torch.full((len(sets.texts(kind)),), float("nan"), device="cpu") for kind in ("harmful", "harmless")
    }
    choices: list[Choice] = []
    for k in range(folds):

        def keep(n: str, p: Prompt, k: int = k) -> bool:
            return outer(n, p) != k

        inner = sets.where(keep)
        mask_pos, mask_neg = sets.mask("harmful", keep), sets.mask("harmless", keep)
        in_pos, in_neg = rows(acts_pos, mask_pos), rows(acts_neg, mask_neg)
        choice, _ = choose(in_pos, in_neg, inner, max_fpr, l2_grid=l2_grid, mlp_hidden=mlp_hidden)
        probe = fit_choice(in_pos, in_neg, inner, choice)
        for kind, acts, mask in (("harmful", acts_pos, ~mask_pos), ("harmless", acts_neg, ~mask_neg)):
            margins[kind][mask] = probe.scores(acts[choice.pool][choice.layer][mask]) - choice.threshold
        choices.append(choice)

    def scored(kind: str) -> dict[str, Tensor]:
        return {n: m for n, m in sets.by_set(kind, margins[kind]).items() if n not in EXTRA_HARMLESS_TRAIN}

    return NestedCv(scored("harmful"), scored("harmless"), choices)
