"""The audit record of a steered generation: which presets and ops applied, each gate's score and decision, which
detector answered, and how many tokens each op touched. A response carries it on request (``steering_audit:
true``); the server appends one JSON line per generation request to ``audit_log`` (no prompt or response text unless
``audit_text``).

The record is rebuilt after the row finished from what the engine kept: the plan's bound ops (each knows its
intervention, layer and token policy), the run state's prompt verdicts and scores, and the row's tokens (its prompt
and every generated token fed back). A token is *touched* by an op when the op's selection (tokens, positions,
window, last, match, minus exclusions) holds there and its prompt-scoped gate fired on the row. An op gated per
token (``when.scope: token``) decides on activations the record does not keep: it reports the tokens it selected and
``tokens_touched: null``.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from steerlib.plan import BoundOp, Plan
from steerlib.run_state import RunState
from steerlib.tokens import TokenBatch

_WHERE = re.compile(r"interventions\[(\d+)\]$")


def row_tokens(prompt_ids: Sequence[int], fed_ids: Sequence[int], device: torch.device) -> TokenBatch:
    """One row's whole sequence as one step: its prompt, then the generated tokens fed back."""
    ids = torch.tensor([*prompt_ids, *fed_ids], dtype=torch.long, device=device)
    n, p = ids.shape[0], len(prompt_ids)
    pos = torch.arange(n, device=device)
    return TokenBatch(
        row_N=torch.zeros(n, dtype=torch.long, device=device),
        position_N=pos,
        is_prompt_N=pos < p,
        prompt_len_R=torch.tensor([p], device=device),
        token_ids_N=ids,
        new_rows_R=torch.ones(1, dtype=torch.bool, device=device),
    )


def row_record(plan: Plan, state: RunState, row: int, tb: TokenBatch, sources: Sequence[str]) -> list[dict[str, Any]]:
    """Per intervention of ``row``'s config: op, source, site, and per layer the tokens touched and the gate."""
    out: dict[int, dict[str, Any]] = {}
    for (layer, site), bound_ops in sorted(plan.ops.items()):
        for b in bound_ops:
            rows = b.policy.rows_R
            if rows is not None and not bool(rows[row]):
                continue
            index = _index(b)
            entry = out.setdefault(index, _entry(b, index, site, sources))
            entry["layers"].append(_layer_record(b, layer, state, row, tb))
    return [out[i] for i in sorted(out)]


def _index(b: BoundOp) -> int:
    m = _WHERE.search(b.where)
    return int(m.group(1)) if m else -1


def _entry(b: BoundOp, index: int, site: str, sources: Sequence[str]) -> dict[str, Any]:
    op = "refuse" if b.op is None else type(b.op).__name__
    source = sources[index] if 0 <= index < len(sources) else "inline"
    return {"index": index, "op": _OP_NAMES.get(op, op), "source": source, "site": site, "layers": []}


_OP_NAMES = {"AddVector": "add", "AblateDirections": "ablate", "SaeEdit": "sae", "SaeReplace": "replace"}


def _layer_record(b: BoundOp, layer: int, state: RunState, row: int, tb: TokenBatch) -> dict[str, Any]:
    sel = b.policy.select.mask(tb)
    if b.policy.exclude is not None:
        sel &= ~b.policy.exclude.mask(tb)
    selected = int(sel.sum())
    rec: dict[str, Any] = {"layer": layer, "tokens_selected": selected}
    gate = b.policy.gate
    if gate is None:
        rec["tokens_touched"] = 0 if b.op is None else selected
        return rec
    if gate.scope != "prompt":
        rec |= {"tokens_touched": None, "gate": {"scope": "token"}}
        return rec
    decided = state.decided(b.order)
    fired, score = (False, None) if decided is None else (bool(decided[0][row]), float(decided[1][row]))
    rec["gate"] = {"scope": "prompt", "score": score if score == score else None, "fired": fired}
    rec["tokens_touched"] = 0 if b.op is None or not fired else selected
    return rec


class AuditLog:
    """Appends one JSON line per record to ``path`` (a lock keeps lines whole across threads)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps({"time": round(time.time(), 3)} | record, ensure_ascii=False) + "\n"
        with self._lock, self.path.open("a", encoding="utf-8") as fh:
            fh.write(line)
