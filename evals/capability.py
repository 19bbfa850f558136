"""What steering costs in capability: CE loss and KL to the unsteered model on benign text, and MMLU accuracy.

- CE / KL: the steered model's next-token cross-entropy on fixed benign text, and KL(unsteered || steered) of the
  next-token distributions averaged over the same tokens (the capability check of Arditi et al., arXiv 2406.11717,
  and of steering papers since; see also Turner et al., arXiv 2308.10248).
- MMLU (Hendrycks et al., arXiv 2009.03300) on a fixed subset: the question and its four choices in one user turn,
  scored by the next-token log-likelihood of the answer letters ``A``..``D`` after the assistant header (zero-shot).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from evals.datasets import McQuestion
from evals.lm import batches, device_of, generated_only, logprobs, make_batch, target_logprobs
from evals.metrics import Rate, wilson
from steerlib.config import SteeringConfig
from steerlib.extract.activations import left_pad, pad_id_of
from steerlib.hf.generate import render_prompts
from steerlib.hf.hooks import steer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TextCost:
    ce_unsteered: float
    """Mean next-token cross-entropy (nats) of the unsteered model."""
    ce_steered: float
    kl: float
    """Mean KL(unsteered || steered) per token (nats)."""
    n_tokens: int


def text_cost(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    config: SteeringConfig | None,
    *,
    max_tokens: int = 128,
    batch_size: int = 8,
) -> TextCost:
    """CE of both models and their KL over ``texts`` (each truncated to ``max_tokens`` tokens, no chat template)."""
    if config is not None and generated_only(config):
        logger.warning("every intervention applies to generated tokens only: teacher-forced text is never steered")
    seqs = [list(tokenizer(t)["input_ids"])[:max_tokens] for t in texts]
    ce0 = ce1 = kl = 0.0
    n = 0
    for sl in batches(len(seqs), batch_size):
        batch = make_batch(tokenizer, seqs[sl], [0] * len(seqs[sl]), device_of(model))
        lp0 = logprobs(model, batch)
        lp1 = logprobs(model, batch, config) if config is not None else lp0
        m = batch.score_BT
        ce0 -= float(target_logprobs(lp0, batch).sum())
        ce1 -= float(target_logprobs(lp1, batch).sum())
        kl += float(((lp0.exp() * (lp0 - lp1)).sum(-1) * m).sum())
        n += int(m.sum())
    if n == 0:
        raise ValueError("no tokens to score: give texts of at least two tokens")
    return TextCost(ce0 / n, ce1 / n, kl / n, n)


LETTERS = ("A", "B", "C", "D")


def mmlu_prompt(q: McQuestion) -> str:
    choices = "\n".join(f"{letter}. {c}" for letter, c in zip(LETTERS, q.choices, strict=True))
    return f"{q.question}\n{choices}\nAnswer with the letter of the correct choice."


def letter_ids(tokenizer: Any) -> list[int]:
    """Token ids of the bare letters A..D; each must be a single token."""
    ids = []
    for letter in LETTERS:
        toks = tokenizer(letter, add_special_tokens=False)["input_ids"]
        if len(toks) != 1:
            raise ValueError(f"answer letter {letter!r} is {len(toks)} tokens for this tokenizer; need exactly 1")
        ids.append(int(toks[0]))
    return ids


def mmlu_accuracy(
    model: nn.Module,
    tokenizer: Any,
    questions: Sequence[McQuestion],
    config: SteeringConfig | None = None,
    *,
    batch_size: int = 8,
) -> Rate:
    """Accuracy (with a Wilson interval) of the highest-likelihood letter, steered by ``config`` when given."""
    letters = torch.tensor(letter_ids(tokenizer), device=device_of(model))
    rendered = render_prompts(tokenizer, [mmlu_prompt(q) for q in questions])
    correct = 0
    for sl in batches(len(questions), batch_size):
        seqs = [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in rendered[sl]]
        ids, mask = left_pad(seqs, pad_id_of(tokenizer), device_of(model))
        position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
        with torch.no_grad(), steer(model, config) if config is not None else nullcontext():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
        pick = logits[:, -1, letters].argmax(-1).cpu()
        correct += sum(int(p) == q.answer for p, q in zip(pick, questions[sl], strict=True))
    return wilson(correct, len(questions))
