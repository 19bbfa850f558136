"""Detector-gated refusal on HF generation: rows whose prompt fired a ``refuse`` op answer with its fixed message.

A ``refuse`` op's gate decides per row while the prompt is read (the prefill step). :func:`refusals` reports which
detector fired for which row and on what score; :class:`ForcedRefusal` is a logits processor that makes ``generate``
emit exactly the message (then end-of-turn) for those rows, in the same single pass, while the other rows
generate normally. A ``prefill``-mode detector forces the message without end-of-turn and then lets the row generate:
the reply opens with the refusal and the model (still steered by the config's other ops) continues it.
``steerlib.hf.generate.generate`` adds it by itself; callers of ``model.generate`` pass
``logits_processor=[ForcedRefusal(handle, tokenizer)]``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from transformers import LogitsProcessor

from steerlib.refusal import Refusal, forced_token, refusal_ids
from steerlib.refusal import refusals as _refusals

if TYPE_CHECKING:
    from steerlib.hf.hooks import SteeringHandle


def refusals(handle: SteeringHandle) -> dict[int, Refusal]:
    """Rows flagged by a ``refuse`` op after the prompt was read; the first detector in config order wins."""
    return _refusals(handle.plan.detectors, handle.state)


class ForcedRefusal(LogitsProcessor):
    """Force each flagged row's refusal message, token by token, then the end-of-turn token (``message`` mode) or
    nothing more (``prefill`` mode: once the message is out, the row's logits pass through untouched)."""

    def __init__(self, handle: SteeringHandle, tokenizer: Any) -> None:
        self.handle = handle
        self.tokenizer = tokenizer
        self.step = 0
        self.flagged: dict[int, list[int]] | None = None
        self.prefill: set[int] = set()

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.flagged is None:  # first call: the prefill has just run, verdicts are in
            found = refusals(self.handle).values()
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
