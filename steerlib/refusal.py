"""Detector-gated refusal, backend-independent: a ``refuse`` op's detector, its verdicts, and the tokens it forces.

A ``refuse`` op leaves activations alone; its prompt-scoped gate decides per row while the prompt is read, and the
generation layer (``steerlib.hf.refusal`` on HF, the step tracker on vLLM) makes a flagged row answer with the
detector's message (then end-of-turn), or in ``prefill`` mode open its reply with it. The plan lists its detectors
(:class:`Detector`); their verdicts are read from the run state of the handle or engine that ran them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from steerlib.run_state import RunState


@dataclass(frozen=True)
class Detector:
    """One ``refuse`` op at one layer, as the plan knows it."""

    order: int
    """The bound op whose gate decides (its key in the run state)."""
    name: str
    message: str
    mode: Literal["message", "prefill"] = "message"
    rows: tuple[bool, ...] | None = None
    """Per-row steering: the rows whose config has this detector (None: every row)."""

    def covers(self, row: int) -> bool:
        return self.rows is None or (row < len(self.rows) and self.rows[row])


@dataclass(frozen=True)
class Refusal:
    """A row answered by a detector instead of by the model."""

    row: int
    detector: str
    message: str
    score: float
    mode: str = "message"
    """``message``: the reply is the message; ``prefill``: the reply starts with it and the model continues."""


def refusals(detectors: tuple[Detector, ...], state: RunState) -> dict[int, Refusal]:
    """Rows flagged after their prompt was read; the first detector in config order wins."""
    out: dict[int, Refusal] = {}
    for d in detectors:
        decided = state.decided(d.order)
        if decided is None:
            continue
        verdict_R, score_R = decided
        for row in verdict_R.nonzero().flatten().tolist():
            if d.covers(row) and row not in out:
                out[row] = Refusal(row, d.name, d.message, float(score_R[row]), d.mode)
    return out


def row_refusal(detectors: tuple[Detector, ...], state: RunState, row: int) -> tuple[bool, Refusal | None]:
    """For one row: whether every detector has decided on its prompt yet, and the refusal of the first that fired."""
    for d in detectors:
        decided = state.decided(d.order)
        if decided is None or bool(decided[1][row].isnan()):
            return False, None
        if bool(decided[0][row]):
            return True, Refusal(row, d.name, d.message, float(decided[1][row]), d.mode)
    return True, None


def refusal_ids(tokenizer: Any, message: str, mode: str) -> list[int]:
    """The tokens a row flagged by a ``refuse`` op is made to emit: ``message``, then end-of-turn (``message`` mode)
    or nothing more (``prefill`` mode: the row generates on from there)."""
    ids: list[int] = tokenizer.encode(message, add_special_tokens=False)
    return ids if mode == "prefill" else [*ids, tokenizer.eos_token_id]


def forced_token(ids: list[int], step: int, prefill: bool) -> int | None:
    """The token a flagged row must emit at generation ``step`` (0-based), None once it is free to generate.

    A ``message`` reply repeats its last token (end-of-turn) until the engine stops the row; a ``prefill`` reply is
    free after its last token."""
    if not ids or (prefill and step >= len(ids)):
        return None
    return ids[min(step, len(ids) - 1)]
