"""The file references of a steering config: which fields name files (vectors, SAEs, MLP probes) and where they are.

One walk over a config's references, used by :meth:`steerlib.config.SteeringConfig.refs` and
:meth:`~steerlib.config.SteeringConfig.map_refs`, so that servers, presets, recipes and the vLLM plugin resolve,
confine and rewrite file references the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

RefKind = Literal["vector", "sae", "probe"]


@dataclass(frozen=True)
class FileRef:
    """One file a config names: where (``interventions[0].apply.when.probe``), what kind, and the reference."""

    where: str
    kind: RefKind
    ref: str


def ref_slots(iv: dict[str, Any], where: str) -> list[tuple[str, RefKind, str, tuple[dict[str, Any], str]]]:
    """The file-reference fields of one dumped intervention: (where, kind, reference, (holder, key))."""
    slots: list[tuple[str, RefKind, str, tuple[dict[str, Any], str]]] = []
    when = iv.get("apply", {}).get("when") or {}
    for holder, key, kind, path in (
        (iv, "vector", "vector", where),
        (iv, "sae", "sae", where),
        (when, "vector", "vector", f"{where}.apply.when"),
        (when, "probe", "probe", f"{where}.apply.when"),
        (when, "sae", "sae", f"{where}.apply.when"),
    ):
        if isinstance(holder.get(key), str):
            slots.append((f"{path}.{key}", kind, holder[key], (holder, key)))  # type: ignore[arg-type]
    return slots
