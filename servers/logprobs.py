"""Token log-probabilities: computed on the engine thread from the logits a row was sampled from (its steering
applied), formatted on the HTTP side in OpenAI's two shapes (chat's ``logprobs.content[]`` and the legacy
completions object ``tokens`` / ``token_logprobs`` / ``top_logprobs`` / ``text_offset``).

A log-probability is ``log_softmax`` of the model's steered logits, before frequency / presence penalties,
temperature and top-p (what OpenAI and vLLM report by default); where a ``refuse`` detector forces its message the
forced distribution is reported (0 for the forced token). ``-inf`` is reported as :data:`LOGPROB_FLOOR`: JSON has no
infinity.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

LOGPROB_FLOOR = -9999.0
"""What an impossible token's log-probability (``-inf``) is reported as (vLLM's choice too)."""
WINDOW = 4
"""Tokens decoded before a token to find the text it adds (a SentencePiece word start keeps its space)."""


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability and the most likely tokens at its position, each ``(token id, logprob)``.

    ``logprob`` and ``top`` are None for the first token of an echoed prompt (nothing predicts it)."""

    token: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] | None = ()


def logprobs_of(logits_TV: Tensor, targets: Sequence[int], top: int) -> list[TokenLogprob]:
    """Per position ``t``: the log-probability of ``targets[t]`` under ``logits_TV[t]`` and the ``top`` most likely
    tokens (most likely first). The logits must be free of NaN and ``+inf`` (the decode loop checks)."""
    logp_TV = torch.log_softmax(logits_TV.float(), dim=-1).clamp_min(LOGPROB_FLOOR)
    target_T = torch.tensor(list(targets), dtype=torch.long, device=logp_TV.device)
    chosen = logp_TV.gather(-1, target_T[:, None])[:, 0].tolist()
    k = min(top, logp_TV.shape[-1])
    if k == 0:
        return [TokenLogprob(t, lp) for t, lp in zip(targets, chosen, strict=True)]
    vals_TK, idx_TK = logp_TV.topk(k, dim=-1)
    tops = [tuple(zip(i, v, strict=True)) for i, v in zip(idx_TK.tolist(), vals_TK.tolist(), strict=True)]
    return [TokenLogprob(t, lp, tp) for t, lp, tp in zip(targets, chosen, tops, strict=True)]


def prompt_logprobs(logits_TV: Tensor, prompt_ids: Sequence[int], top: int) -> list[TokenLogprob]:
    """Every prompt token's entry from the prefill's logits over the prompt (``T == len(prompt_ids)``): the first
    token's is empty (None), token ``t`` is scored by position ``t - 1``."""
    first = TokenLogprob(prompt_ids[0], None, None)
    if len(prompt_ids) == 1:
        return [first]
    return [first, *logprobs_of(logits_TV[:-1], prompt_ids[1:], top)]


class LogprobFormatter:
    """Turns entries into OpenAI's shapes, keeping each token's text in context and the running text offset
    (one per response: a stream formats its chunks with the same formatter).

    A token's text is what it adds to the text decoded so far in its segment (the echoed prompt, then the
    completion, each decoded on its own as the response text is), so the tokens join to the response text; a special
    token shows as itself and adds nothing to the text (``text_offset`` does not move)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.special = frozenset(int(i) for i in getattr(tokenizer, "all_special_ids", ()))
        self.window: list[int] = []
        self.offset = 0

    def new_segment(self) -> None:
        """The next token starts a text decoded on its own (the completion after an echoed prompt)."""
        self.window = []

    def piece(self, token: int) -> str:
        """The text ``token`` adds after the tokens before it in its segment."""
        if token in self.special:
            return self._decode([token])
        before = self._decode(self.window)
        after = self._decode([*self.window, token])
        self.window = [*self.window, token][-WINDOW:]
        return after[len(before) :] if after.startswith(before) else self._decode([token])

    def _decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=False)) if ids else ""

    def _text(self, token: int, piece: str) -> tuple[str, int]:
        """``(piece, offset)`` and advance the offset: special tokens add no text to the response."""
        at = self.offset
        if token not in self.special:
            self.offset += len(piece)
        return piece, at

    def _alts(self, chosen: int, top: Sequence[tuple[int, float]] | None) -> list[tuple[str, float]]:
        """The alternatives' texts, each decoded after the same context as the chosen token (call after ``piece``)."""
        if not top:
            return []
        ctx = self.window if chosen in self.special else self.window[:-1]
        before = self._decode(ctx)
        texts = [self._decode([*ctx, t]) for t, _ in top]
        return [
            (after[len(before) :] if after.startswith(before) else self._decode([t]), lp)
            for after, (t, lp) in zip(texts, top, strict=True)
        ]

    def chat(self, entries: Sequence[TokenLogprob]) -> list[dict[str, Any]]:
        """``choices[].logprobs.content`` items: token, logprob, bytes, top_logprobs."""
        out = []
        for e in entries:
            text, _ = self._text(e.token, self.piece(e.token))
            top = [_chat_item(t, lp) for t, lp in self._alts(e.token, e.top)]
            out.append(_chat_item(text, e.logprob if e.logprob is not None else LOGPROB_FLOOR) | {"top_logprobs": top})
        return out

    def legacy(self, entries: Sequence[TokenLogprob]) -> dict[str, list[Any]]:
        """The completions ``logprobs`` object: tokens, token_logprobs, top_logprobs (dicts), text_offset."""
        out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e in entries:
            text, at = self._text(e.token, self.piece(e.token))
            out["tokens"].append(text)
            out["token_logprobs"].append(e.logprob)
            out["top_logprobs"].append(None if e.top is None else _first_wins(self._alts(e.token, e.top)))
            out["text_offset"].append(at)
        return out


def _chat_item(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def _first_wins(items: Sequence[tuple[str, float]]) -> dict[str, float]:
    """Alternatives keyed by text, most likely first; two tokens with the same text keep the likelier's entry."""
    out: dict[str, float] = {}
    for text, lp in items:
        out.setdefault(text, lp)
    return out
