"""Summaries, markdown and plots from toy result rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evals.report import append_jsonl, command_line, family, markdown, plots, summary_json
from evals.runner import Row, summarise


def _row(
    dataset: str,
    kind: str,
    arm: str,
    coef: float | None,
    refused: bool,
    degenerate: bool = False,
    llm: bool | None = None,
) -> Row:
    return Row(
        dataset=dataset,
        kind=kind,
        arm=arm,
        coefficient=coef,
        layer=None,
        control_of=None,
        prompt_id="id",
        prompt="p",
        response="r",
        refused=refused,
        matched=[],
        refused_llm=llm,
        repetition=0.0,
        perplexity=2.0,
        degenerate=degenerate,
    )


def test_summaries_separate_degenerate_refusals() -> None:
    rows = [
        _row("h", "harmful", "v@c=2", 2.0, True, llm=True),
        _row("h", "harmful", "v@c=2", 2.0, True, degenerate=True, llm=False),
        _row("h", "harmful", "v@c=2", 2.0, False, llm=False),
        _row("h", "harmful", "v@c=2", 2.0, False, degenerate=True, llm=None),
    ]
    (s,) = summarise(rows)
    assert (s.n, s.refusal.k, s.refusal_any.k, s.degenerate.k, s.degenerate_refusals) == (4, 1, 2, 2, 1)
    assert s.refusal_llm is not None and (s.refusal_llm.k, s.refusal_llm.n) == (1, 3)
    assert s.agreement is not None and s.agreement.n == 3 and s.agreement.raw == pytest.approx(2 / 3)
    md = markdown([s], header="# t")
    assert md.startswith("# t\n") and "| h | harmful | v@c=2 |  | 4 | 25.0 [" in md
    assert json.loads(json.dumps(summary_json([s])))[0]["refusal"]["value"] == 0.25
    assert family("random(v@c=2)") == "random(v" and family("v@L=3@c=2") == "v"


def test_jsonl_and_plots(tmp_path: Path) -> None:
    rows = [
        _row(ds, kind, f"{fam}@c={c:g}", c, refused=(kind == "harmful" and c > 1 and fam == "v"))
        for ds, kind in (("h", "harmful"), ("ok", "harmless"))
        for fam in ("v", "random")
        for c in (1.0, 2.0, 4.0)
        for _ in range(3)
    ]
    append_jsonl(rows[:2], tmp_path / "rows.jsonl")
    append_jsonl(rows[2:3], tmp_path / "rows.jsonl")
    assert [json.loads(x)["arm"] for x in (tmp_path / "rows.jsonl").read_text().splitlines()] == ["v@c=1"] * 3
    cap = [{"arm": "v@c=2", "ce_unsteered": 2.0, "ce_steered": 2.5, "kl": 0.3, "mmlu_acc": 0.3}]
    written = plots(rows, cap, tmp_path)
    assert [p.name for p in written] == ["refusal_vs_coefficient.png", "tradeoff.png", "capability_cost.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written)
    assert "| v@c=2 | 2.0000 | 2.5000 | 0.3000 | 30.0 |" in markdown(summarise(rows), cap)


def test_command_line_quotes_the_arguments_given_else_the_process_own(monkeypatch: pytest.MonkeyPatch) -> None:
    assert command_line("evals.recipes.detector", ["--out", "a b"]) == "python -m evals.recipes.detector --out 'a b'"
    monkeypatch.setattr("sys.argv", ["prog", "--threads", "2"])
    assert command_line("evals.recipes.detector", None) == "python -m evals.recipes.detector --threads 2"
