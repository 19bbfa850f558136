"""The preset registry as the feature browser needs it: feature-index SAEs by name, and saving presets.

Each served feature index lends its SAE to steering under the index's name (``{"op": "sae", "sae": "<index>"}``),
so the browser's "try it" needs no copy of the SAE in the presets folder. Those SAE paths are the only files outside
the presets folder a preset may reach; they come from the operator's ``--features`` folders, never from a client.

Saved presets are YAML files in the presets folder, written atomically and durably (file and folder fsynced), named
like every preset (letters, digits, ``_ - .``) and never overwritten unless the request says so and the server
allows it (``allow_preset_overwrite``; the server's default presets never, see :mod:`servers.browser.routes`).
Every file reference is stored portable (``SteeringConfig.map_refs``): paths inside the presets folder relative to
it, an index SAE by the index's name (``sae: <index>``), which any server serving a feature index of that name
resolves to its SAE (an index name wins over a folder of the same name beside the presets; under ``saes/`` such a
clash stops the server).
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from pathlib import Path

import yaml

from servers.registry import PresetError, PresetInfo, PresetRegistry, check_name
from steerlib.config import FileRef, SteeringConfig

log = logging.getLogger(__name__)


class PresetExistsError(PresetError):
    """A preset of that name exists and the request did not ask to overwrite it."""


class BrowserRegistry(PresetRegistry):
    """Presets from ``root`` plus the SAEs of feature indexes (name -> resolved path); can save new presets."""

    def __init__(self, root: Path | None, index_saes: dict[str, Path]) -> None:
        # Set first: loading the folder's presets already goes through confine(), which reads it.
        self.index_saes = {name: p.resolve() for name, p in index_saes.items()}
        self._write_lock = threading.Lock()
        super().__init__(root)
        clash = sorted(set(index_saes) & set(super().available("sae")))
        if clash:
            raise PresetError(f"feature index names {clash} are also SAE names in the presets folder; rename one")

    def sae(self, name: str) -> str:
        if name in self.index_saes:
            return str(self.index_saes[name])
        return super().sae(name)

    def available(self, kind: str) -> list[str]:
        own = super().available(kind)
        return sorted([*own, *self.index_saes]) if kind == "sae" else own

    def sae_path(self, ref: str, cfg: SteeringConfig) -> Path:
        if ref in self.index_saes:
            return self.index_saes[ref]
        return super().sae_path(ref, cfg)

    def confine(self, path: Path) -> Path:
        resolved = path.resolve()
        if any(resolved.is_relative_to(p) for p in self.index_saes.values()):
            return resolved
        return super().confine(path)

    def save(self, name: str, description: str, config: SteeringConfig, *, overwrite: bool) -> PresetInfo:
        """Write ``config`` (absolute, checked paths) as ``<root>/<name>.yaml`` and list it from now on."""
        if self.root is None:
            raise PresetError("the server has no presets folder to save presets in (start it with --presets DIR)")
        check_name(name, "preset")
        path = self.confine(self.root / f"{name}.yaml")
        portable = config.map_refs(self._portable)
        data = {
            "description": description,
            "interventions": [iv.model_dump(mode="json", exclude_defaults=True) for iv in portable.interventions],
        }
        with self._write_lock:
            others = [p for p in self.root.glob(f"{name}.y*ml") if p.stem == name]
            if others and not overwrite:
                raise PresetExistsError(f"preset {name!r} exists ({others[0].name}); set overwrite to replace it")
            previous = path.read_bytes() if path.exists() else None
            _write_atomic(path, yaml.safe_dump(data, sort_keys=False).encode())
            try:
                preset = self.add(path)
            except Exception:
                _restore(path, previous)
                raise
            for p in others:
                if p != path:
                    p.unlink()  # a .yml of the same name would shadow the new file at the next start
                    _sync_folder(self.root)
        log.info("saved preset %r to %s", name, path)
        return preset.info

    def _portable(self, ref: FileRef) -> str:
        """A file reference as a preset stores it: relative to the presets folder, an index SAE by its index's
        name (every kind: vectors, SAEs and MLP probes, in the op and in its condition)."""
        path = Path(ref.ref).resolve()
        index_of = {p: name for name, p in self.index_saes.items()}
        return index_of[path] if ref.kind == "sae" and path in index_of else self._relative(path)

    def _relative(self, path: Path) -> str:
        assert self.root is not None
        resolved = self.confine(path)
        if not resolved.is_relative_to(self.root):
            raise PresetError(f"{resolved.name} lies outside the presets folder and is no feature index's SAE")
        return resolved.relative_to(self.root).as_posix()


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` so that a crash leaves the old file or the new one, never a part: a temporary file in the
    same folder, flushed to disk, renamed over ``path``, then the folder itself flushed (the rename is durable)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        _sync_folder(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _sync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _restore(path: Path, previous: bytes | None) -> None:
    """Put back what ``path`` held before a failed save (atomically), or remove it if it did not exist."""
    if previous is None:
        path.unlink(missing_ok=True)
        _sync_folder(path.parent)
    else:
        _write_atomic(path, previous)
