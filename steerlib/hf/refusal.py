"""Detector-gated refusal on HF generation: rows whose prompt fired a ``refuse`` op answer with its fixed message.

A ``refuse`` op's gate decides per row while the prompt is read (the prefill step). :func:`refusals` reports which
detector fired for which row and on what score; :class:`ForcedRefusal` is a logits processor that makes ``generate``
emit exactly the message (then end-of-turn) for those rows, in the same single pass, while the other rows
generate normally. A ``prefill``-mode detector forces the message without end-of-turn and then lets the row generate:
the reply opens with the refusal and the model (still steered by the config's other ops) continues it.
``steerlib.hf.generate.generate`` adds it by itself; callers of ``model.generate`` pass
``logits_processor=[ForcedRefusal(handle.plan, tokenizer)]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers import LogitsProcessor

from steerlib.ops import RefuseDetector, forced_token, refusal_ids
from steerlib.plan import Plan


@dataclass(frozen=True)
class Refusal:
    """A row answered by a detector instead of by the model."""

    row: int
    detector: str
    message: str
    score: float
    mode: str = "message"
    """``message``: the reply is the message; ``prefill``: the reply starts with it and the model continues."""


def refusals(plan: Plan) -> dict[int, Refusal]:
    """Rows flagged by a ``refuse`` op after the prompt was read; the first detector in config order wins."""
    out: dict[int, Refusal] = {}
    for b in plan.detectors():
        gate = b.policy.gate
        decided = gate.decided() if gate is not None else None
        if decided is None:
            continue
        verdict_R, score_R = decided
        for row in verdict_R.nonzero().flatten().tolist():
            in_rows = b.policy.rows is None or (row < len(b.policy.rows) and b.policy.rows[row])
            if in_rows and row not in out:
                assert isinstance(b.op, RefuseDetector)
                out[row] = Refusal(row, b.op.name, b.op.message, float(score_R[row]), b.op.mode)
    return out


class ForcedRefusal(LogitsProcessor):
    """Force each flagged row's refusal message, token by token, then the end-of-turn token (``message`` mode) or
    nothing more (``prefill`` mode: once the message is out, the row's logits pass through untouched)."""

    def __init__(self, plan: Plan, tokenizer: Any) -> None:
        self.plan = plan
        self.tokenizer = tokenizer
        self.step = 0
        self.flagged: dict[int, list[int]] | None = None
        self.prefill: set[int] = set()

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.flagged is None:  # first call: the prefill has just run, verdicts are in
            found = refusals(self.plan).values()
            self.flagged = {r.row: refusal_ids(self.tokenizer, r.message, r.mode) for r in found}
            self.prefill = {r.row for r in found if r.mode == "prefill"}
        forced = {row: forced_token(ids, self.step, row in self.prefill) for row, ids in self.flagged.items()}
        if any(t is not None for t in forced.values()):
            scores = scores.clone()
            for row, token in forced.items():
                if token is not None:
                    scores[row] = -torch.inf
                    scores[row, token] = 0.0
        self.step += 1
        return scores
