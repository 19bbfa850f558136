"""Steered generation from token ids, cut at stop strings: what lm-eval's ``generate_until`` asks.

``steerlib.hf.generate.generate`` takes text and tokenizes it without special tokens (its prompts come rendered by a
chat template); lm-eval hands over contexts that its model class tokenizes, adding a BOS token where the tokenizer
does, exactly as it does for scoring. Generating from those ids keeps a context the same tokens in ``generate_until``
as in ``loglikelihood``. Steering and ``refuse`` detectors work as in ``generate`` (same hooks, same forced refusal).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from steerlib.config import SteeringConfig
from steerlib.extract.activations import left_pad, model_device, pad_id_of
from steerlib.hf.hooks import steer
from steerlib.hf.refusal import ForcedRefusal, refusals


@dataclass(frozen=True)
class IdGeneration:
    text: str
    """The decoded new tokens (special tokens skipped, no stripping), cut before the first stop string."""
    refused_by: str | None = None
    """Name of the ``refuse`` detector that answered instead of the model (None: the model generated)."""


def generate_from_ids(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    config: SteeringConfig | None = None,
    *,
    max_new_tokens: int,
    stop: Sequence[str] = (),
    **generate_kwargs: Any,
) -> list[IdGeneration]:
    """One batch: greedy unless ``generate_kwargs`` say otherwise; each row stops at end-of-turn or a stop string."""
    pad = pad_id_of(tokenizer)
    ids_BT, mask_BT = left_pad(prompts, pad, model_device(model))
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": pad}
    if any(stop):
        kwargs["stopping_criteria"] = StoppingCriteriaList([StopStrings(tokenizer, stop)])
    kwargs |= generate_kwargs
    refused: dict[int, str] = {}
    with torch.no_grad(), ExitStack() as stack:
        if config is not None:
            handle = stack.enter_context(steer(model, config, tokenizer=tokenizer))
            if handle.plan.detectors:
                kwargs["logits_processor"] = LogitsProcessorList([ForcedRefusal(handle, tokenizer)])
        seqs_BT = model.generate(input_ids=ids_BT, attention_mask=mask_BT, **kwargs)  # type: ignore[operator]
        if config is not None:
            refused = {row: r.detector for row, r in refusals(handle).items()}
    out = []
    for b in range(len(prompts)):
        new = seqs_BT[b, ids_BT.shape[1] :].tolist()
        if tokenizer.eos_token_id in new:
            new = new[: new.index(tokenizer.eos_token_id)]
        text = cut_at_stop(tokenizer.decode(new, skip_special_tokens=True), stop)
        out.append(IdGeneration(text, refused.get(b)))
    return out


class StopStrings(StoppingCriteria):
    """Stop each row once its decoded new text contains a stop string; one instance per ``generate`` call.

    Decoding the last few new tokens works with every tokenizer (transformers' own ``stop_strings`` needs a
    byte-level or SentencePiece vocabulary; a WordLevel one fails). The prompt width is read on the first call,
    made after the first new token."""

    def __init__(self, tokenizer: Any, stop: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.lookback = max((len(s) for s in self.stop), default=0) + 4  # a token is at least one character
        self.start: int | None = None

    def __call__(self, input_ids: Tensor, scores: Tensor, **kwargs: Any) -> Tensor:
        if self.start is None:
            self.start = input_ids.shape[1] - 1
        tail_BT = input_ids[:, max(self.start, input_ids.shape[1] - self.lookback) :]
        tails = self.tokenizer.batch_decode(tail_BT, skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stop) for t in tails], device=input_ids.device)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string."""
    ends = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return text[: min(ends)] if ends else text
