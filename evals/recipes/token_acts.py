"""Every prompt token's activation at a few layers, for gates that pool over the prompt (``aggregate: max`` finds a
short harmful span in a long jailbreak template; ``mean`` dilutes it), recorded once and cached on disk.

A conversation is rendered through the chat template as a ``scope: prompt`` gate sees it (generation prompt
included, so the last token is the assistant header's). The model runs only up to the deepest requested layer (a
forward hook stops it there), with right padding so a row's tokens see what they would alone. Prompts are recorded
in chunks in order of length; each chunk is a file named by a hash of what it holds, so an interrupted run resumes
where it stopped and a second run with the same prompts runs nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from steerlib.hf.layout import get_layout

log = logging.getLogger(__name__)

Conversation = Sequence[dict[str, str]]


@dataclass(frozen=True)
class TokenActs:
    """Ragged per-token activations of ``P`` prompts: prompt ``i`` owns rows ``offsets[i]:offsets[i+1]``."""

    acts: dict[int, Tensor]
    """``{layer: (T, D)}`` float16, the output of that decoder layer (``resid_post``)."""
    offsets_P1: Tensor
    ask_P: Tensor
    """Index (within its prompt) of the first token of the ask; tokens from there on have read the request."""

    @property
    def n_prompts(self) -> int:
        return len(self.offsets_P1) - 1

    def row_of_token(self) -> Tensor:
        """``(T,)`` the prompt of each token."""
        lengths = self.offsets_P1[1:] - self.offsets_P1[:-1]
        return torch.repeat_interleave(torch.arange(self.n_prompts, device="cpu"), lengths)

    def take(self, idx: Sequence[int]) -> TokenActs:
        """The prompts ``idx``, in that order."""
        starts, ends = self.offsets_P1[:-1], self.offsets_P1[1:]
        spans = [torch.arange(int(starts[i]), int(ends[i]), device="cpu") for i in idx]
        rows = torch.cat(spans) if spans else torch.empty(0, dtype=torch.long, device="cpu")
        lengths = torch.tensor([len(s) for s in spans], dtype=torch.long, device="cpu")
        offsets = torch.cat([torch.zeros(1, dtype=torch.long, device="cpu"), lengths.cumsum(0)])
        return TokenActs({k: a[rows] for k, a in self.acts.items()}, offsets, self.ask_P[list(idx)])


def render(tokenizer: Any, conversation: Conversation) -> str:
    return str(tokenizer.apply_chat_template(list(conversation), tokenize=False, add_generation_prompt=True))


def ask_token(tokenizer: Any, rendered: str, ask: str) -> tuple[list[int], int]:
    """Token ids of ``rendered`` and the index of the token holding the first character of ``ask`` in it."""
    at = rendered.find(ask) if ask else -1
    if at < 0:
        raise ValueError(f"ask text not found in the rendered prompt: {ask[:60]!r}")
    enc = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = enc["input_ids"]
    index = next(i for i, (s, e) in enumerate(enc["offset_mapping"]) if e > at)
    return ids, index


class _Stop(Exception):
    pass


def run_layers(
    model: nn.Module, ids_BT: Tensor | None, mask_BT: Tensor, layers: Sequence[int], *, embeds_BTD: Tensor | None = None
) -> dict[int, Tensor]:
    """``{layer: (B, T, D)}`` outputs of the given decoder layers; the model stops after the deepest. Given
    ``embeds_BTD`` instead of ids, the outputs keep their graph (for gradients with respect to the inputs)."""
    blocks = get_layout(model).layers
    out: dict[int, Tensor] = {}
    last = max(layers)

    def hook(layer: int) -> Any:
        def fn(_m: nn.Module, _i: Any, o: Any) -> None:
            h = o[0] if isinstance(o, tuple) else o
            out[layer] = h if embeds_BTD is not None else h.detach()
            if layer == last:
                raise _Stop

        return fn

    handles = [blocks[layer].register_forward_hook(hook(layer)) for layer in layers]
    try:
        if embeds_BTD is not None:
            model(inputs_embeds=embeds_BTD, attention_mask=mask_BT, use_cache=False)
        else:
            with torch.no_grad():
                model(input_ids=ids_BT, attention_mask=mask_BT, use_cache=False)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return out


def _chunk_key(model: nn.Module, layers: Sequence[int], rendered: Sequence[str], asks: Sequence[str]) -> str:
    name = getattr(getattr(model, "config", None), "name_or_path", "")
    src = json.dumps([name, list(layers), list(rendered), list(asks)])
    return hashlib.sha256(src.encode("utf-8")).hexdigest()[:24]


def record_tokens(
    model: nn.Module,
    tokenizer: Any,
    conversations: Sequence[Conversation],
    asks: Sequence[str],
    layers: Sequence[int],
    cache_dir: Path,
    *,
    batch_tokens: int = 2048,
    chunk: int = 64,
    progress: bool = True,
) -> TokenActs:
    """Per-token activations of every conversation (see the module docstring); rows in the given order."""
    rendered = [render(tokenizer, c) for c in conversations]
    encoded = [ask_token(tokenizer, r, a) for r, a in zip(rendered, asks, strict=True)]
    order = sorted(range(len(rendered)), key=lambda i: len(encoded[i][0]))
    per_prompt: dict[int, dict[int, Tensor]] = {}
    device = next(model.parameters()).device
    bar = tqdm(total=sum(len(e[0]) for e in encoded), unit="tok", desc="token activations", disable=not progress)
    for start in range(0, len(order), chunk):
        idx = order[start : start + chunk]
        key = _chunk_key(model, layers, [rendered[i] for i in idx], [asks[i] for i in idx])
        path = cache_dir / f"{key}.pt"
        if path.is_file():
            got: list[dict[int, Tensor]] = torch.load(path, weights_only=True)
        else:
            got = _record_chunk(model, [encoded[i][0] for i in idx], layers, batch_tokens, device)
            cache_dir.mkdir(parents=True, exist_ok=True)
            torch.save(got, path.with_suffix(".tmp"))
            os.replace(path.with_suffix(".tmp"), path)
        per_prompt.update(zip(idx, got, strict=True))
        bar.update(sum(len(encoded[i][0]) for i in idx))
    bar.close()
    lengths = torch.tensor([len(e[0]) for e in encoded], dtype=torch.long, device="cpu")
    offsets = torch.cat([torch.zeros(1, dtype=torch.long, device="cpu"), lengths.cumsum(0)])
    acts = {
        layer: torch.cat([per_prompt[i][layer] for i in range(len(rendered))])
        if rendered
        else torch.empty(0, device="cpu")
        for layer in layers
    }
    return TokenActs(acts, offsets, torch.tensor([e[1] for e in encoded], dtype=torch.long, device="cpu"))


def _record_chunk(
    model: nn.Module, ids: Sequence[list[int]], layers: Sequence[int], batch_tokens: int, device: torch.device
) -> list[dict[int, Tensor]]:
    """One chunk (sorted by length), in batches of about ``batch_tokens`` padded tokens."""
    out: list[dict[int, Tensor]] = []
    i = 0
    while i < len(ids):
        n = 1  # sorted by length: the batch's last row is its longest
        while i + n < len(ids) and (n + 1) * len(ids[i + n]) <= batch_tokens:
            n += 1
        batch = ids[i : i + n]
        width = max(len(x) for x in batch)
        ids_BT = torch.zeros(len(batch), width, dtype=torch.long, device=device)
        mask_BT = torch.zeros(len(batch), width, dtype=torch.long, device=device)
        for b, x in enumerate(batch):
            ids_BT[b, : len(x)] = torch.tensor(x, device=device)
            mask_BT[b, : len(x)] = 1
        acts = run_layers(model, ids_BT, mask_BT, layers)
        for b, x in enumerate(batch):
            out.append({layer: acts[layer][b, : len(x)].to("cpu", torch.float16) for layer in layers})
        i += n
    return out
