"""The preset registry: a folder of named steering configs, vectors and SAEs that requests refer to by name.

    presets/
      refusal_add.yaml        # description: ... + a steerlib steering config (paths relative to this folder)
      vectors/refusal.safetensors   # {"preset_vector": "refusal"} in an inline request
      saes/probe/                   # {"sae": "probe"} in an inline request
      probes/harm.safetensors       # an MLP probe: {"when": {"probe": "harm", ...}} in an inline request

Every file a preset or a request reaches is resolved and checked to lie inside the folder (symlinks included), so
neither a preset nor a client can make the server read anything else. Configs are returned with absolute paths and
no ``base_dir``, so configs from different presets and requests can be concatenated.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from steerlib.config import FileRef, SteeringConfig

log = logging.getLogger(__name__)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
VECTOR_DIR, PROBE_DIR, SAE_DIR = "vectors", "probes", "saes"
FILE_DIRS = {"vector": VECTOR_DIR, "probe": PROBE_DIR}
"""Kinds named by a file stem (``<dir>/<name>.safetensors``); SAEs are named by their folder or file name."""


class PresetError(ValueError):
    """A preset name or file that cannot be used; the message says which and what exists."""


class PresetInfo(BaseModel):
    """A preset as listed by ``GET /v1/steering/presets``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="What requests put in `steering`.")
    description: str = Field(description="What the preset does, from its file.")
    config: dict[str, Any] = Field(description="The steering config, paths shown relative to the presets folder.")


@dataclass(frozen=True)
class Preset:
    info: PresetInfo
    config: SteeringConfig
    """Absolute, confined paths; ``base_dir`` None."""


def check_name(name: str, kind: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise PresetError(f"invalid {kind} name {name!r}: use letters, digits, '_', '-', '.' (no '..', max 64)")
    return name


class PresetRegistry:
    """Presets loaded once from a folder; vector and SAE names resolved on demand, confined to the folder."""

    def __init__(self, root: Path | None) -> None:
        self.root = root.resolve() if root is not None else None
        self._presets: dict[str, Preset] = {}
        if self.root is not None:
            if not self.root.is_dir():
                raise PresetError(f"presets folder not found: {root}")
            for path in sorted(self.root.glob("*.y*ml")):
                self._add_or_skip(path)
            log.info("loaded %d presets from %s: %s", len(self._presets), self.root, ", ".join(self._presets))

    def _add_or_skip(self, path: Path) -> None:
        """A preset file that cannot be served (unreadable, invalid, reaching outside the folder) is skipped with a
        logged error: the others still load (a default preset that is skipped stops the server, as unknown)."""
        try:
            self.add(path)
        except (ValueError, OSError, yaml.YAMLError) as e:
            log.error("skipping preset file %s: %s", path.name, e)

    def add(self, path: Path) -> Preset:
        """Load the preset file ``path`` and list it under its stem (replacing one of that name)."""
        preset = self._load(path)
        self._presets[preset.info.name] = preset
        return preset

    @property
    def names(self) -> list[str]:
        return sorted(self._presets)

    def infos(self) -> list[PresetInfo]:
        return [self._presets[n].info for n in self.names]

    def get(self, name: str) -> SteeringConfig:
        if name not in self._presets:
            valid = ", ".join(self.names) or "none (the server has no presets folder)"
            raise PresetError(f"unknown preset {name!r}; valid presets: {valid}")
        return self._presets[name].config

    def vector(self, name: str) -> str:
        """The absolute path of ``vectors/<name>.safetensors``."""
        return self._file("vector", name)

    def probe(self, name: str) -> str:
        """The absolute path of ``probes/<name>.safetensors`` (an MLP probe)."""
        return self._file("probe", name)

    def _file(self, kind: str, name: str) -> str:
        return str(self._existing(Path(FILE_DIRS[kind]) / f"{check_name(name, kind)}.safetensors", kind, name))

    def sae(self, name: str) -> str:
        """The absolute path of ``saes/<name>`` (a folder or a file)."""
        return str(self._existing(Path(SAE_DIR) / check_name(name, "SAE"), "SAE", name))

    def available(self, kind: str) -> list[str]:
        if self.root is None:
            return []
        sub = self.root / FILE_DIRS.get(kind, SAE_DIR)
        return sorted(p.stem if kind in FILE_DIRS else p.name for p in sub.glob("*")) if sub.is_dir() else []

    def confine(self, path: Path) -> Path:
        """``path`` resolved (symlinks followed); an error unless it lies inside the presets folder."""
        if self.root is None:
            raise PresetError("the server has no presets folder, so no vector or SAE can be referenced by name")
        resolved = path.resolve()
        if not resolved.is_relative_to(self.root):
            raise PresetError(f"{path} is outside the presets folder")
        return resolved

    def _existing(self, rel: Path, kind: str, name: str) -> Path:
        if self.root is None:
            raise PresetError(f"unknown {kind} {name!r}: the server has no presets folder")
        path = self.confine(self.root / rel)
        if not path.exists():
            have = ", ".join(self.available(kind)) or "none"
            raise PresetError(f"unknown {kind} {name!r}; available: {have}")
        return path

    def _load(self, path: Path) -> Preset:
        data = yaml.safe_load(path.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("description"), str):
            raise PresetError(f"{path.name}: a preset is a mapping with a 'description' string and 'interventions'")
        raw = SteeringConfig.from_dict(data, base_dir=path.parent)
        confined = raw.map_refs(lambda ref: self._confined(ref, raw))
        config = SteeringConfig(description=raw.description, interventions=confined.interventions)
        info = PresetInfo(
            name=check_name(path.stem, "preset"),
            description=data["description"],
            config={k: v for k, v in data.items() if k != "description"},
        )
        return Preset(info, config)

    def _confined(self, ref: FileRef, cfg: SteeringConfig) -> str:
        """A preset's file reference as an absolute path, checked to lie inside the folder."""
        try:
            path = self.sae_path(ref.ref, cfg) if ref.kind == "sae" else self.confine(cfg.resolve(ref.ref))
        except PresetError as e:
            raise PresetError(f"{ref.where}: {e}") from e
        return str(path)

    def sae_path(self, ref: str, cfg: SteeringConfig) -> Path:
        """The SAE a preset's ``sae`` reference names: a path relative to the preset's folder, confined to it."""
        return self.confine(cfg.resolve(ref))
