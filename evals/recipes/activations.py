"""Activations at the last prompt token of chat-rendered prompts, at several layers in one pass per batch.

Results can be cached on disk (keyed by the model, site, layers, system prompt and prompt texts), so a recipe
that is re-run with other probe settings does not run the model again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
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


def cached_last_token_activations(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    layers: Sequence[int],
    cache_dir: Path,
    **kwargs: Any,
) -> dict[int, Tensor]:
    """:func:`last_token_activations`, stored under ``cache_dir`` and reused when the same inputs come again."""
    key_src = json.dumps(
        [
            getattr(model.config, "name_or_path", ""),
            list(layers),
            list(prompts),
            kwargs.get("site"),
            kwargs.get("system"),
        ]
    )
    path = cache_dir / f"{hashlib.sha256(key_src.encode()).hexdigest()[:24]}.pt"
    if path.is_file():
        cached: dict[int, Tensor] = torch.load(path, weights_only=True)
        return cached
    acts = last_token_activations(model, tokenizer, prompts, layers, **kwargs)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(acts, tmp)
    os.replace(tmp, path)
    return acts
