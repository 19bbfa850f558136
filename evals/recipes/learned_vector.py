"""A learned steering vector: one vector added after one layer, optimised by gradient descent, the model frozen.

The vector ``v`` is added to the residual stream after layer ``L`` at every token (as an ``op: add`` at
``resid_post`` does) and trained to raise the log-likelihood of target replies teacher-forced after chat-rendered
prompts: refusals after harmful training prompts, and (with weight ``keep_weight``) the model's own greedy answers
after harmless training prompts, so that the vector does not also rewrite benign replies. An optional norm bound keeps
it a small perturbation. This is the optimisation of Subramani et al. ("Extracting latent steering vectors from
pretrained language models", arXiv 2205.05124) applied to a set of prompts, in the spirit of the promotion vectors
of Dunefsky & Cohan (arXiv 2502.18862); contrastive activation addition (Rimsky et al., arXiv 2312.06681) is the
extraction-based alternative it is compared with in the issue.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm import tqdm

from evals.lm import Batch, device_of, make_batch
from steerlib.extract.activations import response_ids
from steerlib.hf.generate import render_prompts
from steerlib.hf.layout import get_layout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    """A prompt and the reply the steered model should give to it."""

    prompt: str
    reply: str


@dataclass(frozen=True)
class TrainSettings:
    layer: int
    """The vector is added to the output of this decoder layer (``resid_post``)."""
    steps: int = 120
    lr: float = 0.5
    """Adam learning rate on the raw vector (residual-stream units)."""
    batch_size: int = 8
    """Refusal examples per step."""
    keep_batch_size: int = 4
    """Keep examples per step (when ``keep_weight > 0``)."""
    max_norm: float | None = None
    """Project the vector back to this L2 norm after each step when it grows beyond it (None: unbounded)."""
    keep_weight: float = 0.5
    """Weight of the keep loss (NLL of the model's own answers to harmless prompts) against the refusal loss."""
    seed: int = 0


@dataclass(frozen=True)
class Trained:
    vector_D: Tensor
    history: list[tuple[float, float]]
    """(refusal NLL per token, keep NLL per token) at each step, before the update."""


def encode(tokenizer: object, examples: Sequence[Example]) -> tuple[list[list[int]], list[int]]:
    """Each example as prompt ids + reply ids + end-of-turn, and where the reply starts (the scored part)."""
    rendered = render_prompts(tokenizer, [e.prompt for e in examples])
    eos = tokenizer.eos_token_id  # type: ignore[attr-defined]
    seqs, starts = [], []
    for text, e in zip(rendered, examples, strict=True):
        p = list(tokenizer(text, add_special_tokens=False)["input_ids"])  # type: ignore[operator]
        seqs.append(p + response_ids(tokenizer, e.reply) + [eos])  # type: ignore[arg-type]
        starts.append(len(p))
    return seqs, starts


@contextmanager
def added(model: nn.Module, layer: int, vector_D: Tensor) -> Iterator[None]:
    """Add ``vector_D`` (differentiable) to the output of decoder layer ``layer`` at every token."""

    def hook(_mod: nn.Module, _args: object, out: object) -> object:
        if isinstance(out, tuple):
            return (out[0] + vector_D, *out[1:])
        assert isinstance(out, Tensor)
        return out + vector_D

    handle = get_layout(model).layer(layer).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def reply_nll(model: nn.Module, batch: Batch, layer: int, vector_D: Tensor) -> Tensor:
    """Mean negative log-likelihood per scored token under the vector (differentiable in ``vector_D``)."""
    position_ids = (batch.mask_BT.cumsum(-1) - 1).clamp_min(0)
    base, head = get_layout(model).base, model.get_output_embeddings()  # type: ignore[operator]
    with added(model, layer, vector_D):
        h_BTD = base(
            input_ids=batch.ids_BT, attention_mask=batch.mask_BT, position_ids=position_ids, use_cache=False
        ).last_hidden_state
    # The unembedding only where a token is scored: most of a sequence is prompt, and the vocabulary is large.
    nxt = torch.roll(batch.ids_BT, -1, dims=1)[batch.score_BT]
    lp_NV = torch.log_softmax(head(h_BTD[batch.score_BT]).float(), dim=-1)
    return -lp_NV.gather(-1, nxt[:, None]).mean()


def _sample(
    tokenizer: object, enc: tuple[list[list[int]], list[int]], k: int, gen: torch.Generator, device: torch.device
) -> Batch:
    seqs, starts = enc
    idx = torch.randperm(len(seqs), generator=gen, device="cpu")[:k].tolist()
    return make_batch(tokenizer, [seqs[i] for i in idx], [starts[i] for i in idx], device)


def train_vector(
    model: nn.Module,
    tokenizer: object,
    refuse: Sequence[Example],
    keep: Sequence[Example],
    settings: TrainSettings,
    *,
    progress: bool = False,
) -> Trained:
    """Optimise the vector with Adam; the model's parameters are frozen for the run and restored after."""
    if not refuse:
        raise ValueError("train_vector: no refusal examples")
    if settings.keep_weight > 0 and not keep:
        raise ValueError("train_vector: keep_weight > 0 needs keep examples")
    layout = get_layout(model)
    layout.layer(settings.layer)  # range check with a clear error
    device = device_of(model)
    gen = torch.Generator(device="cpu").manual_seed(settings.seed)  # draws which examples, on the host
    enc_refuse, enc_keep = encode(tokenizer, refuse), encode(tokenizer, keep) if keep else ([], [])
    vector_D = torch.zeros(layout.d_model, device=device, requires_grad=True)
    opt = torch.optim.Adam([vector_D], lr=settings.lr)
    was = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    history: list[tuple[float, float]] = []
    try:
        for _ in tqdm(range(settings.steps), desc="learned vector", disable=not progress):
            opt.zero_grad()
            batch_r = _sample(tokenizer, enc_refuse, settings.batch_size, gen, device)
            loss_r = reply_nll(model, batch_r, settings.layer, vector_D)
            loss = loss_r
            loss_k = torch.zeros((), device=device)
            if settings.keep_weight > 0:
                batch_k = _sample(tokenizer, enc_keep, settings.keep_batch_size, gen, device)
                loss_k = reply_nll(model, batch_k, settings.layer, vector_D)
                loss = loss + settings.keep_weight * loss_k
            loss.backward()
            opt.step()
            if settings.max_norm is not None:
                with torch.no_grad():
                    vector_D.mul_((settings.max_norm / vector_D.norm().clamp_min(1e-12)).clamp(max=1.0))
            history.append((float(loss_r.detach()), float(loss_k.detach())))
    finally:
        for p, r in zip(model.parameters(), was, strict=True):
            p.requires_grad_(r)
    log.info("learned vector: norm %.2f, last refusal NLL %.3f, keep NLL %.3f", float(vector_D.norm()), *history[-1])
    return Trained(vector_D.detach().clone(), history)
