"""Detector-gated refusal for a model: fit a harmfulness probe on training splits, ship it as a ``refuse`` config.

    python -m evals.recipes.detector --out steerlib_presets/refusal_detector [--model NAME] [--max-fpr 0.02]

Steps (all on the ``train`` halves of the benchmark splits, so every reported number is on prompts the detector
never saw): record each prompt's activation at several layers, at its last token and averaged over its tokens;
score every candidate (pooling, layer, L2, weighting of the harmless sets) out of fold (5 folds by prompt hash);
give each candidate the lowest threshold at which at most ``max_fpr`` of each scored harmless training set
(benign, paired-benign, over-refusal) fires; keep the candidate that then flags the most training harmful prompts
(ties: higher AUC); refit it on all training prompts. Only that one detector is scored on the held-out halves. The
config answers a flagged prompt with a fixed refusal (``op: refuse``); ``report.json`` holds the out-of-fold grid,
the held-out ROC AUC and the true / false positive rates per dataset at the shipped threshold.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from evals.datasets import Prompt, in_train, load_dataset, load_mmlu, split
from evals.recipes.activations import Pool, cached_last_token_activations
from evals.recipes.probe import LinearProbe, fit_probe, out_of_fold_scores, rate_above, roc_auc, threshold_at_fpr
from steerlib.config import DEFAULT_REFUSAL
from steerlib.vectors import SteeringVector

log = logging.getLogger(__name__)

HARMFUL = ("harmbench", "advbench", "donotanswer", "harmful_probes")
HARMLESS = ("harmless_probes", "rho_benign", "rho_overrefusal")
EXTRA_HARMLESS_TRAIN = ("mmlu_questions",)
"""Benign questions added to the harmless training prompts only (never scored): more varied benign text."""
LAYERS = (6, 9, 12, 15, 18, 21)
POOLS: tuple[Pool, ...] = ("last", "mean")
L2_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 1.0)
OVERREFUSAL = "rho_overrefusal"
NEG_WEIGHTS: dict[str, Callable[[list[str]], Tensor | None]] = {
    "uniform": lambda names: None,
    "per_set": lambda names: torch.tensor([1.0 / names.count(n) for n in names]),
    "overrefusal_x3": lambda names: torch.tensor([3.0 if n == OVERREFUSAL else 1.0 for n in names]),
    "overrefusal_x10": lambda names: torch.tensor([10.0 if n == OVERREFUSAL else 1.0 for n in names]),
}
"""How the negative class's loss is spread over the harmless prompts, by the dataset each comes from."""
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


def load_sets(part: str, cap: int | None, *, extra_harmless: int = 0) -> Sets:
    def take(name: str) -> list[Prompt]:
        ps = split(load_dataset(name), part)  # type: ignore[arg-type]
        return ps if cap is None else ps[:cap]

    harmless = {n: take(n) for n in HARMLESS}
    if extra_harmless:
        questions = [q for q in load_mmlu() if in_train(q.question)][:extra_harmless]
        harmless["mmlu_questions"] = [Prompt(q.id, q.question, "mmlu") for q in questions]
    return Sets({n: take(n) for n in HARMFUL}, harmless)


def fold_of(text: str, folds: int) -> int:
    """A fixed fold per prompt (hash of its text), so runs are reproducible."""
    return int.from_bytes(hashlib.sha256(("detector-fold\x00" + text).encode()).digest()[:4], "big") % folds


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

    @property
    def key(self) -> str:
        return f"pool {self.pool}, layer {self.layer}, l2 {self.l2:g}, weights {self.weights}"


def score_candidate(
    s_pos: Tensor, s_neg: Tensor, train: Sets, max_fpr: float
) -> tuple[float, dict[str, float], dict[str, float]]:
    """The candidate's threshold (the strictest of the per-set ones) and its true / false positive rates per set.

    Every scored harmless set (not only their union) must stay within ``max_fpr``: a large easy set must not buy a
    loose threshold for the hard ones (over-refusal prompts). The extra benign questions are trained on, not scored.
    """
    pos_names, neg_names = train.names("harmful"), train.names("harmless")

    def part(s: Tensor, names: list[str], name: str) -> Tensor:
        return s[torch.tensor([n == name for n in names])]

    scored = [n for n in train.harmless if n not in EXTRA_HARMLESS_TRAIN]
    threshold = max(threshold_at_fpr(part(s_neg, neg_names, n), max_fpr) for n in scored)
    tpr = {n: rate_above(part(s_pos, pos_names, n), threshold) for n in train.harmful}
    fpr = {n: rate_above(part(s_neg, neg_names, n), threshold) for n in train.harmless}
    return threshold, tpr | {"all": rate_above(s_pos, threshold)}, fpr


def choose(
    acts_pos: Features, acts_neg: Features, train: Sets, max_fpr: float, folds: int = 5
) -> tuple[Choice, dict[str, dict[str, Any]]]:
    """The candidate flagging the most training harmful prompts out of fold at the per-set ``max_fpr`` threshold.

    Candidates: every pooling and layer in ``acts_pos``, L2 in :data:`L2_GRID`, weighting in :data:`NEG_WEIGHTS`.
    Ties go to the higher out-of-fold AUC. Returns the choice and every candidate's out-of-fold facts.
    """
    fp = torch.tensor([fold_of(t, folds) for t in train.texts("harmful")])
    fn = torch.tensor([fold_of(t, folds) for t in train.texts("harmless")])
    neg_names = train.names("harmless")
    grid: dict[str, dict[str, Any]] = {}
    best: Choice | None = None
    for pool, by_layer in acts_pos.items():
        for layer, pos in by_layer.items():
            for l2 in L2_GRID:
                for weights, weigh in NEG_WEIGHTS.items():
                    neg = acts_neg[pool][layer]
                    s_pos, s_neg = out_of_fold_scores(
                        pos, neg, fp, fn, l2=l2, folds=folds, neg_weight_N=weigh(neg_names)
                    )
                    threshold, tpr, fpr = score_candidate(s_pos, s_neg, train, max_fpr)
                    c = Choice(pool, layer, l2, weights, roc_auc(s_pos, s_neg), threshold, tpr["all"])
                    grid[c.key] = {"auc": c.auc, "threshold": threshold, "tpr": tpr, "fpr": fpr}
                    if best is None or (c.tpr, c.auc) > (best.tpr, best.auc):
                        best = c
    if best is None:
        raise ValueError("choose: no candidates (acts_pos is empty)")
    return best, grid


def heldout_report(
    model: nn.Module,
    tok: Any,
    probe: LinearProbe,
    choice: Choice,
    held: Sets,
    cache: Path,
    batch_size: int,
) -> dict[str, Any]:
    def scores(prompts: list[Prompt]) -> Tensor:
        texts = [p.text for p in prompts]
        acts = cached_last_token_activations(model, tok, texts, LAYERS, cache, batch_size=batch_size, pool=choice.pool)
        return probe.scores(acts[choice.layer])

    pos = {n: scores(ps) for n, ps in held.harmful.items()}
    neg = {n: scores(ps) for n, ps in held.harmless.items()}
    all_pos, all_neg = torch.cat(list(pos.values())), torch.cat(list(neg.values()))
    threshold = choice.threshold
    return {
        "roc_auc": roc_auc(all_pos, all_neg),
        "true_positive_rate": {n: rate_above(s, threshold) for n, s in pos.items()}
        | {"all": rate_above(all_pos, threshold)},
        "false_positive_rate": {n: rate_above(s, threshold) for n, s in neg.items()}
        | {"all": rate_above(all_neg, threshold)},
        "n": {n: len(s) for n, s in (pos | neg).items()},
    }


VECTOR_FILE = "vectors/harm_detector_v2_l{layer}.safetensors"
CONFIG = """\
# Detector-gated refusal, built by `python -m evals.recipes.detector`: a logistic probe on the prompt's activation
# ({pool} token{s}) after layer {layer} flags harmful requests; a flagged request is answered with a fixed refusal.
# Held-out ROC AUC {auc:.4f}; see report.json for true / false positive rates per dataset.
interventions:
  - layer: {layer}
    op: refuse
    name: harm-probe-l{layer}
    message: "{message}"
    apply:
      when: {{vector: {vector}, metric: dot, above: {above:.6f}, scope: prompt, aggregate: {pool}}}
"""


def build(
    model: nn.Module, tok: Any, out: Path, *, max_fpr: float, cap: int | None, batch_size: int, extra_harmless: int
) -> dict[str, Any]:
    train, held = load_sets("train", cap, extra_harmless=extra_harmless), load_sets("heldout", cap)
    cache = out / ".activations"
    kw: dict[str, Any] = {"batch_size": batch_size, "progress": True}
    acts_pos: Features = {}
    acts_neg: Features = {}
    for pool in POOLS:
        acts_pos[pool] = cached_last_token_activations(
            model, tok, train.texts("harmful"), LAYERS, cache, pool=pool, **kw
        )
        acts_neg[pool] = cached_last_token_activations(
            model, tok, train.texts("harmless"), LAYERS, cache, pool=pool, **kw
        )
    choice, grid = choose(acts_pos, acts_neg, train, max_fpr)
    log.info("chose %s: out-of-fold TPR %.4f at threshold %.4f", choice.key, choice.tpr, choice.threshold)
    pos, neg = acts_pos[choice.pool][choice.layer], acts_neg[choice.pool][choice.layer]
    probe = fit_probe(pos, neg, l2=choice.l2, neg_weight_N=NEG_WEIGHTS[choice.weights](train.names("harmless")))
    heldout = heldout_report(model, tok, probe, choice, held, cache, batch_size)
    report: dict[str, Any] = {
        "choice": asdict(choice),
        "rule": "threshold: the lowest at which out-of-fold FPR <= max_train_fpr on each scored harmless training set; "
        "detector: the candidate with the highest out-of-fold TPR on all training harmful prompts (ties: AUC)",
        "layer": choice.layer,
        "pool": choice.pool,
        "l2": choice.l2,
        "weights": choice.weights,
        "threshold": choice.threshold,
        "max_train_fpr": max_fpr,
        "out_of_fold": grid[choice.key],
        "train_sizes": {n: len(ps) for n, ps in (train.harmful | train.harmless).items()},
        "heldout": heldout,
        "out_of_fold_grid": {
            "columns": ["auc", "tpr", "threshold"],
            **{k: [round(v["auc"], 4), round(v["tpr"]["all"], 4), round(v["threshold"], 4)] for k, v in grid.items()},
        },
    }
    vector = VECTOR_FILE.format(layer=choice.layer)
    SteeringVector.single(
        probe.weight_D,
        method="logistic_probe",
        layer=choice.layer,
        bias=probe.bias,
        site="resid_post",
        pool=choice.pool,
    ).save(out / vector)
    (out / "refuse.yaml").write_text(
        CONFIG.format(
            layer=choice.layer,
            pool=choice.pool,
            s="" if choice.pool == "last" else "s, averaged",
            vector=vector,
            message=DEFAULT_REFUSAL,
            above=choice.threshold - probe.bias,
            auc=heldout["roc_auc"],
        )
    )
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--out", type=Path, required=True, help="folder for refuse.yaml, vectors/ and report.json")
    ap.add_argument("--model", default=None, help="HF hub id or local folder (default: the embedded model)")
    ap.add_argument("--max-fpr", type=float, default=0.02, help="false-positive budget per harmless training set")
    ap.add_argument("--cap", type=int, default=None, help="at most this many prompts per dataset and split")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--extra-harmless", type=int, default=300, help="MMLU questions added to harmless training")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(args.threads)
    from steerlib import load_model

    model, tok = load_model(args.model)
    report = build(
        model,
        tok,
        args.out,
        max_fpr=args.max_fpr,
        cap=args.cap,
        batch_size=args.batch_size,
        extra_harmless=args.extra_harmless,
    )
    print(json.dumps(report["heldout"], indent=2))


if __name__ == "__main__":
    main()
