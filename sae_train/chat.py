"""Chat transcripts as SAE training text: registry prompts in the chat template, with the model's own replies.

The text this project steers and browses most is chat: a prompt rendered in the model's chat template and the
model's reply. Three ``chat:<name>`` sources provide it (:data:`CHAT_SETS`):

- ``chat:prompts``: the prompt sets of :data:`evals.datasets.DATASETS` named in :data:`PROMPT_SETS` (harmful
  and harmless), with the embedded model's greedy reply;
- ``chat:mmlu``: MMLU questions asked as :func:`evals.capability.mmlu_prompt` asks them, with the reply;
- ``chat:mmlu-prompts``: further MMLU questions, prompt only, ending at the assistant header (what the model reads
  just before it answers, where steering and probes look).

Only the **train half** of each prompt set is used (:func:`evals.datasets.in_train`, the split the evals score
on the other half of), so no evaluation prompt is ever trained on. Inside that half the SAE's own held-out split
(:func:`sae_train.data.is_heldout`) is decided by the *prompt* (everything before the first assistant turn,
:func:`split_key`), so a transcript's split does not depend on its reply.

Replies are generated once by ``python -m sae_train.replies`` (vLLM, greedy) into a JSONL file under
``$STEERLIB_CACHE/chat/`` named by a hash of the prompts, the model and the sampling settings; generation appends
as it goes and resumes where it stopped. A source whose replies are missing raises with that command.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steerlib.hf.loading import cache_root
from steerlib.registry import lookup

ASSISTANT_HEADER = "<|im_start|>assistant\n"
"""Where a SmolLM2 (ChatML) transcript's first reply starts; the text before it decides the split."""
EMBEDDED_MODEL_ID = "SmolLM2-135M-Instruct"
"""The replies are the embedded model's: the reply cache is keyed by this name."""
MAX_PROMPT_TOKENS = 320
"""Longer prompts are left out: with the reply they would not fit the generation engine's 512-token window."""


@dataclass(frozen=True)
class ChatItem:
    """One user prompt, with a stable id (``<dataset>/<index>``)."""

    id: str
    prompt: str


@dataclass(frozen=True)
class ChatSet:
    """A ``chat:<name>`` source: which prompts, and whether the model's replies belong to the transcripts."""

    name: str
    items: Callable[[], list[ChatItem]]
    with_replies: bool
    description: str


@dataclass(frozen=True)
class Sampling:
    """How replies are generated (part of the reply cache's key)."""

    max_tokens: int = 160
    temperature: float = 0.0


PROMPT_SETS = (
    "advbench", "donotanswer", "harmbench", "harmbench_text", "harmbench_text_val", "harmful_probes",
    "harmless_probes", "rho_benign", "rho_overrefusal",
)  # fmt: skip
"""The :data:`evals.datasets.DATASETS` entries in ``chat:prompts``: named, so that a set registered later changes
neither the transcripts nor their reply cache (a new set belongs in a new chat source)."""


def _eval_prompts() -> list[ChatItem]:
    # evals' prompt sets are read through evals.datasets (their owner); imported here, at use, because
    # evals itself imports sae_train.fetch
    from evals.datasets import DATASETS, in_train

    seen: set[str] = set()
    out: list[ChatItem] = []
    for name in PROMPT_SETS:
        for p in DATASETS[name].loader(None):
            if in_train(p.text) and p.text.strip() not in seen:
                seen.add(p.text.strip())
                out.append(ChatItem(p.id, p.text))
    return out


def _mmlu_train() -> list[ChatItem]:
    from evals.capability import mmlu_prompt
    from evals.datasets import in_train, load_mmlu

    return [ChatItem(q.id, mmlu_prompt(q)) for q in load_mmlu() if in_train(q.question)]


MMLU_WITH_REPLIES = 400
"""MMLU questions asked with replies (every ``len / 400``-th of the train half); the rest go prompt-only."""


def _mmlu_replied() -> list[ChatItem]:
    items = _mmlu_train()
    step = max(1, len(items) // MMLU_WITH_REPLIES)
    return items[::step][:MMLU_WITH_REPLIES]


def _mmlu_prompt_only() -> list[ChatItem]:
    replied = {i.id for i in _mmlu_replied()}
    return [i for i in _mmlu_train() if i.id not in replied]


CHAT_SETS: dict[str, ChatSet] = {
    s.name: s
    for s in (
        ChatSet("prompts", _eval_prompts, True, "evals' registered prompt sets (train half) with the model's replies"),
        ChatSet("mmlu", _mmlu_replied, True, f"{MMLU_WITH_REPLIES} MMLU train-half questions with replies"),
        ChatSet("mmlu-prompts", _mmlu_prompt_only, False, "the other MMLU train-half questions, prompt only"),
    )
}
"""``chat:<name>`` -> its prompts."""


def get_chat_set(name: str) -> ChatSet:
    return lookup(CHAT_SETS, "chat source", name)


def render(tokenizer: Any, prompt: str, reply: str | None) -> str:
    """The transcript in the chat template: system, user, then the reply (closed by the end-of-turn token) or,
    without a reply, the open assistant header."""
    text = str(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                            add_generation_prompt=True))  # fmt: skip
    return text if reply is None else text + reply + "<|im_end|>\n"


def split_key(text: str) -> str:
    """The part of a document that decides its held-out split: a transcript's prompt, else the whole text."""
    head, found, _ = text.partition(ASSISTANT_HEADER)
    return head if found else text


def fits(tokenizer: Any, items: Sequence[ChatItem]) -> list[ChatItem]:
    """The items whose prompt has at most :data:`MAX_PROMPT_TOKENS` tokens."""
    ids = tokenizer([i.prompt for i in items], add_special_tokens=False)["input_ids"]
    return [i for i, t in zip(items, ids, strict=True) if len(t) <= MAX_PROMPT_TOKENS]


def replies_path(items: Sequence[ChatItem], model_id: str, sampling: Sampling, cache_dir: str | Path | None) -> Path:
    """``<cache>/chat/replies-<hash>.jsonl``: the hash covers prompts, model and sampling, so a change regenerates."""
    key = {"model": model_id, "sampling": sampling.__dict__, "prompts": [[i.id, i.prompt] for i in items]}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root(cache_dir) / "chat" / f"replies-{digest}.jsonl"


def read_replies(path: Path) -> dict[str, str]:
    """``{id: reply}`` of a reply file; a torn last line (a killed writer) is ignored."""
    out: dict[str, str] = {}
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        out[str(row["id"])] = str(row["reply"])
    return out


def chat_items(name: str, tokenizer: Any) -> list[ChatItem]:
    """The prompts of ``chat:<name>`` that fit the generation window, in a fixed order."""
    return fits(tokenizer, get_chat_set(name).items())


def chat_documents(
    name: str,
    tokenizer: Any,
    *,
    model_id: str = EMBEDDED_MODEL_ID,
    cache_dir: str | Path | None = None,
    require_all: bool = True,
    sampling: Sampling | None = None,
) -> Iterator[str]:
    """The transcripts of ``chat:<name>``. With replies, every prompt's reply must be in the cache (``require_all``;
    else prompts without one are skipped)."""
    chat = get_chat_set(name)
    items = chat_items(name, tokenizer)
    if not chat.with_replies:
        yield from (render(tokenizer, i.prompt, None) for i in items)
        return
    path = replies_path(items, model_id, sampling or Sampling(), cache_dir)
    replies = read_replies(path)
    missing = sum(i.id not in replies for i in items)
    if missing and require_all:
        raise FileNotFoundError(
            f"chat:{name}: {missing} of {len(items)} replies missing in {path}; generate them with "
            f"`/opt/vllm-venv/bin/python -m sae_train.replies {name}` (vLLM; resumes where it stopped)"
        )
    yield from (render(tokenizer, i.prompt, replies[i.id]) for i in items if i.id in replies)
