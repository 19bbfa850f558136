"""Activations of chat-rendered prompts at several layers in one pass per batch: the last prompt token's, or the
mean over the prompt's tokens (what a ``when: {scope: prompt, aggregate: mean}`` gate averages over).

Results can be cached on disk (keyed by the model, site, layers, system prompt and prompt texts), so a recipe
that is re-run with other probe settings does not run the model again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from tqdm import tqdm

from steerlib.hf.generate import render_prompts
from steerlib.hf.recording import record

Pool = Literal["last", "mean"]


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
    pool: Pool = "last",
) -> dict[int, Tensor]:
    """``{layer: (N, D)}``: each prompt's activation at its last token (where the reply is about to start).

    With ``pool="mean"``: the mean over all of the prompt's (non-padding) tokens instead, chat template included.
    Prompts are batched by length (rows come back in the given order), so a long prompt pads only its peers.
    """
    rendered = render_prompts(tokenizer, prompts, system=system)
    lengths = [len(ids) for ids in tokenizer(rendered, add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(rendered)), key=lengths.__getitem__)
    texts = [rendered[i] for i in order]
    chunks: dict[int, list[Tensor]] = {layer: [] for layer in layers}
    starts = range(0, len(texts), batch_size)
    select = {"positions": [-1]} if pool == "last" else None
    device = next(model.parameters()).device
    for start in tqdm(starts, desc="activations", disable=not progress):
        batch = texts[start : start + batch_size]
        enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with record(model, [(layer, site) for layer in layers], select=select) as rec, torch.no_grad():
            model(**enc)
        for layer in layers:
            acts_nD = rec[(layer, site)]
            if pool == "mean":
                rows_n = rec.rows.to(acts_nD.device)
                sums_BD = torch.zeros(
                    len(batch), acts_nD.shape[1], dtype=torch.float64, device=acts_nD.device
                ).index_add(0, rows_n, acts_nD.double())
                counts_B = torch.bincount(rows_n, minlength=len(batch)).clamp_min(1)
                acts_nD = (sums_BD / counts_B[:, None]).to(acts_nD.dtype)
            chunks[layer].append(acts_nD)
    # record() keeps what it records on the CPU, so the reordering is done there too
    back = torch.empty(len(order), dtype=torch.long, device="cpu")
    back[torch.tensor(order, dtype=torch.long, device="cpu")] = torch.arange(len(order), device="cpu")
    return {layer: torch.cat(c)[back] if c else torch.empty(0, device="cpu") for layer, c in chunks.items()}


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
        # mean-pooled caches get their own key; last-token keys stay as they were, so old caches still match
        + ([kwargs["pool"]] if kwargs.get("pool", "last") != "last" else [])
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
