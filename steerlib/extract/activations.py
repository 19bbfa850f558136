"""Tokenize prompts (and teacher-forced responses) and average a model's activations over a span of each sequence.

The building blocks shared by the extraction methods (``steerlib.extract.methods``) and
``steerlib.inspect_features``:

- a prompt is rendered with the tokenizer's chat template (``add_generation_prompt=True``) when asked and when the
  tokenizer has one; a response is tokenized on its own and appended, so the prompt/response boundary is exact
  (tokenizing the concatenated text could merge tokens across it);
- batches are left padded and run through the decoder stack only (no LM head), with position ids counted from each
  row's first real token, as ``generate`` does, so a padded row sees what it would see alone;
- activations come from :func:`steerlib.hf.recording.record`, which reads the stream after any steering hooks.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import Tensor, nn

from steerlib.hf.layout import get_layout
from steerlib.hf.recording import record
from steerlib.sites import SITES, tl_name

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

T = TypeVar("T")


@dataclass(frozen=True)
class Span:
    """One sequence to run, and the positions ``[start, len(ids))`` whose activations are averaged."""

    ids: tuple[int, ...]
    start: int


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str, chat: bool) -> list[int]:
    """Token ids of ``prompt``; rendered as one user turn plus the assistant header when ``chat`` applies."""
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        if not isinstance(text, str):
            raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str")
        # The template writes its own special tokens (BOS and the like).
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


def response_ids(tokenizer: PreTrainedTokenizerBase, response: str) -> list[int]:
    """Token ids of a response, without special tokens: it continues a prompt."""
    return list(tokenizer(response, add_special_tokens=False)["input_ids"])


def prompt_span(tokenizer: PreTrainedTokenizerBase, prompt: str, chat: bool) -> Span:
    """The prompt alone; the span is its last token."""
    ids = prompt_ids(tokenizer, prompt, chat)
    if not ids:
        raise ValueError(f"prompt {prompt!r} tokenizes to no tokens")
    return Span(tuple(ids), len(ids) - 1)


def response_span(tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, chat: bool, where: str) -> Span:
    """Prompt + response in one sequence (teacher forcing); the span is the response's tokens."""
    p, r = prompt_ids(tokenizer, prompt, chat), response_ids(tokenizer, response)
    if not r:
        raise ValueError(f"{where}: response {response!r} tokenizes to no tokens; nothing to average over")
    return Span(tuple(p + r), len(p))


def resolve_layers(model: nn.Module, layers: int | Sequence[int], site: str) -> list[int]:
    """The layers as a list, checked against the model; ``site`` checked against the known sites."""
    if site not in SITES:
        raise ValueError(f"unknown site {site!r}; allowed: {', '.join(SITES)}")
    n = get_layout(model).n_layers
    out = [layers] if isinstance(layers, int) else list(layers)
    if not out:
        raise ValueError("layers must name at least one layer")
    for layer in out:
        if not 0 <= layer < n:
            raise ValueError(f"layer {layer} out of range: model has {n} layers (0..{n - 1})")
    return out


def pad_id_of(tokenizer: PreTrainedTokenizerBase) -> int:
    """Any id works under a zero attention mask; prefer the tokenizer's own pad token."""
    for pid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if isinstance(pid, int):
            return pid
    return 0


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(ids_BT, mask_BT)`` on ``device`` with every row right-aligned (built on the host, then copied once)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long, device="cpu")
    mask = torch.zeros((len(seqs), width), dtype=torch.long, device="cpu")
    for b, s in enumerate(seqs):
        if s:
            ids[b, width - len(s) :] = torch.tensor(list(s), dtype=torch.long, device="cpu")
            mask[b, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


def run_stack(model: nn.Module, ids_BT: Tensor, mask_BT: Tensor) -> None:
    """One forward of the decoder stack without the LM head (recording hooks collect what is needed)."""
    position_ids = (mask_BT.cumsum(-1) - 1).clamp_min(0)
    get_layout(model).base(input_ids=ids_BT, attention_mask=mask_BT, position_ids=position_ids, use_cache=False)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def batched(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def with_progress(items: Iterable[T], enabled: bool, total: int, desc: str) -> Iterable[T]:
    """A tqdm bar around ``items`` when ``enabled`` (tqdm is imported only then)."""
    if not enabled:
        return items
    from tqdm.auto import tqdm

    bar: Any = tqdm(items, total=total, desc=desc)
    return bar


def span_means(
    model: nn.Module,
    spans: Sequence[Span],
    layers: Sequence[int],
    site: str,
    *,
    pad_id: int,
    batch_size: int = 8,
    progress: bool = False,
) -> dict[int, Tensor]:
    """Mean activation over each span's tokens at ``site`` of every layer: ``{layer: (N, D)}`` in float32."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    names = [tl_name(layer, site) for layer in layers]
    chunks: dict[int, list[Tensor]] = {layer: [] for layer in layers}
    device = model_device(model)
    n_batches = -(-len(spans) // batch_size)
    for batch in with_progress(batched(spans, batch_size), progress, n_batches, "activations"):
        starts_B = torch.tensor([s.start for s in batch], device="cpu")  # record() keeps its tokens on the CPU
        ids, mask = left_pad([s.ids for s in batch], pad_id, device)
        # The window drops the tokens before the earliest span; each row's own start is applied below.
        with torch.no_grad(), record(model, names, select={"window": (int(starts_B.min()), None)}) as rec:
            run_stack(model, ids, mask)
        keep = rec.positions >= starts_B[rec.rows]
        rows = rec.rows[keep]
        count_B = torch.bincount(rows, minlength=len(batch)).clamp_min(1)
        for layer, name in zip(layers, names, strict=True):
            acts_ND = rec[name][keep].float()
            sums_BD = torch.zeros(len(batch), acts_ND.shape[-1], device=acts_ND.device).index_add_(0, rows, acts_ND)
            chunks[layer].append(sums_BD / count_B[:, None])
    return {layer: torch.cat(c) for layer, c in chunks.items()}
