"""A request's ``steering`` field: preset names or an inline, data-only config, turned into one SteeringConfig.

Inline interventions are steerlib's own models (:mod:`steerlib.config`: one schema for the plugin, the presets and
the server) whose file references are *names* looked up in the presets folder: a vector is a list of floats, a name
or ``{"preset_vector": NAME}`` (``vectors/NAME.safetensors``), an SAE a name (``saes/NAME``, or a feature index),
an MLP probe a name (``probes/NAME.safetensors``). The names are mapped to files by
:meth:`SteeringConfig.map_refs`, the one walk over a config's references, so a client never names a server path.
The result is checked against the model with ``build_plan`` (layer and feature ranges, vector widths, NaN) before
the request is queued, so a bad config is a 400, never a 500 and never an unsteered answer.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator

from servers.errors import ApiError
from servers.limits import RequestLimits, check_cost, check_inline
from servers.registry import PresetError, PresetRegistry
from steerlib.config import FileRef, Intervention, SteeringConfig
from steerlib.plan import ModelSpec, Resources, SteeringConfigError, TokenizerLike, build_plan

log = logging.getLogger(__name__)

VALIDATED_CACHE = 1024
"""Configs remembered as valid, by a 32-byte digest (so the cache's size does not grow with the configs')."""
MAX_INLINE_FLOATS = 65536
MAX_EDITS = 4096
MAX_MESSAGE_CHARS, MAX_NAME_CHARS = 2000, 64
MAX_INTERVENTIONS = 64


class InlineSteering(BaseModel):
    """Presets (applied first, in order) followed by inline interventions (steerlib's, with names for files)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    presets: list[str] = Field(default_factory=list, max_length=MAX_INTERVENTIONS, description="Preset names.")
    interventions: list[Intervention] = Field(
        default_factory=list,
        max_length=MAX_INTERVENTIONS,
        description="steerlib interventions; vectors as floats, a name or {preset_vector: NAME}; SAEs and probes "
        "by name.",
    )

    @model_validator(mode="before")
    @classmethod
    def _preset_vectors(cls, data: Any) -> Any:
        """``{"preset_vector": NAME}`` (the server's original spelling) is the name NAME."""
        if not isinstance(data, dict) or not isinstance(data.get("interventions"), list):
            return data
        return {**data, "interventions": [_named_vectors(iv) for iv in data["interventions"]]}

    @model_validator(mode="after")
    def _sizes(self) -> InlineSteering:
        for i, iv in enumerate(self.interventions):
            _check_sizes(iv, f"interventions[{i}]")
        return self


def _named_vectors(iv: Any) -> Any:
    if not isinstance(iv, dict):
        return iv
    out = {**iv, "vector": _name_of(iv["vector"])} if "vector" in iv else dict(iv)
    apply = out.get("apply")
    if isinstance(apply, dict) and isinstance(apply.get("when"), dict) and "vector" in apply["when"]:
        out["apply"] = {**apply, "when": {**apply["when"], "vector": _name_of(apply["when"]["vector"])}}
    return out


def _name_of(v: Any) -> Any:
    if isinstance(v, dict) and set(v) == {"preset_vector"}:
        return v["preset_vector"]
    return v


def _check_sizes(iv: Any, where: str) -> None:
    """Sizes a client may send (a request must not cost the server more than these)."""
    for field, v in (("vector", getattr(iv, "vector", None)), ("apply.when.vector", _when_vector(iv))):
        if isinstance(v, list) and len(v) > MAX_INLINE_FLOATS:
            raise ValueError(f"{where}.{field}: {len(v)} floats; at most {MAX_INLINE_FLOATS}")
    edits = getattr(iv, "edits", None)
    if edits is not None and len(edits) > MAX_EDITS:
        raise ValueError(f"{where}.edits: {len(edits)} edits; at most {MAX_EDITS}")
    for field, limit in (("message", MAX_MESSAGE_CHARS), ("name", MAX_NAME_CHARS)):
        text = getattr(iv, field, None)
        if isinstance(text, str) and len(text) > limit:
            raise ValueError(f"{where}.{field}: {len(text)} characters; at most {limit}")


def _when_vector(iv: Any) -> Any:
    when = iv.apply.when
    return None if when is None else when.vector


def _steering_kind(v: Any) -> str | None:
    if isinstance(v, list):
        return "names"
    return "inline" if isinstance(v, dict | InlineSteering) else None


SteeringField = Annotated[
    Annotated[list[str], Field(max_length=MAX_INTERVENTIONS), Tag("names")] | Annotated[InlineSteering, Tag("inline")],
    Discriminator(
        _steering_kind,
        custom_error_type="steering_type",
        custom_error_message="steering must be a list of preset names or an object {presets, interventions}",
    ),
]


@dataclass(frozen=True)
class Resolved:
    """What a request runs under: its config (None = unsteered) and, for each of its interventions, where it came
    from (``preset:NAME`` or ``inline``)."""

    config: SteeringConfig | None
    presets: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()
    cost: int = 0
    """What a batch pays per step for it (:func:`servers.limits.cost`)."""


class SteeringResolver:
    """Turns ``steering`` fields into validated configs for one model."""

    def __init__(
        self,
        registry: PresetRegistry,
        spec: ModelSpec,
        tokenizer: TokenizerLike,
        defaults: list[str],
        limits: RequestLimits | None = None,
        resources: Resources | None = None,
    ) -> None:
        self.registry, self.spec, self.tokenizer = registry, spec, tokenizer
        self.limits = limits if limits is not None else RequestLimits()
        self.resources = resources
        for name in defaults:
            registry.get(name)  # an unknown default preset stops the server at start
        self.defaults = list(defaults)
        self._validated: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()  # resolve() runs in worker threads (asyncio.to_thread)

    def resolve(self, field: SteeringField | None) -> SteeringConfig | None:
        """The config a request runs under (None = unsteered); ApiError 400 for anything unusable."""
        return self.resolve_all(field).config

    def resolve_all(self, field: SteeringField | None) -> Resolved:
        """:meth:`resolve` with where each intervention came from."""
        try:
            resolved = self._to_config(field)
            if resolved.config is not None:
                self._validate(resolved.config)
            return resolved
        except (PresetError, SteeringConfigError, ValidationError, ValueError, OSError) as e:
            raise ApiError(400, f"steering: {_message(e)}", param="steering", code="invalid_steering") from e

    def names(self, field: SteeringField | None) -> list[str]:
        """The presets ``field`` applies (the defaults when it is absent)."""
        if field is None:
            return list(self.defaults)
        return list(field) if isinstance(field, list) else list(field.presets)

    def _to_config(self, field: SteeringField | None) -> Resolved:
        names = self.names(field)
        inline = list(field.interventions) if isinstance(field, InlineSteering) else []
        ivs: list[Intervention] = []
        sources: list[str] = []
        for name in names:
            preset = self.registry.get(name).interventions
            ivs += preset
            sources += [f"preset:{name}"] * len(preset)
        if inline:
            check_inline(inline, self.limits, self.spec.n_layers)
            ivs += SteeringConfig(interventions=inline).map_refs(self._named_file).interventions
            sources += ["inline"] * len(inline)
        config = SteeringConfig(interventions=ivs) if ivs else None
        cost = check_cost(config, self.spec.n_layers, self.limits)
        return Resolved(config, tuple(names), tuple(sources), cost)

    def _named_file(self, ref: FileRef) -> str:
        """The file a name in an inline config stands for, inside the presets folder."""
        try:
            if ref.kind == "vector":
                return self.registry.vector(ref.ref)
            if ref.kind == "probe":
                return self.registry.probe(ref.ref)
            return self.registry.sae(ref.ref)
        except PresetError as e:
            raise PresetError(f"{ref.where}: {e}") from e

    def _validate(self, cfg: SteeringConfig) -> None:
        key = hashlib.sha256(cfg.model_dump_json(exclude={"description"}).encode()).digest()
        with self._lock:
            if key in self._validated:
                self._validated.move_to_end(key)
                return
        build_plan([cfg], self.spec, self.tokenizer, self.resources)
        with self._lock:
            self._validated[key] = None
            if len(self._validated) > VALIDATED_CACHE:
                self._validated.popitem(last=False)


def _message(e: Exception) -> str:
    if isinstance(e, ValidationError):
        parts = [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()[:5]]
        return "; ".join(parts)
    return str(e).replace("configs[0].", "")  # the request's config is validated as row 0 of a batch
