"""The ``python -m evals`` command line: argument parsing and the orchestration of an eval run.

``run`` writes to ``--out``: ``rows.jsonl`` (one generation per line, written as it goes), ``summary.json``,
``summary.md`` (also printed), PNG plots, ``capability.json`` (with ``--capability``) and
``refusal_direction.safetensors`` (with ``--attack``). Arm names are explained in :mod:`evals.arms`.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evals.datasets import DATASETS, WRAPPED_SETS, Kind, Part, Prompt, load_dataset, mmlu_subset, split, subset

if TYPE_CHECKING:
    from evals.runner import Arm, PromptSet
    from evals.targets import Target

logger = logging.getLogger("evals")


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    from steerlib.devices import add_device_arguments

    p = argparse.ArgumentParser(prog="python -m evals", description="Refusal and capability evals for steerlib.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("datasets", help="list the registered benchmarks")
    _add_run_parser(sub)

    q = sub.add_parser("sae-quality", help="L0, FVU, dead latents, CE loss recovered of one SAE")
    q.add_argument("--sae", required=True)
    q.add_argument("--layer", type=int, required=True)
    q.add_argument("--site", default="resid_post")
    q.add_argument("--model", default=None)
    add_device_arguments(q)
    q.add_argument("--threads", type=int, default=1)

    f = sub.add_parser("feature-report", help="per-token feature-ablation HTML report")
    f.add_argument("--sae", required=True)
    f.add_argument("--layer", type=int, required=True)
    f.add_argument("--feature", type=int, required=True)
    f.add_argument("--text", required=True)
    f.add_argument("--site", default="")
    f.add_argument("--model", default=None)
    add_device_arguments(f)
    f.add_argument("--out", type=Path, default=Path("feature_report.html"))
    f.add_argument("--threads", type=int, default=1)
    return p


def _add_run_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from steerlib.devices import add_device_arguments

    r = sub.add_parser("run", help="generate, judge and summarise: prompt sets x steering arms")
    g = r.add_argument_group("prompts")
    g.add_argument("--harmful", type=_names, default=["harmbench"], help="comma-separated names or files")
    g.add_argument("--harmless", type=_names, default=["harmless_probes"], help="comma-separated names or files")
    g.add_argument("--field", default=None, help="column / key holding the prompt in user CSV / JSON(L) files")
    g.add_argument(
        "--part",
        choices=["heldout", "train", "all"],
        default="heldout",
        help="which split to score (default heldout: vectors come from train)",
    )
    g.add_argument("--limit", type=int, default=None, help="first N prompts of each set (a fixed subset)")
    t = r.add_argument_group("target")
    t.add_argument("--model", default=None, help="in-process model: folder or hub id (default: embedded SmolLM2)")
    add_device_arguments(r, what="the in-process model")
    t.add_argument("--endpoint", default=None, help="OpenAI-compatible base URL (http://host:port/v1) instead")
    t.add_argument("--endpoint-model", default="default", help="model name sent to the endpoint")
    t.add_argument("--api-key", default="not-needed")
    t.add_argument("--system", default=None, help="system prompt for every request")
    t.add_argument("--max-new-tokens", type=int, default=48)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--threads", type=int, default=1, help="torch threads (1 is robust on a shared machine)")
    a = r.add_argument_group("arms")
    a.add_argument("--config", action="append", default=[], metavar="[NAME=]PATH", help="steering config (repeat)")
    a.add_argument("--preset", action="append", default=[], help="server preset name, endpoint only (repeat)")
    a.add_argument("--no-base", action="store_true", help="skip the unsteered arm")
    a.add_argument("--coefficients", type=_floats, default=[], help="sweep the coefficient of every add op")
    a.add_argument("--layers", type=_ints, default=[], help="sweep the layer of every intervention")
    a.add_argument("--random-control", action="store_true", help="add a same-norm random-vector twin per add arm")
    a.add_argument("--seed", type=int, default=0)
    k = r.add_argument_group("refusal-direction ablation attack (needs a local model)")
    k.add_argument("--attack", action="store_true", help="also run every arm under the ablation attack")
    k.add_argument("--attack-layer", type=int, default=None, help="layer of the direction (default: middle)")
    k.add_argument("--attack-harmful", type=_names, default=["advbench", "harmful_probes"])
    k.add_argument("--attack-harmless", type=_names, default=["harmless_probes", "rho_benign"])
    k.add_argument("--attack-train-limit", type=int, default=128, help="train prompts per side")
    s = r.add_argument_group("scoring")
    s.add_argument("--llm-judge", default=None, help="OpenAI-compatible base URL of an LLM judge")
    s.add_argument("--llm-judge-model", default="default")
    s.add_argument("--no-perplexity", action="store_true", help="coherence from repetition only")
    s.add_argument("--capability", action="store_true", help="CE/KL on benign text and MMLU per config arm")
    s.add_argument("--mmlu-limit", type=int, default=100, help="fixed MMLU subset size (0: skip MMLU)")
    r.add_argument("--out", type=Path, default=None, help="output folder (default runs/evals-<time>)")
    r.add_argument("--no-progress", action="store_true")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "datasets":
        for info in DATASETS.values():
            print(f"{info.name:20s} {info.kind:9s} {info.count:6d}  {info.description}")
        print(f"{'mmlu':20s} {'capability':9s} {14042:6d}  MMLU test questions (evals.datasets.load_mmlu)")
        return 0
    import torch

    torch.set_num_threads(args.threads)
    if args.command == "run":
        return _run(args)
    import steerlib

    model, tok = steerlib.load_model(args.model, device=args.device, dtype=args.dtype)
    if args.command == "sae-quality":
        from evals.benign_text import BENIGN_PARAGRAPHS
        from evals.sae_quality import sae_quality

        q = sae_quality(model, tok, args.sae, layer=args.layer, site=args.site, texts=BENIGN_PARAGRAPHS)
        print(json.dumps(asdict(q), indent=2))
        return 0
    from evals.feature_report import feature_ablation, write_report

    res = feature_ablation(model, tok, args.sae, layer=args.layer, feature=args.feature, text=args.text, site=args.site)
    print(write_report(res, args.out))
    return 0


def _sets(names: list[str], kind: Kind, part: Part, limit: int | None, field: str | None) -> list[PromptSet]:
    from evals.runner import PromptSet

    out = []
    for name in names:
        if name in WRAPPED_SETS:  # the held-out families already: one set per wrapper group, first `limit` of each
            groups: dict[str, list[Prompt]] = {}
            for p in load_dataset(name):
                groups.setdefault(p.meta["group"], []).append(p)
            out += [PromptSet(f"{name}/{g}", kind, subset(ps, limit)) for g, ps in groups.items()]
            continue
        prompts = subset(split(load_dataset(name, field=field), part), limit)
        out.append(PromptSet(Path(name).stem if name not in DATASETS else name, kind, prompts))
    return out


def _run(args: argparse.Namespace) -> int:
    import steerlib
    from evals import report
    from evals.judges import LlmJudge
    from evals.runner import Scorer, perplexity_scorer, run, summarise

    out: Path = args.out or Path("runs") / time.strftime("evals-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    sets = _sets(args.harmful, "harmful", args.part, args.limit, args.field)
    sets += _sets(args.harmless, "harmless", args.part, args.limit, args.field)
    need_local = args.endpoint is None or args.attack or args.capability or not args.no_perplexity
    model, tok = steerlib.load_model(args.model, device=args.device, dtype=args.dtype) if need_local else (None, None)
    target = _target(args, model, tok)
    arms = _arms(args, model, tok, out)
    scorer = Scorer(
        llm_judge=LlmJudge(args.llm_judge, args.llm_judge_model) if args.llm_judge else None,
        perplexity=None if args.no_perplexity or model is None else perplexity_scorer(model, tok, args.batch_size),
    )
    rows_path = out / "rows.jsonl"
    rows_path.write_text("")
    rows = run(
        target,
        sets,
        arms,
        max_new_tokens=args.max_new_tokens,
        system=args.system,
        scorer=scorer,
        progress=not args.no_progress,
        on_rows=lambda rs: report.append_jsonl(rs, rows_path),
    )
    summaries = summarise(rows)
    capability = _capability(model, tok, arms, args.mmlu_limit, args.batch_size) if args.capability else []
    (out / "summary.json").write_text(json.dumps(report.summary_json(summaries), indent=2) + "\n")
    if capability:
        (out / "capability.json").write_text(json.dumps(capability, indent=2) + "\n")
    header = (
        f"# Refusal eval\n\ntarget: {target.name} {args.endpoint or args.model or 'embedded SmolLM2'}; "
        f"part: {args.part}; limit: {args.limit}; max_new_tokens: {args.max_new_tokens}; "
        f"system: {args.system!r}"
    )
    md = report.markdown(summaries, capability, header)
    (out / "summary.md").write_text(md)
    report.plots(rows, capability, out)
    print(md)
    print(f"results in {out}")
    return 0


def _target(args: argparse.Namespace, model: Any, tok: Any) -> Target:
    """The endpoint (``--endpoint``) or the local model the prompts go to."""
    from evals.targets import EndpointTarget, InProcessTarget

    if args.endpoint:
        return EndpointTarget(args.endpoint, args.endpoint_model, api_key=args.api_key)
    assert model is not None
    return InProcessTarget(model, tok, batch_size=args.batch_size)


def _arms(args: argparse.Namespace, model: Any, tok: Any, out: Path) -> list[Arm]:
    """The base arm, each ``--config`` swept and its random control, each ``--preset``, and with ``--attack`` each
    of them attacked."""
    import steerlib
    from evals.arms import attacked, sweep
    from evals.runner import Arm

    arms: list[Arm] = [] if args.no_base else [Arm("base", None)]
    for spec in args.config:
        name, _, path = spec.rpartition("=")
        cfg = steerlib.SteeringConfig.from_file(path)
        arms += sweep(
            name or Path(path).stem,
            cfg,
            coefficients=args.coefficients,
            layers=args.layers,
            random=args.random_control,
            seed=args.seed,
        )
    arms += [Arm(f"preset:{p}", [p]) for p in args.preset]
    if args.attack:
        harmful = [
            p.text for n in args.attack_harmful for p in split(load_dataset(n), "train")[: args.attack_train_limit]
        ]
        harmless = [
            p.text for n in args.attack_harmless for p in split(load_dataset(n), "train")[: args.attack_train_limit]
        ]
        direction = _direction(model, tok, harmful, harmless, args.attack_layer, args.batch_size, out)
        arms += attacked(arms, direction, seed=args.seed)
    return arms


def _train_texts(names: list[str], limit: int | None) -> list[str]:
    """The first ``limit`` training-half prompts of each named set."""
    return [p.text for n in names for p in split(load_dataset(n), "train")[:limit]]


def _direction(
    model: Any, tok: Any, harmful: list[str], harmless: list[str], layer: int | None, batch_size: int, out: Path
) -> Any:
    """The model's refusal direction from these training prompts, also saved to ``out``."""
    from evals.attack import refusal_direction
    from steerlib.vectors import SteeringVector

    d = refusal_direction(model, tok, harmful, harmless, layer=layer, batch_size=batch_size)
    SteeringVector.single(d, method="refusal_direction", n_harmful=len(harmful), n_harmless=len(harmless)).save(
        out / "refusal_direction.safetensors"
    )
    return d


def _capability(model: Any, tok: Any, arms: list[Arm], mmlu_limit: int, batch_size: int) -> list[dict[str, Any]]:
    """Benign-text CE/KL and MMLU accuracy (``mmlu_limit`` questions, 0: none) of each arm with a config."""
    from evals.benign_text import BENIGN_PARAGRAPHS
    from evals.capability import mmlu_accuracy, text_cost
    from steerlib.config import SteeringConfig

    questions = mmlu_subset(mmlu_limit) if mmlu_limit else []
    out = []
    for arm in arms:
        if arm.steering is not None and not isinstance(arm.steering, SteeringConfig):
            continue
        cost = text_cost(model, tok, BENIGN_PARAGRAPHS, arm.steering, batch_size=batch_size)
        acc = mmlu_accuracy(model, tok, questions, arm.steering, batch_size=batch_size) if questions else None
        out.append(
            {"arm": arm.name, **asdict(cost), "mmlu_acc": acc.value if acc else None, "mmlu_n": acc.n if acc else 0}
        )
        logger.info("capability %s: KL %.4f, MMLU %s", arm.name, cost.kl, acc)
    return out
