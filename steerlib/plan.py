"""Resolve steering configs against a model into a plan: loaded tensors and ops, grouped by (layer, site).

Everything that can be wrong with a config (a layer out of range, a vector of the wrong width, NaN in a file, a
feature index past the SAE's width, a missing file) is found here, before any hook is installed, and reported with
the field's path and the allowed values. The config itself is never mutated.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from steerlib.config import (
    AblateOp,
    AddOp,
    ApplyPolicy,
    Condition,
    Intervention,
    RefuseOp,
    ReplaceOp,
    SaeOp,
    SteeringConfig,
    TokenSelector,
)
from steerlib.mlp_probe import MlpProbe, load_mlp_probe
from steerlib.ops import AblateDirections, AddVector, SaeEdit, SaeReplace, orthonormal_rows
from steerlib.policy import Gate, LatentCache, Policy, Selector
from steerlib.refusal import Detector
from steerlib.run_state import RunState
from steerlib.sae import Sae, load_sae
from steerlib.vectors import SteeringVector, as_tensor, load_vector

log = logging.getLogger(__name__)

Op = Callable[[Tensor, LatentCache, Tensor], Tensor]


class SteeringConfigError(ValueError):
    """A config that cannot be applied to this model; the message names the field and what is allowed."""


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


@dataclass(frozen=True)
class BoundOp:
    """One intervention at one layer, ready to run."""

    where: str
    """The config field it came from, for error messages (``interventions[2]``)."""
    layer: int
    site: str
    op: Op | None
    """None for a ``refuse`` op: it only reads (its gate decides; see ``Plan.detectors``)."""
    policy: Policy
    reads_mlp_in: bool = False
    """True for transcoders: the SAE input is the MLP's input, the op writes the MLP's output."""
    order: int = 0
    """Position of the intervention in the config (per-row configs: in the order they were resolved)."""


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


@dataclass(frozen=True)
class Plan:
    """Bound ops by (layer, site), in config order within each site, and the ``refuse`` detectors in config order.

    Immutable: what happens while it runs (gate verdicts) lives in a :class:`~steerlib.run_state.RunState`."""

    ops: dict[tuple[int, str], tuple[BoundOp, ...]]
    spec: ModelSpec
    detectors: tuple[Detector, ...] = ()

    @property
    def sites(self) -> list[tuple[int, str]]:
        return sorted(self.ops)

    def new_state(self) -> RunState:
        """Empty run state for this plan (one per handle or engine group of requests)."""
        return RunState(self.spec.d_model, self.spec.device)


def build_plan(
    configs: SteeringConfig | Sequence[SteeringConfig | None],
    spec: ModelSpec,
    tokenizer: TokenizerLike | None = None,
    resources: Resources | None = None,
) -> Plan:
    """Resolve one config (every row) or one config per row (None = that row unsteered).

    ``resources`` lets a long-lived caller (a server) load each vector and SAE file once across many plans.
    """
    res = resources if resources is not None else Resources(spec)
    if res.spec != spec:
        raise ValueError(f"resources were made for {res.spec}, not for this model ({spec})")
    grouped: dict[tuple[int, str], list[BoundOp]] = {}
    detectors: list[Detector] = []
    if isinstance(configs, SteeringConfig):
        jobs: Sequence[tuple[SteeringConfig, tuple[bool, ...] | None, str]] = [(configs, None, "")]
    else:
        jobs = _per_row_jobs(configs)
    order = 0
    for cfg, rows, prefix in jobs:
        for i, iv in enumerate(cfg.interventions):
            where = f"{prefix}interventions[{i}]"
            for bound in _bind(iv, cfg, where, rows, res, tokenizer):
                grouped.setdefault((bound.layer, bound.site), []).append(replace(bound, order=order))
                if isinstance(iv, RefuseOp):
                    detectors.append(Detector(order, iv.name or where, iv.message, iv.mode, rows))
                order += 1
    return Plan({k: tuple(v) for k, v in grouped.items()}, spec, tuple(detectors))


def _per_row_jobs(
    configs: Sequence[SteeringConfig | None],
) -> list[tuple[SteeringConfig, tuple[bool, ...], str]]:
    """Rows with equal configs share ops (applied once with a row mask)."""
    groups: dict[str, tuple[SteeringConfig, list[int]]] = {}
    for r, cfg in enumerate(configs):
        if cfg is None:
            continue
        if not isinstance(cfg, SteeringConfig):
            raise SteeringConfigError(f"configs[{r}] must be a SteeringConfig or None, got {type(cfg).__name__}")
        key = f"{cfg.base_dir}|{cfg.model_dump_json(exclude={'description'})}"
        groups.setdefault(key, (cfg, []))[1].append(r)
    n = len(configs)
    return [(cfg, tuple(r in rows for r in range(n)), f"configs[{rows[0]}].") for cfg, rows in groups.values()]


def _layers(iv: Intervention, spec: ModelSpec, where: str) -> list[int]:
    if iv.layer == "all":
        return list(range(spec.n_layers))
    layers = [iv.layer] if isinstance(iv.layer, int) else list(iv.layer)
    for layer in layers:
        if layer >= spec.n_layers:
            raise SteeringConfigError(
                f"{where}.layer: {layer} out of range: model has {spec.n_layers} layers (0..{spec.n_layers - 1})"
            )
    return layers


def _bind(
    iv: Intervention,
    cfg: SteeringConfig,
    where: str,
    rows: tuple[bool, ...] | None,
    res: Resources,
    tokenizer: TokenizerLike | None,
) -> list[BoundOp]:
    spec = res.spec
    out = []
    for layer in _layers(iv, spec, where):
        sae = _load_sae(cfg, iv.sae, res, f"{where}.sae") if isinstance(iv, SaeOp | ReplaceOp) else None
        reads_mlp_in = sae is not None and _is_mlp_transcoder(sae)
        if sae is not None:
            _check_sae(sae, iv, spec, where, reads_mlp_in)
        op = _make_op(iv, cfg, layer, sae, res, where)
        policy = _policy(iv.apply, cfg, layer, sae, rows, res, tokenizer, f"{where}.apply")
        out.append(BoundOp(where, layer, iv.site, op, policy, reads_mlp_in))
    return out


def _existing(cfg: SteeringConfig, ref: str, where: str) -> Path:
    path = cfg.resolve(ref)
    if not path.exists():
        raise SteeringConfigError(f"{where}: file or folder not found: {path}")
    return path


def _load_sae(cfg: SteeringConfig, ref: str, res: Resources, where: str) -> Sae:
    path = _existing(cfg, ref, where)
    try:
        return res.sae(path)
    except (OSError, ValueError, KeyError) as e:
        raise SteeringConfigError(f"{where}: cannot load the SAE at {path}: {e}") from e


def _vector(ref: str | list[float], cfg: SteeringConfig, layer: int, res: Resources, where: str) -> Tensor:
    if isinstance(ref, list):
        v = as_tensor(ref)
    else:
        try:
            v = res.vector(_existing(cfg, ref, where)).for_layer(layer, where=where)
        except (OSError, ValueError) as e:
            raise SteeringConfigError(f"{where}: {e}") from e
    if v.shape[-1] != res.spec.d_model or v.dim() not in (1, 2):
        raise SteeringConfigError(
            f"{where}: vector has shape {tuple(v.shape)}; the model's width is {res.spec.d_model}, "
            f"so expected ({res.spec.d_model},)"
        )
    v = v.detach().to(device="cpu", dtype=torch.float32)  # checked on the host, moved by the caller once checked
    if not bool(torch.isfinite(v).all()):
        raise SteeringConfigError(f"{where}: vector contains NaN or inf")
    return v


def _make_op(
    iv: Intervention, cfg: SteeringConfig, layer: int, sae: Sae | None, res: Resources, where: str
) -> Op | None:
    if isinstance(iv, AddOp):
        v = _vector(iv.vector, cfg, layer, res, f"{where}.vector")
        if v.dim() != 1:
            raise SteeringConfigError(f"{where}.vector: op add needs one vector, got shape {tuple(v.shape)}")
        if iv.relative and float(v.norm()) == 0.0:
            raise SteeringConfigError(f"{where}.vector: relative addition needs a non-zero vector")
        return AddVector(v.to(res.spec.device), iv.coefficient, iv.relative, iv.norm_match)
    if isinstance(iv, AblateOp):
        v = _vector(iv.vector, cfg, layer, res, f"{where}.vector")
        v = v[None] if v.dim() == 1 else v
        if bool((v.norm(dim=-1) == 0).any()):
            raise SteeringConfigError(f"{where}.vector: cannot ablate a zero direction")
        return AblateDirections(orthonormal_rows(v).to(res.spec.device))
    if isinstance(iv, RefuseOp):
        return None  # reads only: its gate's verdicts are the plan's detectors'
    assert sae is not None
    if isinstance(iv, SaeOp):
        for j, e in enumerate(iv.edits):
            _check_feature(e.feature, sae, f"{where}.edits[{j}].feature")
        return SaeEdit(
            sae,
            tuple(e.feature for e in iv.edits),
            tuple(e.mode for e in iv.edits),
            tuple(e.value for e in iv.edits),
            keep_error=iv.error_term == "keep",
        )
    return SaeReplace(sae)


def _check_feature(feature: int, sae: Sae, where: str) -> None:
    if feature >= sae.d_sae:
        raise SteeringConfigError(
            f"{where}: {feature} out of range: the SAE has {sae.d_sae} latents (0..{sae.d_sae - 1})"
        )


def _is_mlp_transcoder(sae: Sae) -> bool:
    ins, outs = sae.meta.input_site or "", sae.meta.output_site or ""
    return ins.endswith("mlp_in") and outs.endswith("mlp_out")


def _check_sae(sae: Sae, iv: Intervention, spec: ModelSpec, where: str, reads_mlp_in: bool) -> None:
    if sae.d_in != spec.d_model or sae.d_out != spec.d_model:
        raise SteeringConfigError(
            f"{where}.sae: SAE maps width {sae.d_in} -> {sae.d_out} but the model's width is {spec.d_model}"
        )
    if reads_mlp_in and iv.site != "mlp_out":
        raise SteeringConfigError(
            f"{where}.site: this SAE is a transcoder (reads mlp_in, writes mlp_out); set site: mlp_out, got {iv.site}"
        )
    if sae.is_transcoder and not reads_mlp_in:
        raise SteeringConfigError(
            f"{where}.sae: transcoder from {sae.meta.input_site} to {sae.meta.output_site} is not supported; "
            "supported transcoders read mlp_in and write mlp_out"
        )


def resolve_selector(sel: TokenSelector, res: Resources, tokenizer: TokenizerLike | None, where: str) -> Selector:
    lookup = None
    if sel.match is not None:
        if tokenizer is None:
            raise SteeringConfigError(f"{where}.match: token matching needs a tokenizer; pass tokenizer= to steer()")
        lookup = res.match_lookup(sel.match, tokenizer)
    return Selector(
        tokens=sel.tokens,
        positions=None if sel.positions is None else tuple(sel.positions),
        window=sel.window,
        last=sel.last,
        match_V=lookup,
    )


def _policy(
    ap: ApplyPolicy,
    cfg: SteeringConfig,
    layer: int,
    sae: Sae | None,
    rows: tuple[bool, ...] | None,
    res: Resources,
    tokenizer: TokenizerLike | None,
    where: str,
) -> Policy:
    return Policy(
        select=resolve_selector(ap, res, tokenizer, where),
        exclude=None if ap.exclude is None else resolve_selector(ap.exclude, res, tokenizer, f"{where}.exclude"),
        gate=None if ap.when is None else _gate(ap.when, cfg, layer, sae, res, f"{where}.when"),
        rows_R=None if rows is None else torch.tensor(rows, dtype=torch.bool, device=res.spec.device),
    )


def _gate(cond: Condition, cfg: SteeringConfig, layer: int, sae: Sae | None, res: Resources, where: str) -> Gate:
    score: Callable[[Tensor, LatentCache], Tensor]
    if cond.feature is not None:
        if cond.sae is not None:
            sae = _load_sae(cfg, cond.sae, res, f"{where}.sae")
        if sae is None:
            raise SteeringConfigError(f"{where}.feature: this op has no SAE; name one with {where}.sae")
        _check_feature(cond.feature, sae, f"{where}.feature")
        score = _feature_score(sae, cond.feature)
    elif cond.probe is not None:
        probe = _mlp_probe(cfg, cond.probe, res, f"{where}.probe")
        return Gate(_mlp_probe_score(probe), cond.above, cond.below, cond.scope, cond.aggregate, pooled=probe.scores)
    else:
        assert cond.vector is not None
        v = _vector(cond.vector, cfg, layer, res, f"{where}.vector")
        if v.dim() != 1:
            raise SteeringConfigError(f"{where}.vector: a probe is one vector, got shape {tuple(v.shape)}")
        score = _probe_score(v.to(res.spec.device), cond.metric)
    return Gate(score, cond.above, cond.below, cond.scope, cond.aggregate)


def _mlp_probe(cfg: SteeringConfig, ref: str, res: Resources, where: str) -> MlpProbe:
    path = _existing(cfg, ref, where)
    try:
        probe = res.probe(path)
    except (OSError, ValueError) as e:
        raise SteeringConfigError(f"{where}: cannot load the probe at {path}: {e}") from e
    if probe.d_model != res.spec.d_model:
        raise SteeringConfigError(
            f"{where}: the probe reads {probe.d_model}-wide activations; the model's width is {res.spec.d_model}"
        )
    return probe


def _mlp_probe_score(probe: MlpProbe) -> Callable[[Tensor, LatentCache], Tensor]:
    def score(x_ND: Tensor, cache: LatentCache) -> Tensor:
        return probe.scores(cache.x_in_ND)

    return score


def _feature_score(sae: Sae, feature: int) -> Callable[[Tensor, LatentCache], Tensor]:
    def score(x_ND: Tensor, cache: LatentCache) -> Tensor:
        return cache.latents(sae)[:, feature]

    return score


def _probe_score(v_D: Tensor, metric: str) -> Callable[[Tensor, LatentCache], Tensor]:
    def score(x_ND: Tensor, cache: LatentCache) -> Tensor:
        x = cache.x_in_ND.float()
        s = x @ v_D
        if metric == "cosine":
            s = s / (x.norm(dim=-1) * v_D.norm()).clamp_min(1e-12)
        return s

    return score


def spec_of(model: Any, n_layers: int, d_model: int) -> ModelSpec:
    """A :class:`ModelSpec` from a torch module's first parameter."""
    p = next(model.parameters())
    return ModelSpec(
        n_layers, d_model, p.device, p.dtype, getattr(getattr(model, "config", None), "name_or_path", None)
    )
