"""Text sources, packing with BOS and separators, the held-out split, and hash-checked corpus downloads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sae_train.corpora import CORPORA
from sae_train.data import Packing, documents, is_heldout, iter_contexts, pack, split_documents
from sae_train.fetch import Archive, HashMismatchError, download, sha256_file


class CharTokenizer:
    """One token per character (its code point); bos 1, eos 2."""

    bos_token_id = 1
    eos_token_id = 2

    def __call__(self, text: list[str], *, add_special_tokens: bool) -> dict[str, list[list[int]]]:
        return {"input_ids": [[ord(c) for c in t] for t in text]}


def test_local_txt_jsonl_and_folder_sources(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "beta"}) + "\n\n" + json.dumps({"text": "gamma"}) + "\n")
    assert list(documents(str(tmp_path))) == ["alpha", "beta", "gamma"]
    assert list(documents(str(tmp_path / "b.jsonl"))) == ["beta", "gamma"]
    (tmp_path / "bad.jsonl").write_text('{"body": 1}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: each JSONL line needs a string field 'text'"):
        list(documents(str(tmp_path / "bad.jsonl")))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(documents(str(tmp_path / "missing.txt")))


def test_packing_puts_bos_first_and_separates_documents() -> None:
    tok = CharTokenizer()
    out = pack(["abc", "defgh", "ij"], tok, Packing(ctx_len=4, bos_id=1, sep_id=2))
    a, b, c, d, e, f, g, h, i, j = (ord(ch) for ch in "abcdefghij")
    assert out.tolist() == [[1, a, b, c], [1, 2, d, e], [1, f, g, h], [1, 2, i, j]]
    assert pack(["abcdef"], tok, Packing(3, None, None)).tolist() == [[a, b, c], [d, e, f]]
    assert len(list(iter_contexts(["abcdefgh"] * 5, tok, Packing(4, 1, 2), max_contexts=3))) == 3
    with pytest.raises(ValueError, match="no context could be packed"):
        pack(["a"], tok, Packing(8, 1, 2))


def test_heldout_split_is_disjoint_stable_and_about_the_right_size() -> None:
    docs = [f"document number {i}" for i in range(2000)]
    held = list(split_documents(docs, "heldout", 0.1))
    train = list(split_documents(docs, "train", 0.1))
    assert set(held).isdisjoint(train) and len(held) + len(train) == 2000
    assert 140 < len(held) < 260
    assert held == list(split_documents(reversed(docs), "heldout", 0.1))[::-1]
    assert is_heldout(held[0], 0.1) and not is_heldout(train[0], 0.1)


def _fake_archive(tmp_path: Path) -> tuple[Archive, bytes]:
    data = b"not really a tarball"
    return Archive("npm", "@x/y", "1.0.0", "x-y-1.0.0.tgz", __import__("hashlib").sha256(data).hexdigest()), data


def test_download_checks_the_recorded_sha256(tmp_path: Path) -> None:
    archive, data = _fake_archive(tmp_path)
    calls: list[list[str]] = []

    def fake_npm(cmd: list[str], cwd: Path) -> None:
        calls.append(cmd)
        (cwd / archive.filename).write_bytes(data)

    path = download(archive, tmp_path, run=fake_npm)
    assert sha256_file(path) == archive.sha256
    assert calls[0][:3] == ["npm", "pack", "@x/y@1.0.0"]
    bad = Archive("npm", "@x/y", "1.0.0", "x-y-1.0.0.tgz", "0" * 64)
    with pytest.raises(HashMismatchError, match="does not match the recorded 0000"):
        download(bad, tmp_path, run=fake_npm)


def test_every_corpus_pins_version_and_hash() -> None:
    assert {"sotu", "moby-dick", "shakespeare", "milton", "python-docs"} <= set(CORPORA)
    for c in CORPORA.values():
        # a Debian file name writes the version's epoch colon as %3a
        assert len(c.archive.sha256) == 64 and c.archive.version.replace(":", "%3a") in c.archive.filename
