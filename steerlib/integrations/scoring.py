"""Steered log-likelihood of a continuation after a context, with the context read as the prompt and the continuation
as generated tokens: what lm-eval's ``loglikelihood`` asks, meaning what generation means.

Generation reads the prompt in one prefill step (every token a *prompt* token to steerlib) and then feeds back each
sampled token through the KV cache (a *generated* token). Scoring does the same with the continuation teacher-forced:
one forward over the context, then one forward over the continuation (all but its last token, whose prediction is not
needed) with the context's KV cache. So a ``tokens: generated`` op steers the continuation and never the context,
``tokens: prompt`` the reverse, a prompt-scoped gate decides on the context alone, and a continuation's score is the
log-probability that steered greedy or sampled generation would give it, token by token. The first continuation
token is predicted from the last context token, so, as in generation, a generated-only op never changes its
probability. (``evals.lm`` scores a whole sequence in one forward instead: all of it prompt to steerlib.)

``refuse`` ops change what generation emits, not the activations, so they do not change scores.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from steerlib.config import SteeringConfig
from steerlib.extract.activations import left_pad, model_device, pad_id_of
from steerlib.hf.hooks import steer

TokenPair = tuple[Sequence[int], Sequence[int]]
"""(context token ids, continuation token ids); both non-empty."""


class ContinuationScore(NamedTuple):
    logprob: float
    """Sum of the continuation tokens' log-probabilities."""
    is_greedy: bool
    """Whether greedy decoding from the context produces exactly the continuation."""


def score_continuations(
    model: nn.Module,
    tokenizer: Any,
    pairs: Sequence[TokenPair],
    config: SteeringConfig | None = None,
    *,
    batch_size: int = 1,
) -> list[ContinuationScore]:
    """Score each (context, continuation) pair under ``config`` (None: unsteered), ``batch_size`` pairs a forward.

    Rows of a batch are left padded for the context and right padded for the continuation, with position ids
    counted from each row's first real token, so a row scores as it would alone (up to float rounding)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for i, (ctx, cont) in enumerate(pairs):
        if not ctx or not cont:
            raise ValueError(f"pair {i}: context and continuation must be non-empty, got {len(ctx)} and {len(cont)}")
    out: list[ContinuationScore] = []
    for start in range(0, len(pairs), batch_size):
        out += _score_batch(model, tokenizer, pairs[start : start + batch_size], config)
    return out


def _score_batch(
    model: nn.Module, tokenizer: Any, pairs: Sequence[TokenPair], config: SteeringConfig | None
) -> list[ContinuationScore]:
    device, pad = model_device(model), pad_id_of(tokenizer)
    ctx_BS, ctx_mask_BS = left_pad([ctx for ctx, _ in pairs], pad, device)
    fed = [list(cont[:-1]) for _, cont in pairs]  # the last continuation token is predicted, never fed
    with torch.no_grad(), ExitStack() as stack:
        if config is not None:
            stack.enter_context(steer(model, config, tokenizer=tokenizer))
        pos_BS = (ctx_mask_BS.cumsum(-1) - 1).clamp_min(0)
        first = model(input_ids=ctx_BS, attention_mask=ctx_mask_BS, position_ids=pos_BS, use_cache=True)
        logits_BTV = first.logits[:, -1:, :]
        width = max(len(f) for f in fed)
        if width:
            ids_BT, mask_BT = _right_pad(fed, pad, device)
            mask_BA = torch.cat([ctx_mask_BS, mask_BT], dim=1)
            pos_BT = (mask_BA.cumsum(-1) - 1).clamp_min(0)[:, -width:]
            kw = _cache_keyword(model)
            rest = model(
                input_ids=ids_BT, attention_mask=mask_BA, position_ids=pos_BT, use_cache=True, **{kw: first[kw]}
            )
            logits_BTV = torch.cat([logits_BTV, rest.logits], dim=1)
    return [_row_score(logits_BTV[b, : len(cont)], cont) for b, (_, cont) in enumerate(pairs)]


def _row_score(logits_TV: Tensor, cont: Sequence[int]) -> ContinuationScore:
    logp_TV = torch.log_softmax(logits_TV.float(), dim=-1)
    target_T = torch.tensor(list(cont), dtype=torch.long, device=logits_TV.device)
    logprob = float(logp_TV.gather(-1, target_T[:, None]).sum())
    return ContinuationScore(logprob, bool((logp_TV.argmax(-1) == target_T).all()))


def _right_pad(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long, device="cpu")  # built on the host, sent once
    mask = torch.zeros((len(seqs), width), dtype=torch.long, device="cpu")
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(list(s), dtype=torch.long, device="cpu")
        mask[b, : len(s)] = 1
    return ids.to(device), mask.to(device)


def _cache_keyword(model: nn.Module) -> str:
    """The keyword a model takes its KV cache by (and names it by in its output): ``cache`` from transformers 5.25
    on, else ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
