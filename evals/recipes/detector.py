"""Detector-gated refusal for a model: fit a harmfulness probe on training splits, ship it as a ``refuse`` config.

    python -m evals.recipes.detector --out steerlib_presets/refusal_detector [--model NAME] [--max-fpr 0.02]

Steps (all on the ``train`` halves of the benchmark splits, so every reported number is on prompts the detector
never saw): record the last-prompt-token activation at several layers, fit a logistic probe per layer on a
fitting part, pick the layer with the best AUC on a validation part, refit on all training prompts, and set the
threshold so that at most ``max_fpr`` of each training harmless set (benign, paired-benign, over-refusal) fires,
scored out of fold. The config answers a flagged prompt with a fixed refusal (``op: refuse``); ``report.json``
holds the held-out ROC AUC and the true / false positive rates per dataset at the shipped threshold.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from evals.datasets import Prompt, in_train, load_dataset, load_mmlu, split
from evals.recipes.activations import cached_last_token_activations
from evals.recipes.probe import LinearProbe, fit_probe, out_of_fold_scores, rate_above, roc_auc, threshold_at_fpr
from steerlib.config import DEFAULT_REFUSAL
from steerlib.vectors import SteeringVector

log = logging.getLogger(__name__)

HARMFUL = ("harmbench", "advbench", "donotanswer", "harmful_probes")
HARMLESS = ("harmless_probes", "rho_benign", "rho_overrefusal")
EXTRA_HARMLESS_TRAIN = ("mmlu_questions",)
"""Benign questions added to the harmless training prompts only (never scored): more varied benign text."""
LAYERS = (6, 9, 12, 15, 18, 21)
L2_GRID = (1e-3, 1e-2, 1e-1)


@dataclass(frozen=True)
class Sets:
    """Prompts by dataset name, for one part of the split."""

    harmful: dict[str, list[Prompt]]
    harmless: dict[str, list[Prompt]]

    def texts(self, kind: str) -> list[str]:
        return [p.text for ps in getattr(self, kind).values() for p in ps]


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
    layer: int
    l2: float
    auc: float
    threshold: float
    """At most ``max_fpr`` of the out-of-fold harmless training scores are above it."""


def choose(
    acts_pos: dict[int, Tensor], acts_neg: dict[int, Tensor], train: Sets, max_fpr: float, folds: int = 5
) -> tuple[Choice, dict[str, float]]:
    """Layer and regularisation by out-of-fold AUC on the training prompts; threshold from out-of-fold scores.

    The threshold keeps every scored harmless set (not only their union) within ``max_fpr``: a large easy set
    (the extra benign questions) must not buy a loose threshold for the hard ones (over-refusal prompts).
    """
    fp = torch.tensor([fold_of(t, folds) for t in train.texts("harmful")])
    fn = torch.tensor([fold_of(t, folds) for t in train.texts("harmless")])
    set_of = [name for name, ps in train.harmless.items() for _ in ps]
    grid: dict[str, float] = {}
    best: Choice | None = None
    for layer in acts_pos:
        for l2 in L2_GRID:
            s_pos, s_neg = out_of_fold_scores(acts_pos[layer], acts_neg[layer], fp, fn, l2=l2, folds=folds)
            auc = roc_auc(s_pos, s_neg)
            grid[f"layer {layer}, l2 {l2}"] = auc
            if best is None or auc > best.auc:
                per_set = [
                    threshold_at_fpr(s_neg[torch.tensor([n == name for n in set_of])], max_fpr)
                    for name in train.harmless
                    if name not in EXTRA_HARMLESS_TRAIN
                ]
                best = Choice(layer, l2, auc, max(per_set))
    assert best is not None
    return best, grid


def heldout_report(
    model: nn.Module,
    tok: Any,
    probe: LinearProbe,
    layer: int,
    threshold: float,
    held: Sets,
    cache: Path,
    batch_size: int,
) -> dict[str, Any]:
    def scores(prompts: list[Prompt]) -> Tensor:
        texts = [p.text for p in prompts]
        acts = cached_last_token_activations(model, tok, texts, LAYERS, cache, batch_size=batch_size)
        return probe.scores(acts[layer])

    pos = {n: scores(ps) for n, ps in held.harmful.items()}
    neg = {n: scores(ps) for n, ps in held.harmless.items()}
    all_pos, all_neg = torch.cat(list(pos.values())), torch.cat(list(neg.values()))
    return {
        "roc_auc": roc_auc(all_pos, all_neg),
        "true_positive_rate": {n: rate_above(s, threshold) for n, s in pos.items()}
        | {"all": rate_above(all_pos, threshold)},
        "false_positive_rate": {n: rate_above(s, threshold) for n, s in neg.items()}
        | {"all": rate_above(all_neg, threshold)},
        "n": {n: len(s) for n, s in (pos | neg).items()},
    }


CONFIG = """\
# Detector-gated refusal, built by `python -m evals.recipes.detector`: a logistic probe on the last prompt token at
# layer {layer} flags harmful requests; a flagged request is answered with a fixed refusal instead of generating.
# Held-out ROC AUC {auc:.4f}; see report.json for true / false positive rates per dataset.
interventions:
  - layer: {layer}
    op: refuse
    name: harm-probe-l{layer}
    message: "{message}"
    apply:
      when: {{vector: vectors/harm_probe_l{layer}.safetensors, metric: dot, above: {above:.6f}, scope: prompt}}
"""


def build(
    model: nn.Module, tok: Any, out: Path, *, max_fpr: float, cap: int | None, batch_size: int, extra_harmless: int
) -> dict[str, Any]:
    train, held = load_sets("train", cap, extra_harmless=extra_harmless), load_sets("heldout", cap)
    cache = out / ".activations"
    kw: dict[str, Any] = {"batch_size": batch_size, "progress": True}
    acts_pos = cached_last_token_activations(model, tok, train.texts("harmful"), LAYERS, cache, **kw)
    acts_neg = cached_last_token_activations(model, tok, train.texts("harmless"), LAYERS, cache, **kw)
    choice, grid = choose(acts_pos, acts_neg, train, max_fpr)
    layer, threshold = choice.layer, choice.threshold
    probe = fit_probe(acts_pos[layer], acts_neg[layer], l2=choice.l2)
    heldout = heldout_report(model, tok, probe, layer, threshold, held, cache, batch_size)
    report: dict[str, Any] = {
        "layer": layer,
        "l2": choice.l2,
        "out_of_fold_auc": grid,
        "threshold": threshold,
        "max_train_fpr": max_fpr,
        "train_sizes": {"harmful": len(acts_pos[layer]), "harmless": len(acts_neg[layer])},
        "heldout": heldout,
    }
    (out / "vectors").mkdir(parents=True, exist_ok=True)
    SteeringVector.single(
        probe.weight_D, method="logistic_probe", layer=layer, bias=probe.bias, site="resid_post"
    ).save(out / f"vectors/harm_probe_l{layer}.safetensors")
    (out / "refuse.yaml").write_text(
        CONFIG.format(
            layer=layer, message=DEFAULT_REFUSAL, above=threshold - probe.bias, auc=report["heldout"]["roc_auc"]
        )
    )
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--out", type=Path, required=True, help="folder for refuse.yaml, vectors/ and report.json")
    ap.add_argument("--model", default=None, help="HF hub id or local folder (default: the embedded model)")
    ap.add_argument("--max-fpr", type=float, default=0.04, help="false-positive budget per harmless training set")
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
