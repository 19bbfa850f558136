"""Application policies resolved for a model: which tokens of a step an intervention touches.

A :class:`Selector` turns a :class:`~steerlib.tokens.TokenBatch` into a boolean mask over the step's tokens. A
:class:`Gate` adds the data-dependent part (``when``: a feature or probe that must fire), which for ``scope: prompt``
is decided once per row on its prompt and then held for the rest of the sequence (conditional activation steering,
Lee et al., arXiv 2409.05907).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from steerlib.tokens import TokenBatch

if TYPE_CHECKING:
    from steerlib.run_state import GateState

ScoreFn = Callable[[Tensor, "LatentCache"], Tensor]
"""Maps the step's activations ``(N, D)`` to a score per token ``(N,)``."""


@dataclass
class LatentCache:
    """SAE latents computed once per site and step, shared by an op and its condition."""

    x_in_ND: Tensor
    _latents: dict[int, Tensor] = field(default_factory=dict)

    def latents(self, sae: torch.nn.Module) -> Tensor:
        key = id(sae)
        if key not in self._latents:
            self._latents[key] = sae.encode(self.x_in_ND)  # type: ignore[operator]
        return self._latents[key]


@dataclass(frozen=True)
class Selector:
    """A resolved :class:`~steerlib.config.TokenSelector`."""

    tokens: str = "all"
    positions: tuple[int, ...] | None = None
    window: tuple[int, int | None] | None = None
    last: int | None = None
    match_V: Tensor | None = None
    """Boolean lookup over the vocabulary: True for token ids whose text matches."""

    def mask(self, tb: TokenBatch) -> Tensor:
        m = tb.valid_N.clone()
        if self.tokens == "prompt":
            m &= tb.is_prompt_N
        elif self.tokens == "generated":
            m &= ~tb.is_prompt_N
        pos = tb.position_N
        plen = tb.prompt_len_R[tb.row_N]
        if self.positions is not None:
            hit = torch.zeros_like(m)
            for p in self.positions:
                hit |= pos == (p if p >= 0 else plen + p)
            m &= hit
        if self.window is not None:
            start, end = self.window
            m &= pos >= start
            if end is not None:
                m &= pos < end
        if self.last is not None:
            m &= tb.is_prompt_N & (pos >= plen - self.last)
        if self.match_V is not None:
            if tb.token_ids_N is None:
                raise ValueError("apply.match needs token ids, but the model was called with inputs_embeds")
            ids = tb.token_ids_N.clamp(0, self.match_V.shape[0] - 1)
            m &= self.match_V.to(ids.device)[ids] & (tb.token_ids_N < self.match_V.shape[0])
        return m


@dataclass(frozen=True)
class Gate:
    """A resolved ``when`` condition: what is scored and when it fires. Immutable: a prompt-scoped gate's per-row
    accumulators and verdicts live in a :class:`~steerlib.run_state.GateState` that the caller owns (one per
    handle or engine), so a plan can be shared, cached and compared."""

    score: ScoreFn
    above: float | None
    below: float | None
    scope: str = "token"
    aggregate: str = "last"
    pooled: Callable[[Tensor], Tensor] | None = None
    """Scores ``(R, D)`` activations directly. Given, ``aggregate == 'mean'`` scores each prompt's mean activation
    (the activation entering the site) instead of averaging per-token scores: for a nonlinear probe they differ."""
    window: int = 0
    """With ``aggregate == 'window_max'``: tokens per window (the score of each window's mean activation)."""

    def fires(self, s_N: Tensor) -> Tensor:
        f = torch.ones_like(s_N, dtype=torch.bool)
        if self.above is not None:
            f &= s_N > self.above
        if self.below is not None:
            f &= s_N < self.below
        return f

    @property
    def pools_activations(self) -> bool:
        return self.pooled is not None and self.aggregate == "mean"

    def mask(self, x_ND: Tensor, cache: LatentCache, tb: TokenBatch, state: GateState | None) -> Tensor:
        """Where the condition holds: per token (token scope), or the row's prompt verdict (prompt scope, which
        reads this step's prompt tokens into ``state`` first)."""
        if self.scope == "token":
            return self.fires(self.score(x_ND, cache).float())
        if state is None:
            raise ValueError("a prompt-scoped condition needs its GateState")
        if tb.has_prompt:  # host-side: a decode step has no prompt to read, the verdicts stand
            state.read_prompt(self, x_ND, cache, tb)
        return state.verdict_R[tb.row_N]


@dataclass(frozen=True)
class Policy:
    """A resolved :class:`~steerlib.config.ApplyPolicy` plus the rows it is limited to (per-row steering)."""

    select: Selector
    exclude: Selector | None = None
    gate: Gate | None = None
    rows_R: Tensor | None = None
    """For per-row steering: ``(R,)`` bool on the model's device, True for the rows this policy's config applies to
    (made once when the plan is built, so a step copies nothing from the host)."""

    @property
    def reads_prompt(self) -> bool:
        """A prompt-scoped gate must see every prompt token, whatever the rest of the policy selects."""
        return self.gate is not None and self.gate.scope == "prompt"

    def may_apply(self, tb: TokenBatch) -> bool:
        """False when the op certainly has nothing to do this step, from what the host knows about it (prompt or
        generated tokens present) without reading a device tensor: a prompt-only policy costs nothing while
        decoding, and no step waits on the device to find that out."""
        if self.reads_prompt and tb.has_prompt:
            return True
        sel = self.select
        if (sel.tokens == "prompt" or sel.last is not None) and not tb.has_prompt:
            return False
        return not (sel.tokens == "generated" and not tb.has_generated)

    def static_mask(self, tb: TokenBatch) -> Tensor:
        """Everything but the gate."""
        m = self.select.mask(tb)
        if self.exclude is not None:
            m &= ~self.exclude.mask(tb)
        if self.rows_R is not None:
            if self.rows_R.shape[0] != tb.n_rows:
                raise ValueError(
                    f"steering was given {self.rows_R.shape[0]} per-row configs but the batch has {tb.n_rows} rows; "
                    "pass exactly one config (or None) per row"
                )
            m &= self.rows_R[tb.row_N]
        return m
