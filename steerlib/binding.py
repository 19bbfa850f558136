"""Bind one intervention of a config to a model: load and check what it names, build its op and its policy.

Everything that can be wrong with a config against a model (a layer out of range, a vector of the wrong width, NaN
in a file, a feature index past the SAE's width, a missing file, an SAE put where it was not trained) is found here,
before any hook is installed, and reported with the field's path and the allowed values.

An SAE knows where it belongs: its own recorded site (``cfg.json``'s hook, as SAELens attaches an SAE where its
metadata says) is where an ``sae`` / ``replace`` op runs when the config gives no layer or site, and a config that
puts it elsewhere is an error unless it says ``any_site: true``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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
from steerlib.mlp_probe import MlpProbe
from steerlib.ops import AblateDirections, AddVector, SaeEdit, SaeReplace, orthonormal_rows
from steerlib.policy import Gate, LatentCache, Policy, Selector
from steerlib.resources import Resources, TokenizerLike
from steerlib.sae import Sae
from steerlib.sites import parse_site
from steerlib.vectors import as_tensor

Op = Callable[[Tensor, LatentCache, Tensor], Tensor]


class SteeringConfigError(ValueError):
    """A config that cannot be applied to this model; the message names the field and what is allowed."""


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


@dataclass(frozen=True)
class Binder:
    """Binds the interventions of one config (for the rows it applies to) against one model's resources."""

    cfg: SteeringConfig
    res: Resources
    tokenizer: TokenizerLike | None = None
    rows: tuple[bool, ...] | None = None
    """Per-row steering: the rows this config applies to (None: every row)."""

    def bind(self, iv: Intervention, where: str) -> list[BoundOp]:
        sae = self.sae(iv.sae, f"{where}.sae") if isinstance(iv, SaeOp | ReplaceOp) else None
        reads_mlp_in = sae is not None and _is_mlp_transcoder(sae)
        layers, site = self._placement(iv, sae, where)
        if sae is not None:
            self._check_sae(sae, site, where, reads_mlp_in)
        out = []
        for layer in layers:
            op = self._op(iv, layer, sae, where)
            policy = self.policy(iv.apply, layer, sae, f"{where}.apply")
            out.append(BoundOp(where, layer, site, op, policy, reads_mlp_in))
        return out

    # -- where --------------------------------------------------------------------------------------------------

    def _placement(self, iv: Intervention, sae: Sae | None, where: str) -> tuple[list[int], str]:
        """The layers and site an intervention runs at; an SAE's own unless the config says otherwise (checked)."""
        layer, site = iv.layer, iv.site
        own = _own_site(sae) if sae is not None else None
        if own is not None:
            given = (own[0] if layer is None else layer, own[1] if site is None else site)
            if given != own and not getattr(iv, "any_site", False):
                raise SteeringConfigError(
                    f"{where}: this SAE was trained at layer {own[0]}, site {own[1]}, but the config puts it at "
                    f"layer {given[0]}, site {given[1]}; leave layer and site out to run it where it belongs, or set "
                    "any_site: true to run it elsewhere"
                )
            layer, site = given
        if layer is None or site is None:
            raise SteeringConfigError(f"{where}: give layer and site: this SAE records no layer of its own")
        return self._layers(layer, where), site

    def _layers(self, layer: int | list[int] | str, where: str) -> list[int]:
        n = self.res.spec.n_layers
        if layer == "all":
            return list(range(n))
        layers: list[int] = [layer] if isinstance(layer, int) else [int(i) for i in layer]
        for i in layers:
            if i >= n:
                raise SteeringConfigError(f"{where}.layer: {i} out of range: model has {n} layers (0..{n - 1})")
        return layers

    # -- what -----------------------------------------------------------------------------------------------------

    def _op(self, iv: Intervention, layer: int, sae: Sae | None, where: str) -> Op | None:
        device = self.res.spec.device
        if isinstance(iv, AddOp):
            v = self.vector(iv.vector, layer, f"{where}.vector")
            if v.dim() != 1:
                raise SteeringConfigError(f"{where}.vector: op add needs one vector, got shape {tuple(v.shape)}")
            if iv.relative and float(v.norm()) == 0.0:
                raise SteeringConfigError(f"{where}.vector: relative addition needs a non-zero vector")
            return AddVector(v.to(device), iv.coefficient, iv.relative, iv.norm_match)
        if isinstance(iv, AblateOp):
            v = self.vector(iv.vector, layer, f"{where}.vector")
            v = v[None] if v.dim() == 1 else v
            if bool((v.norm(dim=-1) == 0).any()):
                raise SteeringConfigError(f"{where}.vector: cannot ablate a zero direction")
            return AblateDirections(orthonormal_rows(v).to(device))
        if isinstance(iv, RefuseOp):
            return None  # reads only: its gate's verdicts are the plan's detectors'
        assert sae is not None
        if isinstance(iv, SaeOp):
            for j, e in enumerate(iv.edits):
                _check_feature(e.feature, sae, f"{where}.edits[{j}].feature")
            edits, keep = iv.edits, iv.error_term == "keep"
            return SaeEdit(sae, tuple(e.feature for e in edits), tuple(e.mode for e in edits),
                           tuple(e.value for e in edits), keep_error=keep)  # fmt: skip
        return SaeReplace(sae)

    def policy(self, ap: ApplyPolicy, layer: int, sae: Sae | None, where: str) -> Policy:
        device = self.res.spec.device
        return Policy(
            select=self.selector(ap, where),
            exclude=None if ap.exclude is None else self.selector(ap.exclude, f"{where}.exclude"),
            gate=None if ap.when is None else self.gate(ap.when, layer, sae, f"{where}.when"),
            rows_R=None if self.rows is None else torch.tensor(self.rows, dtype=torch.bool, device=device),
        )

    def selector(self, sel: TokenSelector, where: str) -> Selector:
        return resolve_selector(sel, self.res, self.tokenizer, where)

    def gate(self, cond: Condition, layer: int, sae: Sae | None, where: str) -> Gate:
        if cond.probe is not None:
            probe = self.probe(cond.probe, f"{where}.probe")
            return Gate(_mlp_probe_score(probe), cond.above, cond.below, cond.scope, cond.aggregate,
                        pooled=probe.scores, window=cond.window or 0)  # fmt: skip
        if cond.feature is not None:
            if cond.sae is not None:
                sae = self.sae(cond.sae, f"{where}.sae")
            if sae is None:
                raise SteeringConfigError(f"{where}.feature: this op has no SAE; name one with {where}.sae")
            _check_feature(cond.feature, sae, f"{where}.feature")
            score = _feature_score(sae, cond.feature)
        else:
            assert cond.vector is not None
            v = self.vector(cond.vector, layer, f"{where}.vector")
            if v.dim() != 1:
                raise SteeringConfigError(f"{where}.vector: a probe is one vector, got shape {tuple(v.shape)}")
            score = _probe_score(v.to(self.res.spec.device), cond.metric)
        return Gate(score, cond.above, cond.below, cond.scope, cond.aggregate, window=cond.window or 0)

    # -- files ----------------------------------------------------------------------------------------------------

    def existing(self, ref: str, where: str) -> Path:
        path = self.cfg.resolve(ref)
        if not path.exists():
            raise SteeringConfigError(f"{where}: file or folder not found: {path}")
        return path

    def sae(self, ref: str, where: str) -> Sae:
        path = self.existing(ref, where)
        try:
            return self.res.sae(path)
        except (OSError, ValueError, KeyError) as e:
            raise SteeringConfigError(f"{where}: cannot load the SAE at {path}: {e}") from e

    def vector(self, ref: str | list[float], layer: int, where: str) -> Tensor:
        """The vector checked on the host (width, finiteness), fp32 on the CPU; callers move it once checked."""
        d = self.res.spec.d_model
        try:
            v = (
                as_tensor(ref)
                if isinstance(ref, list)
                else self.res.vector(self.existing(ref, where)).for_layer(layer, where=where)
            )
        except (OSError, ValueError) as e:
            raise SteeringConfigError(f"{where}: {e}") from e
        if v.shape[-1] != d or v.dim() not in (1, 2):
            raise SteeringConfigError(
                f"{where}: vector has shape {tuple(v.shape)}; the model's width is {d}, so expected ({d},)"
            )
        v = v.detach().to(device="cpu", dtype=torch.float32)
        if not bool(torch.isfinite(v).all()):
            raise SteeringConfigError(f"{where}: vector contains NaN or inf")
        return v

    def probe(self, ref: str, where: str) -> MlpProbe:
        path = self.existing(ref, where)
        try:
            probe = self.res.probe(path)
        except (OSError, ValueError) as e:
            raise SteeringConfigError(f"{where}: cannot load the probe at {path}: {e}") from e
        d = self.res.spec.d_model
        if probe.d_model != d:
            raise SteeringConfigError(
                f"{where}: the probe reads {probe.d_model}-wide activations; the model's width is {d}"
            )
        return probe

    def _check_sae(self, sae: Sae, site: str, where: str, reads_mlp_in: bool) -> None:
        d = self.res.spec.d_model
        if sae.d_in != d or sae.d_out != d:
            raise SteeringConfigError(
                f"{where}.sae: SAE maps width {sae.d_in} -> {sae.d_out} but the model's width is {d}"
            )
        if reads_mlp_in and site != "mlp_out":
            raise SteeringConfigError(
                f"{where}.site: this SAE is a transcoder (reads mlp_in, writes mlp_out); set site: mlp_out, got {site}"
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


def _own_site(sae: Sae) -> tuple[int, str] | None:
    """Where the SAE writes, from its metadata (a transcoder's output site), if it names a layer."""
    name = sae.meta.output_site or sae.meta.input_site
    layer, site = parse_site(name) if name else (None, "")
    return None if layer is None else (layer, site)


def _check_feature(feature: int, sae: Sae, where: str) -> None:
    if feature >= sae.d_sae:
        raise SteeringConfigError(
            f"{where}: {feature} out of range: the SAE has {sae.d_sae} latents (0..{sae.d_sae - 1})"
        )


def _is_mlp_transcoder(sae: Sae) -> bool:
    ins, outs = sae.meta.input_site or "", sae.meta.output_site or ""
    return ins.endswith("mlp_in") and outs.endswith("mlp_out")


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
