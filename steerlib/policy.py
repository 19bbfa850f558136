"""Application policies resolved for a model: which tokens of a step an intervention touches.

A :class:`Selector` turns a :class:`~steerlib.tokens.TokenBatch` into a boolean mask over the step's tokens. A
:class:`Gate` adds the data-dependent part (``when``: a feature or probe that must fire), which for ``scope: prompt``
is decided once per row on its prompt and then held for the rest of the sequence (conditional activation steering,
Lee et al., arXiv 2409.05907).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from steerlib.tokens import TokenBatch

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


@dataclass
class Gate:
    """A resolved ``when`` condition. Holds per-row verdicts when ``scope == 'prompt'``."""

    score: ScoreFn
    above: float | None
    below: float | None
    scope: str = "token"
    aggregate: str = "last"
    pooled: Callable[[Tensor], Tensor] | None = None
    """Scores ``(R, D)`` activations directly. Given, ``aggregate == 'mean'`` scores each prompt's mean activation
    (the activation entering the site) instead of averaging per-token scores: for a nonlinear probe they differ."""
    _verdict_R: Tensor | None = None
    _score_R: Tensor | None = None
    """The prompt score each row's verdict was decided on (NaN until decided)."""
    _acc_R: Tensor | None = None
    _count_R: Tensor | None = None
    _acc_RD: Tensor | None = None
    """Per-row sums of prompt activations (only for a ``pooled`` mean)."""

    def decided(self) -> tuple[Tensor, Tensor] | None:
        """Per-row verdicts and the scores they were decided on, once a prompt has been read (prompt scope)."""
        if self._verdict_R is None or self._score_R is None:
            return None
        return self._verdict_R, self._score_R

    def fires(self, s_N: Tensor) -> Tensor:
        f = torch.ones_like(s_N, dtype=torch.bool)
        if self.above is not None:
            f &= s_N > self.above
        if self.below is not None:
            f &= s_N < self.below
        return f

    @property
    def _pools_activations(self) -> bool:
        return self.pooled is not None and self.aggregate == "mean"

    def mask(self, x_ND: Tensor, cache: LatentCache, tb: TokenBatch) -> Tensor:
        if self.scope == "token":
            return self.fires(self.score(x_ND, cache).float())
        return self._prompt_verdict(x_ND, cache, tb)[tb.row_N]

    def _reset(self, tb: TokenBatch, dev: torch.device) -> None:
        """Per-row accumulators, cleared for rows whose sequence starts in this step."""
        R = tb.n_rows
        init = -torch.inf if self.aggregate == "max" else 0.0
        if self._verdict_R is None or self._acc_R is None or self._count_R is None or self._verdict_R.shape[0] != R:
            self._verdict_R = torch.zeros(R, dtype=torch.bool, device=dev)
            self._acc_R = torch.full((R,), init, device=dev)
            self._count_R = torch.zeros(R, device=dev)
            self._acc_RD = None
        else:
            new = tb.new_rows_R.to(dev)
            self._verdict_R = self._verdict_R & ~new
            self._acc_R = self._acc_R.masked_fill(new, init)
            self._count_R = self._count_R.masked_fill(new, 0.0)
            if self._acc_RD is not None:
                self._acc_RD = self._acc_RD.masked_fill(new[:, None], 0.0)
        if self._score_R is None or self._score_R.shape[0] != R:
            self._score_R = torch.full((R,), torch.nan, device=dev)
        self._score_R = self._score_R.masked_fill(tb.new_rows_R.to(dev), torch.nan)

    def _prompt_verdict(self, x_ND: Tensor, cache: LatentCache, tb: TokenBatch) -> Tensor:
        """Accumulate the prompt's score (or activation) per row; the verdict is fixed at the row's last prompt
        token."""
        dev = x_ND.device
        self._reset(tb, dev)
        assert self._verdict_R is not None and self._acc_R is not None and self._count_R is not None
        assert self._score_R is not None
        prompt, last = tb.is_prompt_N, tb.last_prompt_N
        rows = tb.row_N[prompt]
        if self._pools_activations:
            x = cache.x_in_ND.float()
            if self._acc_RD is None or self._acc_RD.shape != (tb.n_rows, x.shape[1]):
                self._acc_RD = torch.zeros(tb.n_rows, x.shape[1], device=dev)
            self._acc_RD = self._acc_RD.index_add(0, rows, x[prompt])
            self._count_R = self._count_R.index_add(0, rows, torch.ones(len(rows), device=dev))
        else:
            s_N = self.score(x_ND, cache).float()
            s = s_N[prompt]
            if self.aggregate == "max":
                self._acc_R = self._acc_R.scatter_reduce(0, rows, s, reduce="amax")
            elif self.aggregate == "mean":
                self._acc_R = self._acc_R.index_add(0, rows, s)
                self._count_R = self._count_R.index_add(0, rows, torch.ones_like(s))
        if bool(last.any()):
            done_rows = tb.row_N[last]
            if self._pools_activations:
                assert self._acc_RD is not None and self.pooled is not None
                mean_RD = self._acc_RD[done_rows] / self._count_R[done_rows].clamp_min(1)[:, None]
                value = self.pooled(mean_RD).float()
            elif self.aggregate == "last":
                value = s_N[last]
            elif self.aggregate == "max":
                value = self._acc_R[done_rows]
            else:
                value = self._acc_R[done_rows] / self._count_R[done_rows].clamp_min(1)
            self._verdict_R = self._verdict_R.index_put((done_rows,), self.fires(value))
            self._score_R = self._score_R.index_put((done_rows,), value)
        return self._verdict_R


@dataclass(frozen=True)
class Policy:
    """A resolved :class:`~steerlib.config.ApplyPolicy` plus the rows it is limited to (per-row steering)."""

    select: Selector
    exclude: Selector | None = None
    gate: Gate | None = None
    rows: tuple[bool, ...] | None = None
    """For per-row steering: one flag per row of the batch saying whether this policy's config applies to it."""

    def static_mask(self, tb: TokenBatch) -> Tensor:
        """Everything but the gate: cheap, and decides whether the op has anything to do this step."""
        m = self.select.mask(tb)
        if self.exclude is not None:
            m &= ~self.exclude.mask(tb)
        if self.rows is not None:
            if len(self.rows) != tb.n_rows:
                raise ValueError(
                    f"steering was given {len(self.rows)} per-row configs but the batch has {tb.n_rows} rows; "
                    "pass exactly one config (or None) per row"
                )
            m &= torch.tensor(self.rows, dtype=torch.bool, device=m.device)[tb.row_N]
        return m
