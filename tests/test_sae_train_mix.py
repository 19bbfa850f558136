"""The training mix of issue 20: new corpus readers, the character-weighted mix, and chat transcripts."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest

import sae_train.chat as chat
from sae_train.corpora import CORPORA, _documents
from sae_train.data import _weighted, contexts, documents, packing_for, split_documents


def test_readers_strip_markup_tags_and_offensive_sentences() -> None:
    html = b"<html><head><title>T</title><style>p{}</style></head><body><p>One  two.</p><script>x=1</script>"
    html += b"<p>Three</p></body></html>"
    assert _documents(html, "html") == ["One two.\nThree"]
    assert _documents(b"\n\tThe/at jury/nn said/vbd ,/, ``/`` fine/jj ''/'' ./.\n\n\tNext/ap one/cd ./.", "brown") == [
        'The jury said, " fine ".\n\nNext one.'
    ]
    sentences = json.dumps([f"Sentence {i}." for i in range(25)] + ["What the fuck."]).encode()
    docs = _documents(sentences, "sentences")
    assert len(docs) == 2 and docs[1] == " ".join(f"Sentence {i}." for i in range(20, 25))
    assert _documents(gzip.compress(b"Kernel docs"), "gzip_text") == ["Kernel docs"]


def test_every_modern_corpus_is_pinned_with_a_license() -> None:
    modern = [c for c in CORPORA.values() if c.domain == "modern"]
    assert {c.name for c in modern} >= {"debian-handbook", "git-docs", "brown", "nlp-sentences"}
    for c in modern:
        assert len(c.archive.sha256) == 64 and c.archive.version and c.license


def test_weighted_mix_follows_the_weights_by_characters() -> None:
    long_docs = iter(["L" * 100] * 50)
    short_docs = iter(["s" * 10] * 1000)
    out = list(_weighted([long_docs, short_docs], [0.5, 0.5]))
    first = out[:220]
    chars_long = sum(len(d) for d in first if d[0] == "L")
    chars_short = sum(len(d) for d in first if d[0] == "s")
    assert abs(chars_long - chars_short) <= 100  # within one long document of equal shares
    assert sum(d[0] == "L" for d in out) == 50 and sum(d[0] == "s" for d in out) == 1000  # nothing lost
    assert list(_weighted([iter(["a"]), iter(["b"])], [1.0, 0.0])) == ["a"]


class ChatTokenizer:
    """ChatML rendering as SmolLM2's template does it; one token per character."""

    bos_token_id = 1
    eos_token_id = 2

    def apply_chat_template(
        self, messages: list[dict[str, str]], *, tokenize: bool, add_generation_prompt: bool
    ) -> str:
        text = "<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n"
        text += "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")

    def __call__(self, text: list[str], *, add_special_tokens: bool) -> dict[str, list[list[int]]]:
        return {"input_ids": [[ord(c) % 100 + 3 for c in t] for t in text]}


@pytest.fixture
def two_sets(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    items = [chat.ChatItem(f"q/{i}", f"Question number {i}?") for i in range(200)] + [
        chat.ChatItem("q/long", "x" * (chat.MAX_PROMPT_TOKENS + 1))
    ]
    sets = {
        "qa": chat.ChatSet("qa", lambda: items, True, "test prompts with replies"),
        "ask": chat.ChatSet("ask", lambda: items[:3], False, "test prompts alone"),
    }
    monkeypatch.setattr(chat, "CHAT_SETS", sets)
    monkeypatch.setenv("STEERLIB_CACHE", str(tmp_path))
    return tmp_path


def test_chat_sources_render_transcripts_and_need_every_reply(two_sets: Path) -> None:
    tok = ChatTokenizer()
    first = next(iter(documents("chat:ask", tokenizer=tok)))
    assert first.endswith("<|im_start|>user\nQuestion number 0?<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="need the tokenizer"):
        list(documents("chat:qa"))
    items = chat.chat_items("qa", tok)
    assert len(items) == 200  # the over-long prompt is left out
    path = chat.replies_path(items, chat.EMBEDDED_MODEL_ID, chat.Sampling(), None)
    path.parent.mkdir(parents=True)
    rows = [json.dumps({"id": i.id, "reply": f"Answer {i.id}."}) for i in items[:199]]
    path.write_text("\n".join(rows) + '\n{"id": "q/199", "rep')  # a writer killed mid-line
    with pytest.raises(FileNotFoundError, match=r"chat:qa: 1 of 200 replies missing .*sae_train.replies qa"):
        list(documents("chat:qa", tokenizer=tok))
    path.write_text("\n".join([*rows, json.dumps({"id": "q/199", "reply": "Last."})]) + "\n")
    docs = list(documents("chat:qa", tokenizer=tok))
    assert len(docs) == 200 and docs[5].endswith("<|im_start|>assistant\nAnswer q/5.<|im_end|>\n")


def test_a_transcripts_split_is_decided_by_its_prompt(two_sets: Path) -> None:
    tok = ChatTokenizer()
    prompts = [chat.render(tok, f"Question number {i}?", None) for i in range(200)]
    with_a = [p + "Reply A<|im_end|>\n" for p in prompts]
    with_b = [p + "A different reply<|im_end|>\n" for p in prompts]
    held = [d.partition(chat.ASSISTANT_HEADER)[0] for d in split_documents(with_a, "heldout", 0.2)]
    assert held == [d.partition(chat.ASSISTANT_HEADER)[0] for d in split_documents(with_b, "heldout", 0.2)]
    assert 10 < len(held) < 70
    train = list(split_documents(with_a, "train", 0.2))
    assert len(train) + len(held) == 200


def test_weighted_contexts_from_chat_and_local_text(two_sets: Path, tmp_path: Path) -> None:
    tok: Any = ChatTokenizer()
    (tmp_path / "prose.txt").write_text("prose " * 5000)
    ids = contexts(["chat:ask", str(tmp_path / "prose.txt")], tok, packing_for(tok, 32), "train",
                   heldout_fraction=0.01, max_contexts=20, weights=[1.0, 1.0])  # fmt: skip
    assert ids.shape == (20, 32) and bool((ids[:, 0] == 1).all())
