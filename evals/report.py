"""Write an eval's results: JSONL rows, a JSON and markdown summary, and PNG plots.

Arm names follow ``<config>[@c=<coefficient>][@L=<layer>]`` (see :mod:`evals.__main__`); plots group arms by the part
before the first ``@``. Plots: refusal vs coefficient per dataset, harmful-vs-harmless refusal trade-off (one point
per arm, pooled over the sets of each kind), and capability cost (KL to the unsteered model) per arm.
"""

from __future__ import annotations

import json
import logging
import math
import shlex
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from evals.metrics import rate
from evals.runner import Row, Summary

logger = logging.getLogger(__name__)


def command_line(module: str, argv: Sequence[str] | None) -> str:
    """The shell command that reruns ``python -m <module>`` with ``argv`` (``None``: this process's arguments)."""
    return shlex.join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])


def family(arm: str) -> str:
    return arm.split("@", 1)[0]


def append_jsonl(rows: Sequence[Row], path: Path) -> None:
    with path.open("a", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r.as_dict(), ensure_ascii=False) + "\n")


def _pct(x: float) -> str:
    return "–" if math.isnan(x) else f"{100 * x:.1f}"


def markdown(summaries: Sequence[Summary], capability: Sequence[dict[str, Any]] = (), header: str = "") -> str:
    lines = [header, ""] if header else []
    lines += [
        "| dataset | kind | arm | control of | n | refusal % [95% CI] | incl. degenerate % | degenerate % "
        "| degenerate refusals | LLM-judge refusal % | judge agreement (kappa) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        llm = "–" if s.refusal_llm is None else f"{_pct(s.refusal_llm.value)}"
        ag = "–" if s.agreement is None else f"{_pct(s.agreement.raw)}% ({s.agreement.kappa:.2f})"
        lines.append(
            f"| {s.dataset} | {s.kind} | {s.arm} | {s.control_of or ''} | {s.n} | "
            f"{_pct(s.refusal.value)} [{_pct(s.refusal.low)}, {_pct(s.refusal.high)}] | {_pct(s.refusal_any.value)} | "
            f"{_pct(s.degenerate.value)} | {s.degenerate_refusals} | {llm} | {ag} |"
        )
    lines += [
        "",
        "Refusal % counts substring-judged refusals in coherent text only, over all generations; "
        "refusals in degenerate text are the 'degenerate refusals' column and are not successes.",
    ]
    if capability:
        lines += [
            "",
            "## Capability cost",
            "",
            "| arm | CE unsteered | CE steered | KL (nats/token) | MMLU acc % |",
            "|---|---|---|---|---|",
        ]
        for c in capability:
            mmlu = "–" if c.get("mmlu_acc") is None else _pct(c["mmlu_acc"])
            lines.append(f"| {c['arm']} | {c['ce_unsteered']:.4f} | {c['ce_steered']:.4f} | {c['kl']:.4f} | {mmlu} |")
    return "\n".join(lines) + "\n"


def summary_json(summaries: Sequence[Summary]) -> list[dict[str, Any]]:
    out = []
    for s in summaries:
        d = asdict(s)
        d["refusal"]["value"] = s.refusal.value
        out.append(d)
    return out


def plots(rows: Sequence[Row], capability: Sequence[dict[str, Any]], folder: Path) -> list[Path]:
    """Write the PNG plots that the data supports; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    swept = [r for r in rows if r.coefficient is not None]
    if swept:
        datasets = sorted({r.dataset for r in swept})
        fig, axes = plt.subplots(1, len(datasets), figsize=(4.5 * len(datasets), 3.6), squeeze=False)
        for ax, ds in zip(axes[0], datasets, strict=True):
            for fam in sorted({family(r.arm) for r in swept if r.dataset == ds}):
                pts: dict[float, list[bool]] = {}
                for r in swept:
                    if r.dataset == ds and family(r.arm) == fam and r.coefficient is not None:
                        pts.setdefault(r.coefficient, []).append(r.refused and not r.degenerate)
                xs = sorted(pts)
                rates = [rate(pts[x]) for x in xs]
                ys = [100 * q.value for q in rates]
                err = [[100 * (q.value - q.low) for q in rates], [100 * (q.high - q.value) for q in rates]]
                ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=fam)
            ax.set_title(ds)
            ax.set_xlabel("coefficient")
            ax.set_ylabel("coherent refusal %")
            ax.legend(fontsize=7)
        written.append(_save(fig, folder / "refusal_vs_coefficient.png"))
    arms = list(dict.fromkeys(r.arm for r in rows))
    kinds = {r.kind for r in rows}
    if {"harmful", "harmless"} <= kinds:
        fig, ax = plt.subplots(figsize=(5, 4.2))
        for arm in arms:
            by = {
                k: rate([r.refused and not r.degenerate for r in rows if r.arm == arm and r.kind == k])
                for k in ("harmful", "harmless")
            }
            ax.scatter(100 * by["harmless"].value, 100 * by["harmful"].value, label=arm)
        ax.plot([0, 100], [0, 100], color="grey", lw=0.5, ls="--")
        ax.set_xlabel("harmless prompts refused % (over-refusal)")
        ax.set_ylabel("harmful prompts refused %")
        ax.legend(fontsize=6)
        written.append(_save(fig, folder / "tradeoff.png"))
    if capability:
        fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(capability) + 2), 3.6))
        ax.bar([c["arm"] for c in capability], [c["kl"] for c in capability])
        ax.set_ylabel("KL to unsteered (nats/token)")
        ax.tick_params(axis="x", labelrotation=60, labelsize=7)
        written.append(_save(fig, folder / "capability_cost.png"))
    return written


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    logger.info("wrote %s", path)
    return path
