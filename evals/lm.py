"""Teacher-forced forwards shared by the coherence, capability and SAE-quality metrics.

Batches are left padded with position ids counted from each row's first real token (as ``generate`` and
``steerlib.extract`` do), so a padded row scores as it would alone. Steering, when given, is applied with
:func:`steerlib.steer` for the forward: every token of a teacher-forced sequence is a prompt token to steerlib, so a
config restricted to ``tokens: generated`` does nothing here (see :func:`generated_only`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from steerlib.config import SteeringConfig
from steerlib.extract.activations import left_pad, model_device, pad_id_of
from steerlib.hf.hooks import steer


@dataclass(frozen=True)
class Batch:
    ids_BT: Tensor
    mask_BT: Tensor
    score_BT: Tensor
    """True at positions whose *next* token is scored (the prediction of ids[t + 1] is made at t)."""


def make_batch(tokenizer: object, seqs: Sequence[Sequence[int]], starts: Sequence[int], device: torch.device) -> Batch:
    """Rows of ids, scoring the tokens from ``starts[b]`` on (so predictions at ``start - 1 .. len - 2``)."""
    ids, mask = left_pad(seqs, pad_id_of(tokenizer), device)  # type: ignore[arg-type]
    width = ids.shape[1]
    score = torch.zeros_like(mask, dtype=torch.bool)
    for b, (s, start) in enumerate(zip(seqs, starts, strict=True)):
        offset = width - len(s)
        lo = offset + max(start, 1) - 1
        score[b, lo : width - 1] = True
    return Batch(ids, mask, score)


def logprobs(model: nn.Module, batch: Batch, config: SteeringConfig | None = None) -> Tensor:
    """Log-softmax of the next-token logits ``(B, T, V)`` in float32, steered by ``config`` when given."""
    position_ids = (batch.mask_BT.cumsum(-1) - 1).clamp_min(0)
    ctx = steer(model, config) if config is not None else nullcontext()
    with torch.no_grad(), ctx:
        out = model(input_ids=batch.ids_BT, attention_mask=batch.mask_BT, position_ids=position_ids, use_cache=False)
    return torch.log_softmax(out.logits.float(), dim=-1)


def target_logprobs(lp_BTV: Tensor, batch: Batch) -> Tensor:
    """``(B, T)`` log-probability of the actual next token at each position (0 where there is none)."""
    nxt = torch.roll(batch.ids_BT, -1, dims=1)
    out = lp_BTV.gather(-1, nxt[..., None])[..., 0]
    return torch.where(batch.score_BT, out, torch.zeros_like(out))


def batches(n: int, size: int) -> Iterator[slice]:
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {size}")
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def device_of(model: nn.Module) -> torch.device:
    return model_device(model)


def generated_only(config: SteeringConfig) -> bool:
    """True when every intervention is limited to generated tokens: a teacher-forced forward never steers it."""
    return bool(config.interventions) and all(iv.apply.tokens == "generated" for iv in config.interventions)
