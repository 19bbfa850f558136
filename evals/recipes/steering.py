"""Conditional refusal steering for a model: a learned refusal vector added only where a harm probe fires.

    python -m evals.recipes.steering --out DIR [--model NAME] [--gate servers/presets/refusal_detector_v2.yaml]
    python -m evals.recipes.steering --out DIR --measure servers/presets/refusal_steering.yaml [--heldout-cap N]

Conditional activation steering (Lee et al., arXiv 2409.05907): a behaviour vector is added to the residual stream
of a row only when a condition read from its prompt fires. Here the condition is a harmfulness probe (by default the
logistic probe and threshold of the detector recipe, :mod:`evals.recipes.detector`, fitted on training splits only)
and the behaviour vector is learned (:mod:`evals.recipes.learned_vector`) at the probe's layer. Steps, all on the
``train`` halves of the benchmark splits:

1. split the training prompts into a fitting part and a validation part (a fixed hash fold);
2. record the model's own greedy answers to the fitting harmless prompts (the keep targets);
3. learn the vector: refusals after fitting harmful prompts, the model's own answers after harmless ones;
4. choose its coefficient on the validation part with the vector always on (ungated): the smallest one whose
   coherent refusal rate on validation harmful prompts reaches ``--target``;
5. write the gated config (``refusal_steering.yaml`` + ``vectors/``) and, unless ``--no-heldout``, measure it on
   the ``heldout`` halves against the unsteered model and a same-norm random vector under the same gate
   (:func:`evals.controls.random_control`): refusal per dataset with Wilson intervals (coherent refusals only,
   :mod:`evals.coherence`), CE on benign text, MMLU accuracy on held-out questions; all in ``report.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from evals.attack import ablation_attack, describe_attack, middle_layer, refusal_direction
from evals.benign_text import BENIGN_PARAGRAPHS
from evals.capability import mmlu_accuracy, text_cost
from evals.controls import combine, random_control
from evals.datasets import Prompt, in_train, load_dataset, load_mmlu, split, subset
from evals.metrics import Rate, rate
from evals.recipes.detector import HARMFUL, HARMLESS, load_sets
from evals.recipes.detector_select import Sets, fold_of
from evals.recipes.learned_vector import Example, TrainSettings, train_vector
from evals.recipes.refat_eval import attack_prompts
from evals.runner import Arm, PromptSet, Row, Scorer, perplexity_scorer, run, summarise
from evals.targets import InProcessTarget
from steerlib.config import RefuseOp, SteeringConfig
from steerlib.devices import add_device_arguments
from steerlib.hf.generate import generate
from steerlib.vectors import SteeringVector

log = logging.getLogger(__name__)

REFUSALS = (
    "I'm sorry, but I can't help with that request.",
    "I'm sorry, but I can't assist with that.",
    "I'm sorry, but I can't help with that. It could cause harm.",
)
"""Refusal targets, cycled over the harmful training prompts."""
VALIDATION_FOLD = 0
FOLDS = 5


@dataclass(frozen=True)
class Gate:
    """The prompt condition of a detector: its probe file's score on the prompt after ``layer`` above ``above``."""

    layer: int
    file: Path
    """A linear probe (a vector file, scored with ``metric``) or, with ``kind="probe"``, an MLP probe file."""
    metric: str
    above: float
    aggregate: str = "last"
    kind: str = "vector"

    @property
    def folder(self) -> str:
        return "vectors" if self.kind == "vector" else "probes"

    def when(self) -> dict[str, Any]:
        """The ``when`` condition, the probe file under ``{folder}/`` of the recipe's output."""
        metric = {"metric": self.metric} if self.kind == "vector" else {}
        where = {self.kind: f"{self.folder}/{self.file.name}"}
        return where | metric | {"above": self.above, "scope": "prompt", "aggregate": self.aggregate}


def load_preset(path: Path) -> SteeringConfig:
    """A server preset (a steering config plus a ``description``) as a config; file paths resolve against its folder."""
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a preset is a mapping with 'description' and 'interventions'")
    data.pop("description", None)
    return SteeringConfig.from_dict(data, base_dir=path.resolve().parent)


def read_gate(preset: Path) -> Gate:
    """The condition of the first ``refuse`` op of a detector config (its probe, metric, pooling and threshold)."""
    cfg = load_preset(preset)
    for iv in cfg.interventions:
        if isinstance(iv, RefuseOp) and iv.apply.when is not None:
            w = iv.apply.when
            ref, kind = (w.vector, "vector") if w.probe is None else (w.probe, "probe")
            if not isinstance(iv.layer, int) or not isinstance(ref, str) or w.above is None:
                raise ValueError(f"{preset}: the refuse op needs one layer, a vector or probe file and 'above'")
            return Gate(iv.layer, cfg.resolve(ref), w.metric, w.above, w.aggregate, kind)
    raise ValueError(f"{preset}: no 'refuse' op with a 'when' condition to use as the gate")


def steering_config(out: Path, gate: Gate, coefficient: float, *, gated: bool = True) -> SteeringConfig:
    """The add op of the recipe (vector files under ``out/vectors``), with or without the gate."""
    apply: dict[str, Any] = {"tokens": "all"}
    if gated:
        apply["when"] = gate.when()
    iv = {
        "layer": gate.layer,
        "site": "resid_post",
        "op": "add",
        "vector": f"vectors/refusal_learned_l{gate.layer}.safetensors",
        "coefficient": coefficient,
        "apply": apply,
    }
    return SteeringConfig.from_dict({"interventions": [iv]}, base_dir=out)


PRESET = """\
description: >-
  Conditional refusal steering (Lee et al., arXiv 2409.05907), built by `python -m evals.recipes.steering`: a
  steering vector learned by gradient descent ({trained_on}, model frozen) is added after layer {layer} to every
  token of a row, only when the detector's harmfulness probe (layer {layer}, {where}) fires on its prompt.
  The model writes the refusal itself (no fixed message). Coefficient {coefficient:g} chosen on training prompts.
  Held-out numbers: evals/recipes/results/refusal_steering_smollm2.json.
interventions:
  - op: add
    layer: {layer}
    site: resid_post
    vector: vectors/refusal_learned_l{layer}.safetensors
    coefficient: {coefficient}
    apply:
      tokens: all
      when: {when}
"""


def write_preset(out: Path, gate: Gate, coefficient: float, *, keep: bool) -> Path:
    """``out/refusal_steering.yaml``: the gated config as a server preset (checked to load as the recipe's config)."""
    trained_on = "refusals after training harmful prompts" + (
        ", the model's own answers after training harmless ones" if keep else ""
    )
    text = PRESET.format(
        trained_on=trained_on,
        layer=gate.layer,
        coefficient=coefficient,
        where="last prompt token" if gate.aggregate == "last" else f"{gate.aggregate} over the prompt",
        when=yaml.safe_dump(gate.when(), default_flow_style=True, sort_keys=False, width=10**6).strip(),
    )
    path = out / "refusal_steering.yaml"
    path.write_text(text)
    written, meant = load_preset(path), steering_config(out, gate, coefficient)
    if written.interventions != meant.interventions:
        raise RuntimeError(f"{path} does not load as the recipe's config: {written.interventions}")
    return path


def parts(train: Sets) -> tuple[Sets, Sets]:
    """(fitting, validation) parts of the training prompts, by a fixed hash fold of each prompt."""

    def keep(group: dict[str, list[Prompt]], val: bool) -> dict[str, list[Prompt]]:
        return {n: [p for p in ps if (fold_of(p.text, FOLDS) == VALIDATION_FOLD) == val] for n, ps in group.items()}

    return Sets(keep(train.harmful, False), keep(train.harmless, False)), Sets(
        keep(train.harmful, True), keep(train.harmless, True)
    )


def examples(
    model: nn.Module, tok: Any, fit: Sets, *, keep_tokens: int, batch_size: int
) -> tuple[list[Example], list[Example]]:
    """Refusal targets for the harmful prompts; the model's own answers to the harmless ones (none if ``keep_tokens``
    is 0)."""
    refuse = [Example(t, REFUSALS[i % len(REFUSALS)]) for i, t in enumerate(fit.texts("harmful"))]
    harmless = fit.texts("harmless")
    if keep_tokens == 0:
        return refuse, []
    answers = generate(model, tok, harmless, max_new_tokens=keep_tokens, batch_size=batch_size)
    return refuse, [Example(t, g.text) for t, g in zip(harmless, answers, strict=True) if g.text]


def pooled(rows: Sequence[Row], arm: str, kind: str) -> Rate:
    return rate([r.refused and not r.degenerate for r in rows if r.arm == arm and r.kind == kind])


def search(
    model: nn.Module,
    tok: Any,
    out: Path,
    gate: Gate,
    val: Sets,
    coefficients: Sequence[float],
    target: float,
    batch_size: int,
    max_new_tokens: int,
) -> tuple[float, dict[str, Any]]:
    """The smallest coefficient whose ungated coherent refusal on validation harmful prompts reaches ``target``
    (else the one with the best harmful-minus-harmless margin)."""
    arms = [Arm(f"ungated@c={c:g}", steering_config(out, gate, c, gated=False), c) for c in coefficients]
    sets = [PromptSet("val_harmful", "harmful", [p for ps in val.harmful.values() for p in ps])]
    sets.append(PromptSet("val_harmless", "harmless", [p for ps in val.harmless.values() for p in ps]))
    target_ = InProcessTarget(model, tok, batch_size=batch_size)
    rows = run(
        target_,
        sets,
        arms,
        max_new_tokens=max_new_tokens,
        scorer=Scorer(perplexity=perplexity_scorer(model, tok)),
        progress=True,
    )
    table = {a.name: {k: pooled(rows, a.name, k).as_json() for k in ("harmful", "harmless")} for a in arms}
    harmful = {c: pooled(rows, a.name, "harmful").value for c, a in zip(coefficients, arms, strict=True)}
    harmless = {c: pooled(rows, a.name, "harmless").value for c, a in zip(coefficients, arms, strict=True)}
    return choose_coefficient(harmful, harmless, target), table


def choose_coefficient(harmful: dict[float, float], harmless: dict[float, float], target: float) -> float:
    """The smallest coefficient whose harmful refusal rate reaches ``target``; else the best harmful - harmless."""
    if not harmful:
        raise ValueError("choose_coefficient: no coefficients were measured")
    reached = [c for c, r in harmful.items() if r >= target]
    if reached:
        return min(reached)
    return max(harmful, key=lambda c: harmful[c] - harmless[c])


def default_arms(config: SteeringConfig) -> list[Arm]:
    """The unsteered model, the recipe, and a same-norm random vector under the same gate (the recipe's control)."""
    control = random_control(config, seed=0)
    return [Arm("baseline", None), Arm("recipe", config), Arm("random(recipe)", control, control_of="recipe")]


def heldout(
    model: nn.Module,
    tok: Any,
    config: SteeringConfig,
    *,
    cap: int,
    mmlu_n: int,
    batch_size: int,
    max_new_tokens: int,
    out: Path,
    arms: Sequence[Arm] | None = None,
) -> dict[str, Any]:
    """The gated config, the unsteered model and a same-norm random vector under the same gate, on held-out sets.

    ``arms`` replaces those three (each arm with a config gets its benign-text cost, each that is not a control its
    MMLU accuracy next to the unsteered model's); the rows go to ``out/heldout_rows.jsonl``.
    """
    sets = [PromptSet(n, "harmful", subset(split(load_dataset(n), "heldout"), cap)) for n in HARMFUL]
    sets += [PromptSet(n, "harmless", subset(split(load_dataset(n), "heldout"), cap)) for n in HARMLESS]
    if arms is None:
        arms = default_arms(config)
    scorer = Scorer(perplexity=perplexity_scorer(model, tok))
    target = InProcessTarget(model, tok, batch_size=batch_size)
    rows = run(target, sets, list(arms), max_new_tokens=max_new_tokens, scorer=scorer, progress=True)
    with (out / "heldout_rows.jsonl").open("w") as f:
        f.writelines(json.dumps(r.as_dict()) + "\n" for r in rows)
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
        mine = [r for r in rows if r.arm == a.name]
        counted = [r for r in mine if r.refused]
        report["pooled"][a.name] = {
            "harmful": pooled(rows, a.name, "harmful").as_json(),
            "harmless": pooled(rows, a.name, "harmless").as_json(),
            "degenerate_among_refusals": rate([r.degenerate for r in counted]).as_json(),
        }
    for a in arms:
        if isinstance(a.steering, SteeringConfig):
            report.setdefault("benign_text_ce", {})[a.name] = asdict(
                text_cost(model, tok, BENIGN_PARAGRAPHS, a.steering)
            )
    questions = [q for q in load_mmlu() if not in_train(q.question)][:mmlu_n]
    scored: list[tuple[str, SteeringConfig | None]] = [("baseline", None)]
    scored += [(a.name, a.steering) for a in arms if isinstance(a.steering, SteeringConfig) and not a.control_of]
    report["mmlu"] = {
        name: mmlu_accuracy(model, tok, questions, cfg, batch_size=batch_size).as_json() for name, cfg in scored
    }
    return report


def heldout_as_told(
    model: nn.Module, tok: Any, config: SteeringConfig, args: argparse.Namespace, arms: Sequence[Arm] | None = None
) -> dict[str, Any]:
    """:func:`heldout` with the command line's ``--heldout-cap``, ``--mmlu``, ``--batch-size``, ``--max-new-tokens``
    and ``--out``."""
    return heldout(
        model,
        tok,
        config,
        cap=args.heldout_cap,
        mmlu_n=args.mmlu,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        out=args.out,
        arms=arms,
    )


def build(model: nn.Module, tok: Any, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    gate = read_gate(args.gate)
    for folder in {"vectors", gate.folder}:
        (out / folder).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(gate.file, out / gate.folder / gate.file.name)
    fit, val = parts(load_sets("train", args.train_cap))
    keep_tokens = args.keep_tokens if args.keep_weight > 0 else 0
    refuse, keep = examples(model, tok, fit, keep_tokens=keep_tokens, batch_size=args.batch_size)
    settings = TrainSettings(
        layer=gate.layer,
        steps=args.steps,
        lr=args.lr,
        keep_weight=args.keep_weight,
        max_norm=args.max_norm,
        seed=args.seed,
    )
    trained = train_vector(model, tok, refuse, keep, settings, progress=True)
    SteeringVector.single(trained.vector_D, method="learned_refusal", layer=gate.layer, site="resid_post").save(
        out / f"vectors/refusal_learned_l{gate.layer}.safetensors"
    )
    chosen, table = search(
        model, tok, out, gate, val, args.coefficients, args.target, args.batch_size, args.max_new_tokens
    )
    config = steering_config(out, gate, chosen)
    write_preset(out, gate, chosen, keep=bool(keep))
    report: dict[str, Any] = {
        "gate": {"layer": gate.layer, "when": gate.when(), "from": str(args.gate)},
        "training": asdict(settings)
        | {
            "n_refuse": len(refuse),
            "n_keep": len(keep),
            "vector_norm": float(trained.vector_D.norm()),
            "loss_first": trained.history[0],
            "loss_last": trained.history[-1],
        },
        "search": {
            "validation_n": {"harmful": len(val.texts("harmful")), "harmless": len(val.texts("harmless"))},
            "ungated": table,
            "target": args.target,
            "chosen_coefficient": chosen,
        },
        "max_new_tokens": args.max_new_tokens,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    if not args.no_heldout:
        report["heldout"] = heldout_as_told(model, tok, config, args)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def measure(model: nn.Module, tok: Any, preset: Path, args: argparse.Namespace) -> dict[str, Any]:
    """An existing gated config on the held-out sets, against the unsteered model and its random control; with
    ``--attack N`` also under the refusal-feature-ablation attack (the model's refusal direction from ``N`` training
    prompts of each kind, ablated at every layer, :mod:`evals.attack`)."""
    config = load_preset(preset)
    arms = default_arms(config)
    report: dict[str, Any] = {
        "preset": str(preset),
        "heldout_cap": args.heldout_cap,
        "max_new_tokens": args.max_new_tokens,
    }
    if args.attack:
        harmful_train, harmless_train = attack_prompts(args.attack)
        attack = ablation_attack(refusal_direction(model, tok, harmful_train, harmless_train))
        arms.append(Arm("recipe+attack", combine(config, attack)))
        report["attack"] = describe_attack(middle_layer(model), len(harmful_train), len(harmless_train))
    report["heldout"] = heldout_as_told(model, tok, config, args, arms)
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--out", type=Path, required=True, help="folder for refusal_steering.yaml, vectors/, report.json")
    ap.add_argument("--model", default=None, help="HF hub id or local folder (default: the embedded model)")
    add_device_arguments(ap)
    ap.add_argument(
        "--gate",
        type=Path,
        default=Path("servers/presets/refusal_detector_v2.yaml"),
        help="a detector config whose refuse op's condition gates the vector (fitted on train halves only)",
    )
    ap.add_argument("--train-cap", type=int, default=64, help="at most this many training prompts per dataset")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--lr", type=float, default=0.5)
    ap.add_argument("--keep-weight", type=float, default=0.0, help="0: no keep loss (the gate selects)")
    ap.add_argument("--keep-tokens", type=int, default=32, help="length of the model's own answers kept")
    ap.add_argument("--max-norm", type=float, default=None)
    ap.add_argument("--coefficients", type=float, nargs="+", default=[0.25, 0.35, 0.5, 1.0])
    ap.add_argument("--target", type=float, default=0.95, help="validation coherent refusal rate to reach")
    ap.add_argument("--heldout-cap", type=int, default=32, help="held-out prompts per dataset")
    ap.add_argument("--mmlu", type=int, default=100, help="held-out MMLU questions")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--no-heldout", action="store_true", help="build only; skip the held-out measurement")
    ap.add_argument(
        "--measure",
        type=Path,
        default=None,
        metavar="PRESET",
        help="build nothing: measure this gated config (e.g. the shipped preset) on the held-out sets",
    )
    ap.add_argument(
        "--attack",
        type=int,
        default=0,
        metavar="N",
        help="with --measure: also under the refusal-feature-ablation attack (direction from N+N training prompts)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from steerlib import load_model

    model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
    args.out.mkdir(parents=True, exist_ok=True)
    report = build(model, tok, args.out, args) if args.measure is None else measure(model, tok, args.measure, args)
    logging.getLogger(__name__).info("report: %s", json.dumps(report.get("heldout", {}).get("pooled", {}), indent=2))


if __name__ == "__main__":
    main()
