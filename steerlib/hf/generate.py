"""Batched text generation with optional steering: the helper the CLI, the evals and the server build on."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import LogitsProcessorList

from steerlib.config import SteeringConfig
from steerlib.hf.hooks import steer
from steerlib.hf.refusal import ForcedRefusal, Refusal, refusals


@dataclass(frozen=True)
class Generation:
    prompt: str
    text: str
    n_prompt_tokens: int
    n_new_tokens: int
    refused_by: str | None = None
    """Name of the ``refuse`` detector that answered instead of the model (None: the model generated)."""
    token_ids: tuple[int, ...] = ()
    """The generated token ids, up to and including the first end-of-turn token."""


def render_prompts(
    tokenizer: Any, prompts: Sequence[str], *, chat: bool = True, system: str | None = None
) -> list[str]:
    """Prompts as the model sees them: through the chat template when there is one and ``chat`` is set."""
    if not chat or getattr(tokenizer, "chat_template", None) is None:
        return list(prompts)
    rendered = []
    for p in prompts:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}]
        rendered.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return rendered


def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    config: SteeringConfig | Sequence[SteeringConfig | None] | None = None,
    *,
    max_new_tokens: int = 48,
    chat: bool = True,
    system: str | None = None,
    batch_size: int = 8,
    **generate_kwargs: Any,
) -> list[Generation]:
    """Greedy (unless ``generate_kwargs`` say otherwise) generation, steered by one config or one per prompt."""
    if config is not None and not isinstance(config, SteeringConfig) and len(config) != len(prompts):
        raise ValueError(f"config: got {len(config)} per-prompt configs for {len(prompts)} prompts")
    texts = render_prompts(tokenizer, prompts, chat=chat, system=system)
    out: list[Generation] = []
    for start in range(0, len(texts), batch_size):
        chunk = slice(start, start + batch_size)
        cfg = config if config is None or isinstance(config, SteeringConfig) else list(config)[chunk]
        out += _generate_batch(model, tokenizer, texts[chunk], prompts[chunk], cfg, max_new_tokens, generate_kwargs)
    return out


def _generate_batch(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    prompts: Sequence[str],
    config: SteeringConfig | Sequence[SteeringConfig | None] | None,
    max_new_tokens: int,
    generate_kwargs: dict[str, Any],
) -> list[Generation]:
    tokenizer.padding_side = "left"
    enc = tokenizer(list(texts), return_tensors="pt", padding=True, add_special_tokens=False)
    enc = {k: v.to(next(model.parameters()).device) for k, v in enc.items()}
    kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    kwargs.update(generate_kwargs)
    fired: dict[int, Refusal] = {}
    with torch.no_grad():
        if config is None:
            seqs = model.generate(**enc, **kwargs)  # type: ignore[operator]
        else:
            with steer(model, config, tokenizer=tokenizer) as handle:
                if handle.plan.detectors:
                    forced = ForcedRefusal(handle, tokenizer)
                    kwargs["logits_processor"] = LogitsProcessorList([*kwargs.get("logits_processor", []), forced])
                seqs = model.generate(**enc, **kwargs)  # type: ignore[operator]
                fired = refusals(handle)
    width = enc["input_ids"].shape[1]
    results = []
    for i, prompt in enumerate(prompts):
        new = seqs[i, width:]
        ends = (new == tokenizer.eos_token_id).nonzero()
        n_new = int(ends[0, 0]) + 1 if len(ends) else len(new)  # up to and including the first end-of-turn token
        text = tokenizer.decode(new, skip_special_tokens=True).strip()
        by = fired[i].detector if i in fired else None
        ids = tuple(int(t) for t in new[:n_new].tolist())
        results.append(Generation(prompt, text, int(enc["attention_mask"][i].sum()), n_new, by, ids))
    return results
