"""Attacks on detector gates, measured on the evaluation side of the wrapped sets.

    python -m evals.recipes.wrapped_attacks --out DIR --preset A.yaml B.yaml [--gcg-prompts 5 --steps 100]

- the refusal-feature-ablation attack (:func:`evals.attack.ablation_attack`: the model's own refusal direction,
  from 32 + 32 training prompts, projected out at every layer): a hash-ordered subsample of plain and wrapped
  evaluation prompts re-recorded under the ablation, each gate's flag rates with and without it;
- a white-box GCG attack on each gate (:mod:`evals.recipes.gate_attack`), prefix and suffix, on held-out plain
  harmful requests that the gate flags unattacked: successes within 0, 10, 25, 50 and 100 steps.

Results go to ``DIR/attacks.json`` (rewritten after every attacked prompt, so a stopped run keeps what it did).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from evals.attack import ablation_attack, attack_prompts, refusal_direction
from evals.datasets import Prompt
from evals.jailbreak_templates import hash_key
from evals.recipes.gate_attack import GcgSettings, allowed_tokens, gcg, success_curve
from evals.recipes.token_acts import TokenActs, record_tokens
from evals.recipes.wrapped_detector import LAYERS, embedded_model, gate_of_file, rates, side_acts
from evals.recipes.wrapped_sets import conversation
from evals.report import command_line

log = logging.getLogger(__name__)

ABLATION_SAMPLE = {("harmful", "plain"): 64, ("harmless", "plain"): 64, ("harmful", "rule"): 64,
                   ("harmless", "rule"): 48, ("harmful", "template"): 24, ("harmless", "template"): 16}  # fmt: skip
RULE_GROUPS = ("roleplay", "reformulation", "multiturn")


def cell(p: Prompt) -> tuple[str, str]:
    g = p.meta["group"]
    return p.meta["kind"], "plain" if g == "plain" else "rule" if g in RULE_GROUPS else "template"


def ablation_sample(prompts: Sequence[Prompt], sizes: dict[tuple[str, str], int] = ABLATION_SAMPLE) -> list[int]:
    """Indices of a hash-ordered subsample, ``sizes`` per (kind, plain / rule-made / template) cell."""
    order = sorted(range(len(prompts)), key=lambda i: hash_key("ablation", prompts[i].id))
    taken: dict[tuple[str, str], int] = {}
    out = []
    for i in order:
        c = cell(prompts[i])
        if taken.get(c, 0) < sizes.get(c, 0):
            taken[c] = taken.get(c, 0) + 1
            out.append(i)
    return sorted(out)


def ablation_report(
    model: Any, tok: Any, prompts: Sequence[Prompt], acts: TokenActs, presets: Sequence[Path], out: Path
) -> dict[str, Any]:
    harmful, harmless = attack_prompts(32)
    direction = refusal_direction(model, tok, harmful, harmless)
    idx = ablation_sample(prompts)
    sub = [prompts[i] for i in idx]
    convs = [conversation(p) for p in sub]
    from steerlib.hf.hooks import steer

    with steer(model, ablation_attack(direction)):
        layers = sorted({*LAYERS, *(gate_of_file(p).layer for p in presets)})  # one cache for every preset
        attacked = record_tokens(model, tok, [c for c, _ in convs], [a for _, a in convs], layers, out / ".ablated")
    clean = acts.take(idx)
    return {
        str(p): {
            "clean": rates(sub, gate_of_file(p).fires(clean)),
            "ablated": rates(sub, gate_of_file(p).fires(attacked)),
        }
        for p in presets
    }


def gcg_targets(prompts: Sequence[Prompt], n: int) -> list[Prompt]:
    """``n`` plain held-out harmful requests, hash-ordered, under 200 characters (the attack's compute grows with
    the prompt)."""
    pool = [p for p in prompts if p.meta["group"] == "plain" and p.meta["kind"] == "harmful" and len(p.text) < 200]
    return sorted(pool, key=lambda p: hash_key("gcg", p.id))[:n]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--out", type=Path, required=True, help="the folder of a wrapped_detector record run")
    ap.add_argument("--preset", type=Path, nargs="+", required=True, help="presets (YAML) or a fit's gate.json")
    ap.add_argument("--no-ablation", action="store_true")
    ap.add_argument("--gcg-prompts", type=int, default=5)
    ap.add_argument("--where", nargs="+", default=["prefix", "suffix"], choices=["prefix", "suffix"])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--n-adv", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    model, tok = embedded_model(args.threads)
    command = command_line("evals.recipes.wrapped_attacks", argv)
    report: dict[str, Any] = {"command": command}
    path = args.out / "attacks.json"
    prompts, acts = side_acts(model, tok, "eval", args.out)
    if not args.no_ablation:
        report["ablation"] = ablation_report(model, tok, prompts, acts, args.preset, args.out)
        path.write_text(json.dumps(report, indent=2))
    ok = allowed_tokens(tok, int(model.config.vocab_size))
    targets = gcg_targets(prompts, args.gcg_prompts)
    report["gcg"] = {}
    for preset in args.preset:
        gate = gate_of_file(preset)
        for where in args.where:
            s = GcgSettings(n_adv=args.n_adv, steps=args.steps, batch=args.batch, where=where)
            results = []
            for p in targets:
                results.append(gcg(model, tok, gate, p.text, ok, s))
                report["gcg"][f"{preset} {where}"] = {
                    "settings": asdict(s),
                    "n": len(results),
                    "successes_within_steps": success_curve(results),
                    "attacks": [asdict(r) for r in results],
                }
                path.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v["successes_within_steps"] for k, v in report["gcg"].items()}, indent=2))


if __name__ == "__main__":
    main()
