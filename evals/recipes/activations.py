"""Activations at the last prompt token of chat-rendered prompts, at several layers in one pass per batch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from steerlib.hf.generate import render_prompts
from steerlib.hf.recording import record


def last_token_activations(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    layers: Sequence[int],
    *,
    site: str = "resid_post",
    system: str | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> dict[int, Tensor]:
    """``{layer: (N, D)}``: each prompt's activation at its last token (where the reply is about to start)."""
    texts = render_prompts(tokenizer, prompts, system=system)
    chunks: dict[int, list[Tensor]] = {layer: [] for layer in layers}
    starts = range(0, len(texts), batch_size)
    for start in tqdm(starts, desc="activations", disable=not progress):
        enc = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        with record(model, [(layer, site) for layer in layers], select={"positions": [-1]}) as rec, torch.no_grad():
            model(**enc)
        for layer in layers:
            chunks[layer].append(rec[(layer, site)])
    return {layer: torch.cat(c) for layer, c in chunks.items()}
