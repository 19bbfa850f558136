"""Detector-gated refusal for a model: fit a harmfulness probe, ship it as a ``refuse`` config.

    python -m evals.recipes.detector --out steerlib_presets/refusal_detector [--model NAME] [--max-fpr 0.02]
        [--fit-on train|both] [--mlp-hidden 32]

Steps (with ``--fit-on train``, all on the ``train`` halves of the benchmark splits, so every reported number is on
prompts the detector never saw): record each prompt's activation at several layers, at its last token and averaged
over its tokens; score every candidate (pooling, layer, and a logistic probe per L2 and weighting of the harmless
sets or an MLP probe per ``--mlp-hidden`` width) out of fold (5 folds by prompt hash); give each candidate the
lowest threshold at which at most ``max_fpr`` of each scored harmless training set (benign, paired-benign,
over-refusal) fires; keep the candidate that then flags the most training harmful prompts (ties: higher AUC); refit
it on all training prompts. Only that one detector is scored on the held-out halves. The config answers a flagged
prompt with a fixed refusal (``op: refuse``, reading ``vectors/`` for a logistic probe or ``probes/`` for an MLP
probe); ``report.json`` holds the out-of-fold grid, the held-out ROC AUC and the true / false positive rates per
dataset at the shipped threshold.

With ``--fit-on both`` the same steps run on both halves (more prompts for the small harmless sets) and the recipe is
judged by nested cross-validation (:func:`evals.recipes.detector_select.nested_cv`: each prompt scored by the recipe
run without it), plus, with ``--cap``, on prompts beyond the cap that no run uses and on held-out-half MMLU questions.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from torch import Tensor, nn

from evals.datasets import HARMFUL_SETS, HARMLESS_SETS, Part, Prompt, in_train, load_dataset, load_mmlu, split
from evals.metrics import wilson
from evals.recipes.activations import Pool, cached_last_token_activations
from evals.recipes.detector_select import (
    L2_GRID,
    NEG_WEIGHTS,
    Choice,
    Features,
    NestedCv,
    Sets,
    choose,
    fit_choice,
    nested_cv,
)
from evals.recipes.probe import roc_auc
from evals.report import command_line
from steerlib.config import DEFAULT_REFUSAL, SteeringConfig
from steerlib.devices import add_device_arguments
from steerlib.extract.probes import LinearProbe, Probe
from steerlib.mlp_probe import MlpProbe
from steerlib.vectors import SteeringVector

log = logging.getLogger(__name__)

HALVES: dict[str, tuple[Part, ...]] = {"train": ("train",), "heldout": ("heldout",), "both": ("train", "heldout")}
LAYERS = (6, 9, 12, 15, 18, 21)
POOLS: tuple[Pool, ...] = ("last", "mean")


def load_sets(part: Literal["train", "heldout", "both"], cap: int | None, *, extra_harmless: int = 0) -> Sets:
    """Each dataset's ``train`` or ``heldout`` half (its first ``cap`` prompts), or ``both``: the two capped halves."""

    def take(name: str) -> list[Prompt]:
        prompts = load_dataset(name)
        return [p for half in HALVES[part] for p in split(prompts, half)[:cap]]

    harmless = {n: take(n) for n in HARMLESS_SETS}
    if extra_harmless:
        harmless["mmlu_questions"] = mmlu_questions(train=True, n=extra_harmless)
    return Sets({n: take(n) for n in HARMFUL_SETS}, harmless)


def mmlu_questions(*, train: bool, n: int) -> list[Prompt]:
    """``n`` MMLU questions of the train (or held-out) half as benign requests, in an order fixed by a hash of their
    text, so that they spread over the 57 subjects (the file is sorted by subject, moral scenarios first)."""
    questions = [q for q in load_mmlu() if in_train(q.question) == train]
    questions.sort(key=lambda q: hashlib.sha256(q.question.encode()).digest())
    return [Prompt(q.id, q.question, "mmlu") for q in questions[:n]]


def fresh_sets(cap: int | None, mmlu: int) -> Sets:
    """Prompts no ``--cap cap`` run uses: each harmful dataset's prompts beyond the cap in either half (none without
    a cap), and ``mmlu`` MMLU questions of the held-out half as benign requests. Datasets with none left are left
    out."""

    def rest(name: str) -> list[Prompt]:
        if cap is None:
            return []
        prompts = load_dataset(name)
        return [p for half in HALVES["both"] for p in split(prompts, half)[cap:]]

    harmful = {n: ps for n in HARMFUL_SETS if (ps := rest(n))}
    return Sets(harmful, {"mmlu_questions": mmlu_questions(train=False, n=mmlu)})


def rate_facts(margins: Tensor) -> dict[str, Any]:
    """How many of these prompts are flagged (margin ``score - threshold`` above 0), with a Wilson 95% interval."""
    r = wilson(int((margins > 0).sum()), len(margins))
    return r.as_json() if r.n else {"k": 0, "n": 0}


def rates_report(pos: dict[str, Tensor], neg: dict[str, Tensor]) -> dict[str, Any]:
    """ROC AUC and flag rates per dataset from margins ``score - threshold`` of harmful (``pos``) and harmless
    (``neg``) prompts."""
    all_pos, all_neg = (torch.cat([torch.empty(0, device="cpu"), *d.values()]) for d in (pos, neg))
    return {
        "roc_auc": roc_auc(all_pos, all_neg) if len(all_pos) and len(all_neg) else None,
        "true_positive_rate": {n: rate_facts(m) for n, m in pos.items()} | {"all": rate_facts(all_pos)},
        "false_positive_rate": {n: rate_facts(m) for n, m in neg.items()} | {"all": rate_facts(all_neg)},
    }


def scored_report(
    model: nn.Module,
    tok: Any,
    probe: Probe,
    choice: Choice,
    sets: Sets,
    cache: Path,
    batch_size: int,
    layers: tuple[int, ...] = LAYERS,
) -> dict[str, Any]:
    """:func:`rates_report` of the fitted detector on ``sets``, at its threshold."""

    def margins(prompts: list[Prompt]) -> Tensor:
        texts = [p.text for p in prompts]
        acts = cached_last_token_activations(model, tok, texts, layers, cache, batch_size=batch_size, pool=choice.pool)
        return probe.scores(acts[choice.layer]) - choice.threshold

    return rates_report(
        {n: margins(ps) for n, ps in sets.harmful.items()}, {n: margins(ps) for n, ps in sets.harmless.items()}
    )


def in_sample_report(
    probe: Probe, choice: Choice, sets: Sets, acts_pos: Features, acts_neg: Features
) -> dict[str, Any]:
    """:func:`rates_report` of the fitted detector on the prompts it was fitted on (not a measure of quality: a check
    that the shipped config reproduces the probe)."""

    def margins(kind: str, acts: Features) -> dict[str, Tensor]:
        return sets.by_set(kind, probe.scores(acts[choice.pool][choice.layer]) - choice.threshold)

    return rates_report(margins("harmful", acts_pos), margins("harmless", acts_neg))


def nested_report(cv: NestedCv, folds: int, max_fpr: float) -> dict[str, Any]:
    return {
        "what": f"the whole recipe (choice of pooling, layer, L2, weighting and threshold at max_fpr {max_fpr}, then "
        f"the fit) run {folds} times, each without one fold of the prompts, which its detector then scores: every "
        "prompt judged by a detector that never saw it",
        **rates_report(cv.harmful, cv.harmless),
        "choices": [c.key for c in cv.choices],
    }


VECTOR_FILE = "vectors/harm_detector_{fit_on}_l{layer}.safetensors"
PROBE_FILE = "probes/harm_detector_{fit_on}_l{layer}_{probe}.safetensors"
CONFIG_FILE = "refuse.yaml"


def save_detector(probe: Probe, choice: Choice, out: Path, fit_on: str) -> tuple[dict[str, Any], str, float]:
    """Write the probe where the config will find it; returns the condition's source (its ``when`` fields naming the
    file), a description and the threshold it compares against (the linear probe's bias is folded into the
    threshold, the MLP's is kept)."""
    meta = {"layer": choice.layer, "site": "resid_post", "pool": choice.pool, "fit": choice.key}
    if isinstance(probe, LinearProbe):
        vector = VECTOR_FILE.format(fit_on=fit_on, layer=choice.layer)
        SteeringVector.single(probe.weight_D, method="logistic_probe", bias=probe.bias, **meta).save(out / vector)
        return {"vector": vector, "metric": "dot"}, "a logistic probe", choice.threshold - probe.bias
    if isinstance(probe, MlpProbe):
        path = PROBE_FILE.format(fit_on=fit_on, layer=choice.layer, probe=choice.probe)
        MlpProbe(*probe.tensors(), {k: str(v) for k, v in meta.items()}).save(out / path)
        return {"probe": path}, f"an MLP probe ({choice.probe.removeprefix('mlp')} hidden ReLUs)", choice.threshold
    raise TypeError(f"cannot ship a {type(probe).__name__}")


def detector_config(
    choice: Choice, source: dict[str, Any], above: float, description: str, message: str = DEFAULT_REFUSAL
) -> dict[str, Any]:
    """The shipped config as data: one ``refuse`` op at the chosen layer, its condition the probe of ``source`` over
    the chosen pooling above ``above`` (rounded to 6 decimals)."""
    when = source | {"above": round(above, 6), "scope": "prompt", "aggregate": choice.pool}
    refuse = {
        "layer": choice.layer,
        "op": "refuse",
        "name": f"harm-probe-l{choice.layer}",
        "message": message,
        "apply": {"when": when},
    }
    return {"description": description, "interventions": [refuse]}


def write_config(out: Path, config: dict[str, Any]) -> Path:
    """``out/refuse.yaml``, checked to load as a steering config first."""
    SteeringConfig.from_dict(config, base_dir=out)
    path = out / CONFIG_FILE
    path.write_text(yaml.safe_dump(config, sort_keys=False, width=116))
    return path


def features(
    model: nn.Module, tok: Any, sets: Sets, layers: tuple[int, ...], cache: Path, batch_size: int
) -> tuple[Features, Features]:
    """The (cached) activations of the harmful and of the harmless prompts, per pooling and layer."""
    pos: Features = {}
    neg: Features = {}
    for pool in POOLS:
        for acts, kind in ((pos, "harmful"), (neg, "harmless")):
            acts[pool] = cached_last_token_activations(
                model, tok, sets.texts(kind), layers, cache, pool=pool, batch_size=batch_size, progress=True
            )
    return pos, neg


def choice_report(choice: Choice, grid: dict[str, Any], max_fpr: float, candidates: dict[str, Any]) -> dict[str, Any]:
    """What was chosen, by which rule, among which candidates, and how it scored out of fold."""
    return {
        "choice": asdict(choice),
        "rule": "threshold: the lowest at which out-of-fold FPR <= max_train_fpr on each scored harmless training set; "
        "detector: the candidate with the highest out-of-fold TPR on all training harmful prompts (ties: AUC)",
        "layer": choice.layer,
        "pool": choice.pool,
        "l2": choice.l2,
        "weights": choice.weights,
        "threshold": choice.threshold,
        "max_train_fpr": max_fpr,
        "candidates": candidates,
        "out_of_fold": grid[choice.key],
    }


def build(
    model: nn.Module,
    tok: Any,
    out: Path,
    *,
    max_fpr: float,
    cap: int | None,
    batch_size: int,
    extra_harmless: int,
    fit_on: Literal["train", "both"] = "train",
    folds: int = 5,
    fresh_mmlu: int = 500,
    layers: tuple[int, ...] = LAYERS,
    l2_grid: tuple[float, ...] = L2_GRID,
    mlp_hidden: tuple[int, ...] = (32,),
    command: str = "",
) -> dict[str, Any]:
    """Choose, fit and ship the detector; report it on the held-out halves (``fit_on="train"``), or, fitted on both
    halves, by nested cross-validation over all of them plus the prompts no run has used (``fit_on="both"``)."""
    train = load_sets(fit_on, cap, extra_harmless=extra_harmless)
    cache = out / ".activations"
    acts_pos, acts_neg = features(model, tok, train, layers, cache, batch_size)
    choice, grid = choose(acts_pos, acts_neg, train, max_fpr, l2_grid=l2_grid, mlp_hidden=mlp_hidden)
    log.info("chose %s: out-of-fold TPR %.4f at threshold %.4f", choice.key, choice.tpr, choice.threshold)
    probe = fit_choice(acts_pos, acts_neg, train, choice)
    candidates = {
        "layers": list(layers),
        "pools": list(POOLS),
        "l2": list(l2_grid),
        "weights": list(NEG_WEIGHTS),
        "mlp_hidden": list(mlp_hidden),
    }
    report: dict[str, Any] = {"command": command, "fit_on": fit_on} | choice_report(choice, grid, max_fpr, candidates)
    report["train_sizes"] = {n: len(ps) for n, ps in (train.harmful | train.harmless).items()}
    report["in_sample"] = in_sample_report(probe, choice, train, acts_pos, acts_neg)
    if fit_on == "train":
        report["heldout"] = scored_report(
            model, tok, probe, choice, load_sets("heldout", cap), cache, batch_size, layers
        )
        auc = report["heldout"]["roc_auc"]
    else:
        log.info("nested cross-validation: the recipe %d more times", folds)
        fresh = fresh_sets(cap, fresh_mmlu)
        report["fresh"] = scored_report(model, tok, probe, choice, fresh, cache, batch_size, layers)
        cv = nested_cv(acts_pos, acts_neg, train, max_fpr, folds, l2_grid=l2_grid, mlp_hidden=mlp_hidden)
        report["nested_cv"] = nested_report(cv, folds, max_fpr)
        auc = report["nested_cv"]["roc_auc"]
    report["out_of_fold_grid"] = {
        "columns": ["auc", "tpr", "threshold"],
        **{k: [round(v["auc"], 4), round(v["tpr"]["all"], 4), round(v["threshold"], 4)] for k, v in grid.items()},
    }
    source, what, above = save_detector(probe, choice, out, fit_on)
    judged = "nested cross-validation over every prompt" if fit_on == "both" else "held-out"
    write_config(out, detector_config(choice, source, above, description(choice, what, auc, judged)))
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def description(choice: Choice, what: str, auc: float, judged: str) -> str:
    """What the shipped config says about itself."""
    where = "last prompt token" if choice.pool == "last" else "averaged over the prompt's tokens"
    return (
        f"Detector-gated refusal, built by `python -m evals.recipes.detector`: {what} on the prompt's activation "
        f"({where}) after layer {choice.layer} flags harmful requests; a flagged request is answered with a fixed "
        f"refusal. ROC AUC {auc:.4f} ({judged}); see report.json for true / false positive rates per dataset."
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--out", type=Path, required=True, help="folder for refuse.yaml, vectors/ and report.json")
    ap.add_argument("--model", default=None, help="HF hub id or local folder (default: the embedded model)")
    add_device_arguments(ap)
    ap.add_argument("--max-fpr", type=float, default=0.02, help="false-positive budget per harmless training set")
    ap.add_argument("--cap", type=int, default=None, help="at most this many prompts per dataset and split")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--extra-harmless", type=int, default=300, help="MMLU questions added to harmless training")
    ap.add_argument(
        "--fit-on",
        choices=["train", "both"],
        default="train",
        help="train: fit on the train halves, report on the held-out halves; both: fit on both halves, "
        "report by nested cross-validation and on prompts beyond --cap",
    )
    ap.add_argument("--layers", type=int, nargs="+", default=list(LAYERS), help="candidate layers")
    ap.add_argument("--l2", type=float, nargs="+", default=list(L2_GRID), help="candidate L2 penalties")
    ap.add_argument(
        "--mlp-hidden",
        type=int,
        nargs="*",
        default=[32],
        help="widths of the MLP probe candidates (none: linear probes only)",
    )
    ap.add_argument("--fresh-mmlu", type=int, default=500, help="held-out-half MMLU questions scored as fresh benign")
    ap.add_argument("--folds", type=int, default=5, help="outer folds of the nested cross-validation (--fit-on both)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if not 0 <= args.max_fpr < 1:
        ap.error(f"--max-fpr must be in [0, 1), got {args.max_fpr}")
    if args.folds < 2:
        ap.error(f"--folds must be at least 2, got {args.folds}")
    if any(h < 1 for h in args.mlp_hidden):
        ap.error(f"--mlp-hidden widths must be at least 1, got {args.mlp_hidden}")
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(args.threads)
    from steerlib import load_model

    model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
    report = build(
        model,
        tok,
        args.out,
        max_fpr=args.max_fpr,
        cap=args.cap,
        batch_size=args.batch_size,
        extra_harmless=args.extra_harmless,
        fit_on=args.fit_on,
        folds=args.folds,
        fresh_mmlu=args.fresh_mmlu,
        layers=tuple(args.layers),
        l2_grid=tuple(args.l2),
        mlp_hidden=tuple(args.mlp_hidden),
        command=command_line("evals.recipes.detector", argv),
    )
    print(json.dumps(report.get("heldout") or report["nested_cv"], indent=2))


if __name__ == "__main__":
    main()
