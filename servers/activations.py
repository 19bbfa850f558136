"""Reading the model through the API: ``return_activations`` on chat and text completions, on both engines.

A request names sites (layers x site names) and tokens (``last`` prompt token, ``prompt``, ``generated``, ``all``);
the engine records the activations there, after any steering at that site, for every token it runs through the
model (the prompt, then each generated token but the last, which is never fed back), as
``steerlib.hf.recording.record`` does. The answer carries, per site, the chosen tokens' raw activations
(``raw: true``, within the server's ``max_activation_floats``) and, cheaply, their projections onto given vectors
(``x . v / |v|``; preset vectors by name or inline floats) and MLP-probe scores (preset probes by name). Validated
before queueing like steering: layer and site names, vector widths, preset names, the raw size for the longest
answer the request allows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor

from servers.errors import ApiError
from servers.registry import PresetError, PresetRegistry
from servers.resources import ServerResources
from steerlib.sites import SITES, tl_name

MAX_SITES, MAX_READOUTS = 16, 16

Captured = Mapping[str, tuple[Tensor, Tensor]]
"""Per TransformerLens site name: the positions ``(N,)`` (0 = the first prompt token) and activations ``(N, D)``
of the tokens an engine ran through the model for one request, in position order."""


class ActivationRequest(BaseModel):
    """``return_activations``: what to read from the model while it answers."""

    model_config = ConfigDict(extra="forbid")

    layers: list[int] = Field(min_length=1, max_length=MAX_SITES, description="Layers to read (0-based).")
    sites: list[str] = Field(["resid_post"], min_length=1, max_length=len(SITES), description=f"Of: {SITES}.")
    tokens: Literal["last", "prompt", "generated", "all"] = Field(
        "last",
        description="last: the prompt's last token; prompt; generated: each generated token but the last (which "
        "the model never reads); all: prompt then generated.",
    )
    raw: bool = Field(False, description="Return the activations themselves (size-capped by the server).")
    project: dict[str, str | list[float]] = Field(
        default_factory=dict,
        max_length=MAX_READOUTS,
        description="Name -> a preset vector's name or inline floats: the scalar projection x . v / |v| per token.",
    )
    probes: list[str] = Field(default_factory=list, max_length=MAX_READOUTS, description="Preset MLP probes' names.")

    @field_validator("sites")
    @classmethod
    def _known_sites(cls, v: list[str]) -> list[str]:
        unknown = [s for s in v if s not in SITES]
        if unknown:
            raise ValueError(f"unknown site {unknown[0]!r}; allowed: {', '.join(SITES)}")
        return v


@dataclass(frozen=True)
class Readout:
    """A validated ``return_activations``: sites as ``(layer, site)``, vectors and probes loaded."""

    request: ActivationRequest
    sites: tuple[tuple[int, str], ...]
    vectors: Mapping[str, Tensor | Path]
    """Name -> an inline vector, or a preset vector file (per-layer files give the site's layer's vector)."""
    probes: Mapping[str, Path]


def plan_readout(
    req: ActivationRequest,
    registry: PresetRegistry,
    resources: ServerResources,
    n_layers: int,
    max_tokens_total: int,
    max_floats: int,
) -> Readout:
    """Check ``req`` against the model and the server's limits (a 400 naming the field)."""
    sites = tuple(dict.fromkeys((layer, site) for layer in req.layers for site in req.sites))
    if len(sites) > MAX_SITES:
        raise _bad(f"{len(sites)} sites (layers x sites); at most {MAX_SITES}", "layers")
    bad = [layer for layer in req.layers if not 0 <= layer < n_layers]
    if bad:
        raise _bad(f"layer {bad[0]} out of range: the model has {n_layers} layers (0..{n_layers - 1})", "layers")
    d = resources.spec.d_model
    if req.raw and len(sites) * max_tokens_total * d > max_floats:
        raise _bad(
            f"raw: {len(sites)} sites x up to {max_tokens_total} tokens x {d} floats exceeds this server's limit of "
            f"{max_floats} floats; ask for fewer sites or tokens, or for projections and probes only",
            "raw",
        )
    vectors: dict[str, Tensor | Path] = {}
    for name, ref in req.project.items():
        vectors[name] = _vector(name, ref, registry, resources, d, [layer for layer, _ in sites])
    probes: dict[str, Path] = {}
    for name in req.probes:
        try:
            probes[name] = Path(registry.probe(name))
        except PresetError as e:
            raise _bad(str(e), "probes") from e
        if resources.probe(probes[name]).d_model != d:
            raise _bad(
                f"probe {name!r} reads width {resources.probe(probes[name]).d_model}, the model has {d}", "probes"
            )
    return Readout(req, sites, vectors, probes)


def _vector(
    name: str, ref: str | list[float], registry: PresetRegistry, res: ServerResources, d: int, layers: list[int]
) -> Tensor | Path:
    where = f"project.{name}"
    if isinstance(ref, list):
        v = torch.tensor(ref, dtype=torch.float32, device="cpu")  # validated and projected on the host
        if v.shape != (d,) or not bool(torch.isfinite(v).all()) or float(v.norm()) == 0.0:
            raise _bad(f"{where}: an inline vector needs {d} finite floats, not all zero", "return_activations")
        return v
    try:
        path = Path(registry.vector(ref))
    except PresetError as e:
        raise _bad(f"{where}: {e}", "return_activations") from e
    for layer in layers:
        try:
            width = res.vector(path).for_layer(layer, where=where).shape[-1]
        except (KeyError, ValueError) as e:
            raise _bad(str(e), "return_activations") from e
        if width != d:
            raise _bad(f"{where}: vector {ref!r} has width {width}, the model has {d}", "return_activations")
    return path


def _bad(message: str, field: str) -> ApiError:
    return ApiError(400, f"return_activations: {message}", param=field)


def readout_body(r: Readout, captured: Captured, n_prompt: int, resources: ServerResources) -> dict[str, Any]:
    """The ``steering_activations`` object of a finished request."""
    out: dict[str, Any] = {"tokens": r.request.tokens, "sites": []}
    positions: list[int] | None = None
    for layer, site in r.sites:
        pos_N, x_ND = captured[tl_name(layer, site)]
        keep = _chosen(pos_N, n_prompt, r.request.tokens)
        pos_N, x_ND = pos_N[keep], x_ND[keep].float()
        positions = positions if positions is not None else [int(p) for p in pos_N.tolist()]
        entry: dict[str, Any] = {"layer": layer, "site": site}
        if r.request.raw:
            entry["raw"] = x_ND.tolist()
        if r.vectors:
            entry["projections"] = {n: _projection(x_ND, v, layer, resources) for n, v in r.vectors.items()}
        if r.probes:
            entry["probes"] = {n: resources.probe(p).scores(x_ND).float().tolist() for n, p in r.probes.items()}
        out["sites"].append(entry)
    out["positions"] = positions or []
    return out


def _chosen(pos_N: Tensor, n_prompt: int, tokens: str) -> Tensor:
    if tokens == "last":
        return pos_N == n_prompt - 1
    if tokens == "prompt":
        return pos_N < n_prompt
    if tokens == "generated":
        return pos_N >= n_prompt
    return torch.ones_like(pos_N, dtype=torch.bool)


def _projection(x_ND: Tensor, v: Tensor | Path, layer: int, resources: ServerResources) -> list[float]:
    vec = v if isinstance(v, Tensor) else resources.vector(v).for_layer(layer)
    vec = vec.to(x_ND.device, torch.float32)
    return (x_ND @ (vec / vec.norm())).tolist()


def merge_captures(chunks: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Chunks of ``(positions, activations)`` as one, in position order, the last of any repeated position kept (an
    engine may run a position twice: a preempted request's prompt is computed again)."""
    if not chunks:
        return torch.empty(0, dtype=torch.long, device="cpu"), torch.empty(0, 0, device="cpu")
    pos_N = torch.cat([p for p, _ in chunks])
    x_ND = torch.cat([x for _, x in chunks])
    last: dict[int, int] = {int(p): i for i, p in enumerate(pos_N.tolist())}
    order = torch.tensor([last[p] for p in sorted(last)], dtype=torch.long, device=pos_N.device)
    return pos_N[order], x_ND[order]
