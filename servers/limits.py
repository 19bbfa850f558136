"""What one request's steering may cost the server: checked when it is parsed, before it is queued.

steerlib's config already bounds every number by what float32 arithmetic and int32 positions survive
(``steerlib.config.MAX_MAGNITUDE``, ``MAX_TOKEN_INDEX``); the server's settings are stricter, and name the setting
that sets each limit so an operator knows what to raise. A request's *cost* is the number of (op, layer) pairs it
binds, each weighted by the token positions it lists (every one is a comparison per step): what a batch pays per
forward step for it. The engine packs a batch up to ``max_batch_cost``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from servers.settings import ServerSettings
from steerlib.config import Intervention, SteeringConfig, TokenSelector


class LimitError(ValueError):
    """A request beyond one of the server's limits; the message names the field, the limit and its setting."""


@dataclass(frozen=True)
class RequestLimits:
    max_coefficient: float = 1e4
    max_edit_value: float = 1e4
    max_layers: int = 128
    max_selector_items: int = 256
    max_position: int = 2560
    """Largest position a selector may name: the longest prompt plus the most tokens a request may generate."""
    max_cost: int = 4096

    @classmethod
    def of(cls, s: ServerSettings) -> RequestLimits:
        return cls(
            max_coefficient=s.max_coefficient,
            max_edit_value=s.max_edit_value,
            max_layers=s.max_layers_per_intervention,
            max_selector_items=s.max_selector_items,
            max_position=s.max_prompt_tokens + s.max_tokens_limit,
            max_cost=s.max_batch_cost,
        )


def check_inline(ivs: Sequence[Intervention], limits: RequestLimits, n_layers: int) -> None:
    """LimitError for the first inline intervention beyond a limit."""
    for i, iv in enumerate(ivs):
        where = f"interventions[{i}]"
        n = len(_layers(iv.layer, n_layers))
        if n > limits.max_layers:
            raise LimitError(f"{where}.layer: {n} layers; at most {limits.max_layers} (max_layers_per_intervention)")
        coefficient = getattr(iv, "coefficient", None)
        if coefficient is not None and abs(coefficient) > limits.max_coefficient:
            raise LimitError(
                f"{where}.coefficient: |{coefficient:g}| exceeds {limits.max_coefficient:g} (max_coefficient)"
            )
        for j, e in enumerate(getattr(iv, "edits", None) or []):
            if abs(e.value) > limits.max_edit_value:
                raise LimitError(
                    f"{where}.edits[{j}].value: |{e.value:g}| exceeds {limits.max_edit_value:g} (max_edit_value)"
                )
        _check_selector(iv.apply, f"{where}.apply", limits)
        if iv.apply.exclude is not None:
            _check_selector(iv.apply.exclude, f"{where}.apply.exclude", limits)


def _check_selector(sel: TokenSelector, where: str, limits: RequestLimits) -> None:
    top = limits.max_position
    for field, items in (("positions", sel.positions), ("match", sel.match)):
        if items is not None and len(items) > limits.max_selector_items:
            raise LimitError(
                f"{where}.{field}: {len(items)} entries; at most {limits.max_selector_items} (max_selector_items)"
            )
    values = [*(sel.positions or []), *(v for v in sel.window or () if v is not None)]
    values += [sel.last] if sel.last is not None else []
    big = [v for v in values if abs(v) > top]
    if big:
        raise LimitError(
            f"{where}: position {big[0]} is beyond any token of a request here (at most {top}: max_prompt_tokens "
            "+ max_tokens_limit)"
        )


def cost(config: SteeringConfig | None, n_layers: int) -> int:
    """What a batch pays per step for this config: (op, layer) pairs, each weighted by the positions it lists."""
    if config is None:
        return 0
    total = 0
    for iv in config.interventions:
        per_layer = 1 + len(iv.apply.positions or []) + len((iv.apply.exclude or TokenSelector()).positions or [])
        total += len(_layers(iv.layer, n_layers)) * per_layer
    return total


def check_cost(config: SteeringConfig | None, n_layers: int, limits: RequestLimits) -> int:
    """The config's :func:`cost`; LimitError when it alone would exceed a batch's budget."""
    c = cost(config, n_layers)
    if c > limits.max_cost:
        raise LimitError(
            f"this steering binds {c} (op, layer) steps, more than a batch may hold ({limits.max_cost}: "
            "max_batch_cost); use fewer layers, interventions or positions"
        )
    return c


def _layers(layer: int | list[int] | str | None, n_layers: int) -> list[int]:
    if layer == "all":
        return list(range(n_layers))
    if isinstance(layer, list):
        return layer
    return [0] if layer is None or isinstance(layer, int) else []
