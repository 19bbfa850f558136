"""A request's ``steering`` field: preset names or an inline, data-only config, turned into one SteeringConfig.

Inline configs mirror steerlib's config but every file reference is a *name*: ``{"preset_vector": "refusal"}`` for
a vector (or an inline list of floats), ``"sae": "probe"`` for an SAE and ``when: {"probe": "harm"}`` for an MLP
probe, all looked up in the presets folder.
A client therefore never names a server path. The result is checked against the model with ``build_plan`` (layer
and feature ranges, vector widths, NaN) before the request is queued, so a bad config is a 400, never a 500 and
never an unsteered answer.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from servers.errors import ApiError
from servers.registry import PresetError, PresetRegistry
from steerlib.config import DEFAULT_REFUSAL, FeatureEdit, SteeringConfig, TokenSelector
from steerlib.plan import ModelSpec, SteeringConfigError, TokenizerLike, build_plan

log = logging.getLogger(__name__)

_VALIDATED_CACHE = 256


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PresetVector(_Strict):
    """A vector file of the presets folder, by name: ``vectors/<preset_vector>.safetensors``."""

    preset_vector: str = Field(description="Name of a vector in the presets folder.")


MAX_INLINE_FLOATS = 65536
VectorData = Annotated[
    Annotated[list[float], Field(max_length=MAX_INLINE_FLOATS)] | PresetVector,
    Field(description="Inline floats (the model's width) or a preset vector by name."),
]


class InlineCondition(_Strict):
    """steerlib's ``when`` with names instead of paths."""

    feature: int | None = Field(None, ge=0, description="SAE latent whose activation is tested.")
    sae: str | None = Field(None, description="Preset SAE to read `feature` from, when the op has none.")
    vector: VectorData | None = None
    probe: str | None = Field(
        None, description="Name of an MLP probe in the presets folder (probes/<name>.safetensors)."
    )
    metric: Literal["dot", "cosine"] = "dot"
    above: float | None = None
    below: float | None = None
    scope: Literal["token", "prompt"] = "token"
    aggregate: Literal["last", "mean", "max"] = "last"


class InlineApply(TokenSelector):
    """steerlib's ``apply`` policy with a name-only condition."""

    when: InlineCondition | None = None
    exclude: TokenSelector | None = None


class _InlineBase(_Strict):
    layer: int | list[int] | Literal["all"] = Field(description="Layer index, list of layers, or 'all'.")
    site: str = Field("resid_post", description="resid_pre | resid_post | attn_out | mlp_out | mlp_in")
    apply: InlineApply = Field(default_factory=lambda: InlineApply())


class InlineAdd(_InlineBase):
    op: Literal["add"]
    vector: VectorData
    coefficient: float = 1.0
    relative: bool = False
    norm_match: bool = False


class InlineAblate(_InlineBase):
    op: Literal["ablate"]
    vector: VectorData


class InlineSae(_InlineBase):
    op: Literal["sae"]
    sae: str = Field(description="Name of an SAE in the presets folder.")
    edits: list[FeatureEdit] = Field(default_factory=list, max_length=4096)
    error_term: Literal["keep", "drop"] = "keep"


class InlineReplace(_InlineBase):
    op: Literal["replace"]
    sae: str = Field(description="Name of an SAE in the presets folder.")


class InlineRefuse(_InlineBase):
    """steerlib's detector-gated refusal: a row whose prompt fires ``apply.when`` answers with ``message``."""

    op: Literal["refuse"]
    message: str = Field(DEFAULT_REFUSAL, min_length=1, max_length=2000)
    name: str | None = Field(None, max_length=64, description="Reported in `steering_refusal` when it fires.")
    mode: Literal["message", "prefill"] = "message"


InlineOp = InlineAdd | InlineAblate | InlineSae | InlineReplace | InlineRefuse
InlineIntervention = Annotated[InlineOp, Field(discriminator="op")]


class InlineSteering(_Strict):
    """Presets (applied first, in order) followed by inline interventions."""

    presets: list[str] = Field(default_factory=list, max_length=64, description="Preset names.")
    interventions: list[InlineIntervention] = Field(default_factory=list, max_length=64)


SteeringField = Annotated[list[str], Field(max_length=64)] | InlineSteering


class SteeringResolver:
    """Turns ``steering`` fields into validated configs for one model."""

    def __init__(
        self, registry: PresetRegistry, spec: ModelSpec, tokenizer: TokenizerLike, defaults: list[str]
    ) -> None:
        self.registry, self.spec, self.tokenizer = registry, spec, tokenizer
        for name in defaults:
            registry.get(name)  # an unknown default preset stops the server at start
        self.defaults = list(defaults)
        self._validated: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()  # resolve() runs in worker threads (asyncio.to_thread)

    def resolve(self, field: SteeringField | None) -> SteeringConfig | None:
        """The config a request runs under (None = unsteered); ApiError 400 for anything unusable."""
        try:
            cfg = self._to_config(field)
            if cfg is not None:
                self._validate(cfg)
            return cfg
        except (PresetError, SteeringConfigError, ValidationError, ValueError, OSError) as e:
            raise ApiError(400, f"steering: {_message(e)}", param="steering", code="invalid_steering") from e

    def _to_config(self, field: SteeringField | None) -> SteeringConfig | None:
        inline: list[InlineOp]
        if field is None:
            names, inline = self.defaults, []
        elif isinstance(field, list):
            names, inline = field, []
        else:
            names, inline = field.presets, list(field.interventions)
        ivs: list[Any] = [iv for n in names for iv in self.registry.get(n).interventions]
        ivs += [self._intervention(iv) for iv in inline]
        return SteeringConfig.model_validate({"interventions": ivs}) if ivs else None

    def _intervention(self, iv: InlineOp) -> dict[str, Any]:
        out: dict[str, Any] = iv.model_dump(exclude_none=True)
        if isinstance(iv, InlineAdd | InlineAblate):
            out["vector"] = self._vector(iv.vector)
        elif isinstance(iv, InlineSae | InlineReplace):
            out["sae"] = self.registry.sae(iv.sae)
        when = iv.apply.when
        if when is not None:
            if when.vector is not None:
                out["apply"]["when"]["vector"] = self._vector(when.vector)
            if when.sae is not None:
                out["apply"]["when"]["sae"] = self.registry.sae(when.sae)
            if when.probe is not None:
                out["apply"]["when"]["probe"] = self.registry.probe(when.probe)
        return out

    def _vector(self, v: list[float] | PresetVector) -> list[float] | str:
        return list(v) if isinstance(v, list) else self.registry.vector(v.preset_vector)

    def _validate(self, cfg: SteeringConfig) -> None:
        key = cfg.model_dump_json()
        with self._lock:
            if key in self._validated:
                self._validated.move_to_end(key)
                return
        build_plan([cfg], self.spec, self.tokenizer)
        with self._lock:
            self._validated[key] = None
            if len(self._validated) > _VALIDATED_CACHE:
                self._validated.popitem(last=False)


def _message(e: Exception) -> str:
    if isinstance(e, ValidationError):
        parts = [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()[:5]]
        return "; ".join(parts)
    return str(e).replace("configs[0].", "")  # the request's config is validated as row 0 of a batch
