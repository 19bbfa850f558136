"""Per-row token choice and stop conditions for the decode loop: each row keeps its own sampling parameters.

A row is greedy (temperature 0) or samples from ``softmax(logits / temperature)`` restricted to the top-p nucleus,
with its own ``torch.Generator`` (seeded by the request's ``seed``), so a seeded request draws the same tokens
whatever else is in the batch. Frequency and presence penalties are OpenAI's: before the choice, every token the row
has generated ``c`` times loses ``c * frequency_penalty + (c > 0) * presence_penalty`` from its logit.
:class:`TextTracker` turns tokens into text deltas that never emit a partial stop sequence or a half-decoded
character.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from steerlib.plan import TokenizerLike


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logprobs: int | None = None
    """Report each generated token's log-probability and this many most likely alternatives; None: do not."""
    echo_logprobs: bool = False
    """Also report the prompt tokens' log-probabilities (with ``logprobs`` alternatives each)."""


class RowSampler:
    """Chooses one row's next token from its logits."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.counts: Counter[int] = Counter()
        """How often the row has generated each token (what the penalties read)."""
        self.generator: torch.Generator | None = None
        if params.temperature > 0:
            # Sampling runs on the host: one seed picks the same tokens whichever device computed the logits.
            self.generator = torch.Generator(device="cpu")
            self.generator.manual_seed(params.seed if params.seed is not None else random.getrandbits(63))

    def choose(self, logits_V: Tensor) -> int:
        logits_V = penalized(logits_V, self.counts, self.params.frequency_penalty, self.params.presence_penalty)
        token = self._pick(logits_V)
        self.counts[token] += 1
        return token

    def _pick(self, logits_V: Tensor) -> int:
        if self.generator is None:
            return int(logits_V.argmax())
        # Shifted so the top logit is 0 before dividing (in float64): no temperature can overflow it to inf or NaN.
        shifted_V = logits_V.double().cpu()
        shifted_V = shifted_V - shifted_V.max()
        probs_V = torch.softmax(shifted_V / self.params.temperature, dim=-1)
        if self.params.top_p < 1.0:
            probs_V = _nucleus(probs_V, self.params.top_p)
        return int(torch.multinomial(probs_V, 1, generator=self.generator))


def penalized(logits_V: Tensor, counts: Counter[int], frequency: float, presence: float) -> Tensor:
    """``logits_V`` less OpenAI's penalties for the tokens in ``counts`` (in float32: a bfloat16 logit would round a
    small penalty away); the logits themselves when there is nothing to subtract."""
    if not counts or (frequency == 0 and presence == 0):
        return logits_V
    ids_N = torch.tensor(list(counts), dtype=torch.long, device=logits_V.device)
    count_N = torch.tensor(list(counts.values()), dtype=torch.float32, device=logits_V.device)
    out_V = logits_V.float().clone()
    out_V[ids_N] -= count_N * frequency + presence
    return out_V


def _nucleus(probs_V: Tensor, top_p: float) -> Tensor:
    """Zero every token outside the smallest set whose probability reaches ``top_p`` (the top token always stays)."""
    sorted_V, order_V = probs_V.sort(descending=True)
    before_V = sorted_V.cumsum(-1) - sorted_V
    sorted_V = sorted_V.masked_fill(before_V >= top_p, 0.0)
    return torch.zeros_like(probs_V).scatter(-1, order_V, sorted_V)


@dataclass
class TextTracker:
    """Generated tokens to text deltas, honouring stop sequences."""

    tokenizer: TokenizerLike
    stop: Sequence[str]
    ids: list[int] = field(default_factory=list)
    emitted: int = 0
    stopped: bool = False

    def push(self, token_id: int) -> str:
        """Add a token; the new text that is safe to show. Sets ``stopped`` when a stop sequence appeared."""
        self.ids.append(token_id)
        text = self.text_so_far()
        cut = min((i for i in (text.find(s, max(0, self.emitted - len(s))) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._emit(text, cut)
        return self._emit(text, len(text) - self._held_back(text))

    def flush(self) -> str:
        """What is left to emit when the row ends without a stop sequence."""
        return self._emit(self.text_so_far(), len(self.text_so_far()))

    def text_so_far(self) -> str:
        return str(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def _emit(self, text: str, end: int) -> str:
        end = max(end, self.emitted)
        delta, self.emitted = text[self.emitted : end], end
        return delta

    def _held_back(self, text: str) -> int:
        """Characters at the end that may still become a stop sequence or an undecoded character."""
        hold = len(text) - len(text.rstrip("\ufffd"))
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return hold
