"""Resolve steering configs against a model into a plan: bound ops grouped by (layer, site), and its detectors.

Binding (:mod:`steerlib.binding`) checks every field against the model before any hook is installed; the config is
never mutated and the plan never changes: what happens while it runs lives in a
:class:`~steerlib.run_state.RunState`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from steerlib.binding import Binder, BoundOp, Op, SteeringConfigError, resolve_selector
from steerlib.config import RefuseOp, SteeringConfig
from steerlib.refusal import Detector
from steerlib.resources import ModelSpec, Resources, TokenizerLike, spec_of
from steerlib.run_state import RunState

__all__ = [
    "BoundOp",
    "ModelSpec",
    "Op",
    "Plan",
    "Resources",
    "SteeringConfigError",
    "TokenizerLike",
    "build_plan",
    "resolve_selector",
    "spec_of",
]


@dataclass(frozen=True)
class Plan:
    """Bound ops by (layer, site), in config order within each site, and the ``refuse`` detectors in config order."""

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
        binder = Binder(cfg, res, tokenizer, rows)
        for i, iv in enumerate(cfg.interventions):
            where = f"{prefix}interventions[{i}]"
            for bound in binder.bind(iv, where):
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
