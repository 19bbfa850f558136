"""The steering config: what users write (YAML / JSON / Python) to say which interventions run where.

Every model here rejects unknown fields, so a typo is an error rather than a silently unsteered run. A config is pure
data: file references (vectors, SAEs) are resolved relative to the config file by :meth:`SteeringConfig.from_file` and
loaded only when the config is attached to a model (see ``steerlib.plan``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, FiniteFloat, field_validator, model_validator

from steerlib.config_refs import FileRef, ref_slots
from steerlib.sites import SITES, parse_site

TokenScope = Literal["all", "prompt", "generated"]

FloatList = list[float]

MAX_TOKEN_INDEX = 2**31 - 1
"""Largest ``positions`` / ``window`` / ``last`` value (and the most negative position is its negation).

Bounds, not semantics: a value is compared with int32 or int64 position tensors on every step, and one beyond int64
(or beyond int32 where a backend keeps positions that way) raises, or silently wraps, inside the forward pass of a
whole batch. 2**31 - 1 tokens is longer than any context; servers set stricter limits of their own."""
MAX_MAGNITUDE = 1e12
"""Largest ``|coefficient|``, ``|edit value|`` and ``|inline vector entry|``.

Bounds, not semantics: one such value times an activation (|x| up to ~1e3), squared and summed over the model's
width (norms, RMSNorm, ``relative``, ``norm_match``) stays inside float32: (1e12 * 1e3)^2 * 1e5 dims = 1e35 < 3.4e38.
Values beyond it can only turn activations into inf/NaN; extremes combined (a 1e12 coefficient on a vector of 1e12
entries, fp16 models past 65504) still can, which a server catches per row. Servers cap lower (``max_coefficient``,
``max_edit_value``)."""
MAX_LAYERS_PER_INTERVENTION = 1024
"""Longest ``layer`` list: deeper than any model (a longer list can only repeat layers, each repeat a full op)."""
BoundedInt = Annotated[int, Field(ge=-MAX_TOKEN_INDEX, le=MAX_TOKEN_INDEX)]
ScaleFloat = Annotated[FiniteFloat, Field(ge=-MAX_MAGNITUDE, le=MAX_MAGNITUDE)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_finite(values: FloatList | None, field: str) -> None:
    if values is None:
        return
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise ValueError(f"{field} must be finite: entries {bad[:5]} are NaN or inf")
    big = [i for i, v in enumerate(values) if abs(v) > MAX_MAGNITUDE]
    if big:
        raise ValueError(f"{field}: entries {big[:5]} exceed {MAX_MAGNITUDE:g} in magnitude")


def _finite_vector(v: str | FloatList) -> str | FloatList:
    _check_finite(v if isinstance(v, list) else None, "vector")
    return v


VectorRef = Annotated[
    str | FloatList,
    AfterValidator(_finite_vector),
    Field(
        description="A path to a .safetensors vector file (relative to the config file) or an inline list of floats."
    ),
]


class TokenSelector(_Strict):
    """Which tokens of each row an intervention touches. Every given criterion must hold (they intersect)."""

    tokens: TokenScope = Field(
        "all",
        description="all | prompt | generated. 'generated' tokens are those fed back during generation, so the "
        "first new token (predicted from the last prompt token) is never steered by a generated-only policy.",
    )
    positions: list[BoundedInt] | None = Field(
        None,
        description="Explicit token positions (0 = first non-padding token of the row); negative values count "
        "back from the end of the prompt (-1 = last prompt token).",
    )
    window: tuple[int, int | None] | None = Field(
        None, description="[start, end) of positions (0-based, end exclusive, null = open ended)."
    )
    last: int | None = Field(None, ge=1, le=MAX_TOKEN_INDEX, description="Only the last n tokens of the prompt.")
    match: list[str] | None = Field(
        None,
        description="Only tokens whose text (decoded, surrounding whitespace stripped) equals one of these strings. "
        "Needs a tokenizer passed to steer()/attach().",
    )

    @model_validator(mode="after")
    def _window_order(self) -> TokenSelector:
        if self.window is not None:
            start, end = self.window
            if start < 0 or (end is not None and end <= start):
                raise ValueError(f"window must be [start, end) with 0 <= start < end, got {list(self.window)}")
            if max(start, end or 0) > MAX_TOKEN_INDEX:
                raise ValueError(f"window {list(self.window)}: positions are at most {MAX_TOKEN_INDEX}")
        if self.match is not None and not self.match:
            raise ValueError("match must list at least one token string")
        return self


class Condition(_Strict):
    """Apply only where a feature or probe fires (conditional activation steering, Lee et al., arXiv 2409.05907).

    Give ``feature`` (an SAE latent: of this intervention's SAE, or of ``sae``), ``vector`` (a linear probe
    direction) or ``probe`` (an MLP probe file, :mod:`steerlib.mlp_probe`). The activation read is the one entering
    this intervention's site, before any edit.
    """

    feature: int | None = Field(None, ge=0, description="SAE latent index whose activation is tested.")
    sae: str | None = Field(None, description="SAE to read `feature` from, when the op itself has none.")
    vector: VectorRef | None = Field(None, description="A probe direction: the score is x·v (or cosine, see metric).")
    probe: str | None = Field(
        None,
        description="A path to an MLP probe file (relative to the config file; see steerlib.mlp_probe). With "
        "scope=prompt and aggregate=mean it scores the prompt's mean activation.",
    )
    metric: Literal["dot", "cosine"] = Field("dot", description="Score of `vector`: dot product or cosine similarity.")
    above: float | None = Field(None, description="Fires where score > above.")
    below: float | None = Field(None, description="Fires where score < below.")
    scope: Literal["token", "prompt"] = Field(
        "token",
        description="token: tested on every token. prompt: tested once on the prompt (see aggregate) and the "
        "verdict holds for the whole row, generated tokens included.",
    )
    aggregate: Literal["last", "mean", "max", "window_max"] = Field(
        "last",
        description="With scope=prompt: score of the last prompt token, or mean / max over the prompt; window_max: "
        "the highest score of the mean activation over any `window` consecutive prompt tokens (finds a short span "
        "inside a long prompt, e.g. a request wrapped in a template).",
    )
    window: int | None = Field(None, ge=2, le=4096, description="Tokens per window, with aggregate=window_max.")

    @model_validator(mode="after")
    def _one_source(self) -> Condition:
        given = [k for k in ("feature", "vector", "probe") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "when: give exactly one of 'feature' (an SAE latent), 'vector' (a linear probe) or 'probe' "
                f"(an MLP probe file); got {given or 'none'}"
            )
        if self.sae is not None and self.feature is None:
            raise ValueError("when.sae is only meaningful with when.feature")
        if self.metric != "dot" and self.vector is None:
            raise ValueError(f"when.metric {self.metric!r} is only meaningful with when.vector")
        if self.above is None and self.below is None:
            raise ValueError("when: give a threshold, 'above' and/or 'below'")
        if (self.aggregate == "window_max") != (self.window is not None):
            raise ValueError("when.window is needed with aggregate window_max, and only with it")
        if self.aggregate == "window_max" and self.scope != "prompt":
            raise ValueError("when.aggregate window_max reads the prompt: set scope to 'prompt'")
        for name, v in (("above", self.above), ("below", self.below)):
            if v is not None and not math.isfinite(v):
                raise ValueError(f"when.{name} must be finite, got {v}")
        return self


class ApplyPolicy(TokenSelector):
    """Token selection plus an optional condition and exclusions (exclusions win over inclusions)."""

    when: Condition | None = Field(None, description="Apply only where this feature or probe fires.")
    exclude: TokenSelector | None = Field(None, description="Tokens matching this selector are never touched.")


class _InterventionBase(_Strict):
    layer: int | list[int] | Literal["all"] = Field(description="Layer index (0-based), a list of layers, or 'all'.")
    site: str = Field(
        "resid_post",
        description=f"One of {', '.join(SITES)}, or a TransformerLens name such as blocks.15.hook_resid_post "
        "(then its layer must agree with `layer`).",
    )
    apply: ApplyPolicy = Field(default_factory=ApplyPolicy, description="Which tokens to touch.")

    @model_validator(mode="before")
    @classmethod
    def _tl_site(cls, data: Any) -> Any:
        # A TransformerLens name carries the layer; accept it alone or with a matching `layer`.
        if isinstance(data, dict) and isinstance(data.get("site"), str):
            layer, site = parse_site(data["site"])
            if layer is not None:
                if "layer" in data and data["layer"] != layer:
                    raise ValueError(f"site {data['site']!r} names layer {layer} but layer is {data['layer']!r}")
                data = {**data, "layer": layer, "site": site}
        return data

    @field_validator("site")
    @classmethod
    def _known_site(cls, v: str | None) -> str | None:
        if v is not None and v not in SITES:
            raise ValueError(f"unknown site {v!r}; allowed: {', '.join(SITES)}")
        return v

    @field_validator("layer")
    @classmethod
    def _layer_nonneg(cls, v: int | list[int] | str | None) -> int | list[int] | str | None:
        layers = [v] if isinstance(v, int) else v if isinstance(v, list) else []
        if any(layer < 0 for layer in layers):
            raise ValueError(f"layer must be >= 0, got {v}")
        if isinstance(v, list) and not v:
            raise ValueError("layer list must not be empty")
        if isinstance(v, list) and len(v) > MAX_LAYERS_PER_INTERVENTION:
            raise ValueError(f"layer list has {len(v)} entries; at most {MAX_LAYERS_PER_INTERVENTION}")
        return v


class AddOp(_InterventionBase):
    """Add ``coefficient * vector`` to the activation."""

    op: Literal["add"]
    vector: VectorRef
    coefficient: ScaleFloat = Field(1.0, description=f"Multiplier of the vector (|c| <= {MAX_MAGNITUDE:g}).")
    relative: bool = Field(
        False,
        description="If true the vector is unit-normalised and scaled by coefficient * ||x|| per token, so the "
        "strength is relative to the activation norm (which grows with depth).",
    )
    norm_match: bool = Field(
        False, description="If true the steered activation is rescaled to the norm the activation had before."
    )


class AblateOp(_InterventionBase):
    """Project a direction (or the span of several) out of the activation."""

    op: Literal["ablate"]
    vector: VectorRef


class FeatureEdit(_Strict):
    """One SAE latent edit."""

    feature: int = Field(ge=0, description="Latent index.")
    mode: Literal["set", "scale", "add"] = Field(description="set: z=value; scale: z*=value; add: z+=value.")
    value: ScaleFloat = Field(description=f"The edit's operand (|value| <= {MAX_MAGNITUDE:g}).")


class _SaeSited(_InterventionBase):
    """An op that runs an SAE: by default where the SAE was trained (its metadata's layer and site)."""

    layer: int | list[int] | Literal["all"] | None = Field(  # type: ignore[assignment]
        None, description="Layer index, list or 'all'; null = the layer the SAE was trained at (its cfg's hook)."
    )
    site: str | None = Field(  # type: ignore[assignment]
        None, description=f"One of {', '.join(SITES)}; null = the site the SAE was trained at."
    )
    any_site: bool = Field(
        False,
        description="Allow a layer or site other than the SAE's own (an SAE is checked against where it was trained).",
    )


class SaeOp(_SaeSited):
    """Encode with an SAE (or transcoder), edit latents, decode back."""

    op: Literal["sae"]
    sae: str = Field(description="SAE folder or file (any supported format), relative to the config file.")
    edits: list[FeatureEdit] = Field(default_factory=list)
    error_term: Literal["keep", "drop"] = Field(
        "keep",
        description="keep: output = x + decode(edited) - decode(original), so the SAE's error is preserved; "
        "drop: output = decode(edited).",
    )


class ReplaceOp(_SaeSited):
    """Replace the activation with the SAE's (or transcoder's) reconstruction, for reconstruction-loss studies."""

    op: Literal["replace"]
    sae: str = Field(description="SAE folder or file, relative to the config file.")


DEFAULT_REFUSAL = "I'm sorry, but I can't help with that request."


class RefuseOp(_InterventionBase):
    """Detector-gated refusal: when ``apply.when`` fires on a row's prompt, that row answers with ``message``.

    The activation is left as it is; the verdict is read once per row from the prompt (``when.scope`` must be
    ``prompt``) and generation for a flagged row is replaced by the fixed message, or in ``prefill`` mode starts with
    it (see ``steerlib.hf.refusal``).
    """

    op: Literal["refuse"]
    message: str = Field(DEFAULT_REFUSAL, min_length=1, description="The reply given instead of generating.")
    name: str | None = Field(None, description="Name reported when this detector fires (default: its position).")
    mode: Literal["message", "prefill"] = Field(
        "message",
        description="message: a flagged row answers with exactly `message`, then end-of-turn. prefill: a flagged row "
        "is forced to start its reply with `message` (no end-of-turn) and the model, still steered by the other ops, "
        "writes the rest.",
    )

    @model_validator(mode="after")
    def _needs_prompt_condition(self) -> RefuseOp:
        if self.apply.when is None:
            raise ValueError("op refuse needs apply.when: the condition (probe vector or SAE feature) that triggers it")
        if self.apply.when.scope != "prompt":
            raise ValueError("op refuse decides once per prompt: set apply.when.scope to 'prompt'")
        return self


Intervention = Annotated[AddOp | AblateOp | SaeOp | ReplaceOp | RefuseOp, Field(discriminator="op")]


class SteeringConfig(_Strict):
    """A list of interventions, applied in order at each site. A preset (``servers/presets/*.yaml``) is a config with
    a ``description``: it loads everywhere a config does.

    Written in YAML or JSON (:meth:`from_file`) or as a dict; a misspelt field is an error, and file references
    resolve against the config's folder:

    >>> from steerlib import SteeringConfig
    >>> cfg = SteeringConfig.from_dict(
    ...     {"interventions": [{"op": "add", "layer": 15, "vector": "vectors/refusal.safetensors", "coefficient": 4}]},
    ...     base_dir="/presets",
    ... )
    >>> add = cfg.interventions[0]
    >>> add.op, add.site, add.coefficient, add.apply.tokens
    ('add', 'resid_post', 4.0, 'all')
    >>> cfg.resolve(add.vector).as_posix()
    '/presets/vectors/refusal.safetensors'
    >>> SteeringConfig.from_dict({"interventions": [{"op": "add", "layer": 15, "vectr": [1.0]}]})
    ... # doctest: +ELLIPSIS
    Traceback (most recent call last):
    pydantic_core._pydantic_core.ValidationError: ...
    interventions.0.add.vectr
      Extra inputs are not permitted ...
    """

    description: str | None = Field(None, description="What the config does (presets say what it was measured on).")
    interventions: list[Intervention] = Field(default_factory=list)
    base_dir: Path | None = Field(
        None,
        exclude=True,
        description="Folder that relative file references resolve against (set by from_file).",
    )

    @classmethod
    def from_file(cls, path: str | Path) -> SteeringConfig:
        """Load a YAML (.yaml/.yml) or JSON file; relative paths inside resolve against its folder."""
        path = Path(path)
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a steering config must be a mapping with 'interventions', got {type(data)}")
        return cls.model_validate({**data, "base_dir": path.resolve().parent})

    @classmethod
    def from_dict(cls, data: dict[str, Any], base_dir: str | Path | None = None) -> SteeringConfig:
        return cls.model_validate({**data, "base_dir": Path(base_dir) if base_dir is not None else None})

    def resolve(self, ref: str) -> Path:
        """A file reference made absolute against the config's folder."""
        p = Path(ref).expanduser()
        if p.is_absolute() or self.base_dir is None:
            return p
        return self.base_dir / p

    def refs(self) -> list[FileRef]:
        """Every file reference of the config (inline vectors are not files), in config order."""
        out: list[FileRef] = []
        for i, iv in enumerate(self.model_dump(mode="json", exclude_none=True)["interventions"]):
            out += [FileRef(where, kind, ref) for where, kind, ref, _ in ref_slots(iv, f"interventions[{i}]")]
        return out

    def map_refs(self, fn: Callable[[FileRef], str]) -> SteeringConfig:
        """A copy whose every file reference is replaced by ``fn(ref)`` (to resolve names, confine, make portable).

        The one walk over a config's references: servers, presets and recipes map references through it."""
        data = self.model_dump(mode="json", exclude_none=True)
        for i, iv in enumerate(data["interventions"]):
            for where, kind, ref, (holder, key) in ref_slots(iv, f"interventions[{i}]"):
                holder[key] = fn(FileRef(where, kind, ref))
        return SteeringConfig.from_dict(data, base_dir=self.base_dir)
