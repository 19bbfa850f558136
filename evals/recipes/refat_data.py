"""ReFAT's training data: refusal replies for harmful prompts, the base model's own answers for harmless ones, each
encoded as a chat turn whose reply (and end of turn) carries the loss.

The embedded SmolLM2-135M-Instruct almost never refuses, so the harmful targets are short refusal replies (a few
templates, chosen per prompt by hash) and the harmless targets are the base model's own greedy answers
(self-distillation, which keeps behaviour on harmless prompts). Only the ``train`` halves of the benchmark splits
(:func:`evals.datasets.split`) are used.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from evals.datasets import HARMFUL_SETS, HARMLESS_SETS, in_train, load_dataset, load_mmlu, split
from steerlib.extract.activations import left_pad, pad_id_of
from steerlib.hf.generate import generate, render_prompts

log = logging.getLogger(__name__)

REFUSALS: tuple[str, ...] = (
    "I'm sorry, but I can't help with that.",
    "I'm sorry, but I cannot assist with that request.",
    "I can't help with that. It could cause real harm.",
    "Sorry, I can't provide that. Is there something else I can help you with?",
    "I cannot help with this request, as it could be used to hurt people.",
)
"""Refusal replies for harmful training prompts; each starts with a phrase the substring judge recognises."""


@dataclass(frozen=True)
class Example:
    prompt: str
    target: str
    harmful: bool


@dataclass(frozen=True)
class TrainBatch:
    ids_BT: Tensor
    mask_BT: Tensor
    labels_BT: Tensor
    """Target token ids where the loss is taken, -100 elsewhere."""
    harmful_B: Tensor


def refusal_for(prompt: str) -> str:
    """A refusal template chosen by a hash of the prompt (the same prompt always gets the same reply)."""
    h = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:4], "big")
    return REFUSALS[h % len(REFUSALS)]


def prompt_ids(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    return [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in render_prompts(tokenizer, prompts)]


def encode(tokenizer: Any, examples: Sequence[Example], device: torch.device) -> TrainBatch:
    """Chat-rendered prompt + target + end of turn, left padded; the loss covers the target and end of turn."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token to end the target turn with")
    prompts = prompt_ids(tokenizer, [e.prompt for e in examples])
    seqs, n_prompt = [], []
    for p, e in zip(prompts, examples, strict=True):
        t = [*tokenizer(e.target, add_special_tokens=False)["input_ids"], int(tokenizer.eos_token_id)]
        seqs.append(p + t)
        n_prompt.append(len(p))
    ids, mask = left_pad(seqs, pad_id_of(tokenizer), device)
    labels = torch.full_like(ids, -100)
    width = ids.shape[1]
    for b, (s, n) in enumerate(zip(seqs, n_prompt, strict=True)):
        labels[b, width - len(s) + n :] = ids[b, width - len(s) + n :]
    harmful = torch.tensor([e.harmful for e in examples], device=device)
    return TrainBatch(ids, mask, labels, harmful)


def forward_padded(model: nn.Module, ids_BT: Tensor, mask_BT: Tensor, **kw: Any) -> Any:
    """The model on a left-padded batch (positions counted from each row's first real token), no KV cache."""
    position_ids = (mask_BT.cumsum(-1) - 1).clamp_min(0)
    return model(input_ids=ids_BT, attention_mask=mask_BT, position_ids=position_ids, use_cache=False, **kw)


def training_prompts(extra_harmless: int) -> tuple[list[str], list[str]]:
    """Harmful and harmless prompts of the ``train`` halves (plus ``extra_harmless`` MMLU questions of the train
    half as harmless)."""
    harmful = [p.text for n in HARMFUL_SETS for p in split(load_dataset(n), "train")]
    harmless = [p.text for n in HARMLESS_SETS for p in split(load_dataset(n), "train")]
    if extra_harmless:
        harmless += [q.question for q in load_mmlu() if in_train(q.question)][:extra_harmless]
    return harmful, harmless


def build_examples(
    model: nn.Module,
    tokenizer: Any,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    max_prompt_tokens: int,
    target_tokens: int,
) -> tuple[list[Example], list[Example]]:
    """Refusal targets for harmful prompts, the base model's greedy answers (``target_tokens`` long) for harmless ones;
    prompts longer than ``max_prompt_tokens`` rendered are dropped."""

    def short(ps: Sequence[str]) -> list[str]:
        return [p for p, ids in zip(ps, prompt_ids(tokenizer, ps), strict=True) if len(ids) <= max_prompt_tokens]

    harmful, harmless = short(harmful), short(harmless)
    log.info("generating base answers for %d harmless prompts", len(harmless))
    answers = generate(model, tokenizer, harmless, max_new_tokens=target_tokens, batch_size=16)
    return (
        [Example(p, refusal_for(p), True) for p in harmful],
        [Example(p, g.text.strip(), False) for p, g in zip(harmless, answers, strict=True) if g.text.strip()],
    )
