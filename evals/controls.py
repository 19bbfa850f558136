"""Sweeps and controls built from a steering config: coefficient / layer variants and same-norm random vectors.

Random-vector control (Tan et al., arXiv 2407.12404, and ``../shared/DATA.md``): on small models adding *any* vector
of a large enough norm can produce "I'm sorry..." from broken text, so a steering result is only evidence when it
beats a random vector of the same norm at the same site, layer and token policy. :func:`random_control` builds that
twin: every ``add`` (and ``ablate``) vector is replaced by a seeded Gaussian direction with the original's norm, per
layer; everything else in the config is kept.
"""

from __future__ import annotations

from typing import Any

import torch

from steerlib.config import AblateOp, AddOp, SteeringConfig
from steerlib.vectors import load_vector


def _vectors(config: SteeringConfig, iv: AddOp | AblateOp) -> dict[int | None, torch.Tensor]:
    """The intervention's vector(s): ``{None: v}`` for one vector, ``{layer: v}`` for a per-layer file."""
    if isinstance(iv.vector, list):
        return {None: torch.tensor(iv.vector, dtype=torch.float32, device="cpu")}
    return dict(load_vector(config.resolve(iv.vector)).by_layer)


def _random_like(v: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Gaussian rows with the norms of ``v``'s rows (``(D,)`` or ``(K, D)``)."""
    r = torch.randn(v.shape, generator=gen, device="cpu").to(v.device)
    return r / r.norm(dim=-1, keepdim=True) * v.norm(dim=-1, keepdim=True)


def random_control(config: SteeringConfig, seed: int = 0) -> SteeringConfig:
    """The config with each add / ablate vector replaced by a random one of the same norm (seeded, per layer)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out: list[dict[str, Any]] = []
    for iv in config.interventions:
        data = iv.model_dump(mode="json", exclude_none=True)
        if not isinstance(iv, AddOp | AblateOp):
            out.append(data)
            continue
        by_layer = _vectors(config, iv)
        if None in by_layer:
            out.append({**data, "vector": _random_like(by_layer[None], gen).tolist()})
            continue
        if iv.layer == "all":
            raise ValueError("random_control: a per-layer vector file with layer 'all'; list the layers instead")
        for layer in [iv.layer] if isinstance(iv.layer, int) else iv.layer:
            v = by_layer.get(layer)
            if v is None:
                raise ValueError(f"random_control: the vector file {iv.vector} has no layer {layer}")
            out.append({**data, "layer": layer, "vector": _random_like(v, gen).tolist()})
    return SteeringConfig.from_dict({"interventions": out}, base_dir=config.base_dir)


def with_coefficient(config: SteeringConfig, coefficient: float) -> SteeringConfig:
    """The config with every ``add`` intervention's coefficient set to ``coefficient`` (a new config)."""
    return _update(config, lambda iv: {"coefficient": coefficient} if isinstance(iv, AddOp) else {})


def with_layer(config: SteeringConfig, layer: int) -> SteeringConfig:
    """The config with every intervention moved to ``layer`` (a new config)."""
    return _update(config, lambda iv: {"layer": layer})


def combine(*configs: SteeringConfig | None) -> SteeringConfig | None:
    """The interventions of several configs in order (``None`` entries skipped); file references must agree on
    their base folder, so give configs from one folder or with inline vectors."""
    given = [c for c in configs if c is not None]
    if not given:
        return None
    bases = {c.base_dir for c in given if c.base_dir is not None}
    if len(bases) > 1:
        raise ValueError(f"cannot combine configs from different folders: {sorted(map(str, bases))}")
    return SteeringConfig.model_validate(
        {"interventions": [iv for c in given for iv in c.interventions], "base_dir": next(iter(bases), None)}
    )


def _update(config: SteeringConfig, change: Any) -> SteeringConfig:
    ivs = [iv.model_copy(update=change(iv)) for iv in config.interventions]
    # Re-validated so that an update is checked like a config a user wrote.
    data = [iv.model_dump(mode="json", exclude_none=True) for iv in ivs]
    return SteeringConfig.from_dict({"interventions": data}, base_dir=config.base_dir)
