"""The server's one set of loaded steering resources, shared by validation (worker threads) and the engine.

steerlib's :class:`~steerlib.resources.Resources` loads each vector, SAE and probe file once but is not
thread-safe, and caches every token-match lookup it builds (one vocabulary-sized mask per distinct ``match`` list,
each made by decoding the whole vocabulary). Here loads take a lock (files are the operator's: their number is
bounded by the presets folder), the vocabulary is decoded once into a text -> ids index, and match lookups live in a
small LRU cache, so a client sending new ``match`` lists costs neither memory nor a vocabulary scan each time.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from steerlib.mlp_probe import MlpProbe
from steerlib.plan import Resources, TokenizerLike
from steerlib.sae import Sae
from steerlib.vectors import SteeringVector

MATCH_CACHE = 256


@dataclass
class ServerResources(Resources):
    """Thread-safe :class:`Resources` with bounded token-match lookups."""

    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    _texts: dict[str, list[int]] | None = field(default=None, repr=False)
    _lookups: OrderedDict[tuple[str, ...], Tensor] = field(default_factory=OrderedDict, repr=False)

    def vector(self, path: Path) -> SteeringVector:
        if path in self._vectors:  # loaded: no lock (a dict read is atomic)
            return self._vectors[path]
        with self._lock:
            return super().vector(path)

    def sae(self, path: Path) -> Sae:
        if path in self._saes:
            return self._saes[path]
        with self._lock:
            return super().sae(path)

    def probe(self, path: Path) -> MlpProbe:
        if path in self._probes:
            return self._probes[path]
        with self._lock:
            return super().probe(path)

    def match_lookup(self, strings: Sequence[str], tokenizer: TokenizerLike) -> Tensor:
        """Boolean ``(V,)`` mask of the token ids whose decoded text, stripped, is one of ``strings``."""
        key = tuple(sorted(set(strings)))
        with self._lock:
            if key in self._lookups:
                self._lookups.move_to_end(key)
                return self._lookups[key]
            texts = self._vocab_texts(tokenizer)
            hits = sorted({i for s in key for i in texts.get(s, [])})
            lookup = torch.zeros(len(tokenizer), dtype=torch.bool, device=self.spec.device)
            lookup[torch.tensor(hits, dtype=torch.long, device=self.spec.device)] = True
            self._lookups[key] = lookup
            if len(self._lookups) > MATCH_CACHE:
                self._lookups.popitem(last=False)
            return lookup

    def _vocab_texts(self, tokenizer: TokenizerLike) -> dict[str, list[int]]:
        """Stripped text -> token ids, the whole vocabulary decoded once. Lock held."""
        if self._texts is None:
            texts: dict[str, list[int]] = {}
            for i in range(len(tokenizer)):
                texts.setdefault(str(tokenizer.decode([i])).strip(), []).append(i)
            self._texts = texts
        return self._texts
