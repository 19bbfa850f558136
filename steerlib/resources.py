"""What a plan is resolved against: the model's facts and the files its configs name, each loaded once.

A :class:`ModelSpec` is what a config is checked against (layers, width, device, dtype); :class:`Resources` loads
each vector, SAE and probe file once and puts it on the model's device (several rows, layers or plans may share
one), and builds token-match lookups over a tokenizer's vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from steerlib.mlp_probe import MlpProbe, load_mlp_probe
from steerlib.sae import Sae, load_sae
from steerlib.vectors import SteeringVector, load_vector


class TokenizerLike(Protocol):
    """What token matching needs of a tokenizer (any HF tokenizer qualifies)."""

    def decode(self, token_ids: Any, *args: Any, **kwargs: Any) -> Any: ...

    def __len__(self) -> int: ...


@dataclass(frozen=True)
class ModelSpec:
    """The facts about a model a plan is checked against."""

    n_layers: int
    d_model: int
    device: torch.device
    dtype: torch.dtype
    name: str | None = None


@dataclass
class Resources:
    """Loads each vector / SAE file once (several rows, layers or plans may share one). Not thread-safe."""

    spec: ModelSpec
    _vectors: dict[Path, SteeringVector] = field(default_factory=dict)
    _saes: dict[Path, Sae] = field(default_factory=dict)
    _probes: dict[Path, MlpProbe] = field(default_factory=dict)
    _match: dict[tuple[str, ...], Tensor] = field(default_factory=dict)

    def vector(self, path: Path) -> SteeringVector:
        if path not in self._vectors:
            self._vectors[path] = load_vector(path)
        return self._vectors[path]

    def sae(self, path: Path) -> Sae:
        if path not in self._saes:
            sae = load_sae(path)
            # an SAE stored in a narrower dtype (a bf16 release) runs at the model's precision; never narrowed
            wide = torch.promote_types(next(sae.parameters()).dtype, self.spec.dtype)
            self._saes[path] = sae.to(device=self.spec.device, dtype=wide).eval()
        return self._saes[path]

    def probe(self, path: Path) -> MlpProbe:
        if path not in self._probes:
            self._probes[path] = load_mlp_probe(path).to(self.spec.device)
        return self._probes[path]

    def match_lookup(self, strings: Sequence[str], tokenizer: TokenizerLike) -> Tensor:
        key = tuple(sorted(strings))
        if key not in self._match:
            wanted = set(strings)
            hits = [i for i in range(len(tokenizer)) if str(tokenizer.decode([i])).strip() in wanted]
            lookup = torch.zeros(len(tokenizer), dtype=torch.bool, device=self.spec.device)
            lookup[torch.tensor(hits, dtype=torch.long, device=self.spec.device)] = True
            self._match[key] = lookup
        return self._match[key]


def spec_of(model: Any, n_layers: int, d_model: int) -> ModelSpec:
    """A :class:`ModelSpec` from a torch module's first parameter."""
    p = next(model.parameters())
    return ModelSpec(
        n_layers, d_model, p.device, p.dtype, getattr(getattr(model, "config", None), "name_or_path", None)
    )
