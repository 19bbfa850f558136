"""What happens while a plan runs, kept apart from the plan: per-row accumulators and verdicts of prompt-scoped gates.

A :class:`~steerlib.plan.Plan` says what a config means and never changes; a :class:`RunState` belongs to one handle
(HF) or one engine's group of requests (vLLM) and holds, for each prompt-scoped gate, a :class:`GateState`: per-row
sums of the prompt's scores (or activations), and the verdict and score fixed at the row's last prompt token.

Every update is fixed-shape tensor arithmetic written in place into buffers made once per batch size: no host sync,
no branch on data, so the same code runs under ``torch.compile(fullgraph=True)`` and inside captured CUDA graphs
(where buffers must keep their addresses), and a prompt read in several chunks gives the verdict it gives in one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from steerlib.policy import Gate, LatentCache
from steerlib.tokens import TokenBatch


@dataclass
class GateState:
    """One prompt-scoped gate's per-row state, ``R`` rows, on one device."""

    verdict_R: Tensor
    """Whether the gate fired on the row's prompt (False until decided)."""
    score_R: Tensor
    """The prompt score the verdict was decided on (NaN until decided)."""
    acc_R: Tensor
    """Running sum (mean) or max of the prompt's per-token scores."""
    count_R: Tensor
    """Prompt tokens read so far."""
    acc_RD: Tensor | None = None
    """Running sum of the prompt's activations (a pooled mean: an MLP probe scores the mean activation; the prefix
    sum that windows are cut from)."""
    ring_RWD: Tensor | None = None
    """With ``window_max``: the prefix sums at the row's last ``w`` prompt positions (slot ``position % w``; slot
    ``w`` takes the writes of tokens that are not among them, so every write has a fixed shape)."""

    @classmethod
    def empty(cls, gate: Gate, n_rows: int, d_model: int, device: torch.device) -> GateState:
        windowed = gate.aggregate == "window_max"
        return cls(
            verdict_R=torch.zeros(n_rows, dtype=torch.bool, device=device),
            score_R=torch.full((n_rows,), torch.nan, device=device),
            acc_R=torch.full((n_rows,), _init(gate), device=device),
            count_R=torch.zeros(n_rows, device=device),
            acc_RD=torch.zeros(n_rows, d_model, device=device) if gate.pools_activations or windowed else None,
            ring_RWD=torch.zeros(n_rows, gate.window + 1, d_model, device=device) if windowed else None,
        )

    @property
    def n_rows(self) -> int:
        return int(self.verdict_R.shape[0])

    def decided(self) -> tuple[Tensor, Tensor]:
        """Per-row verdicts and the scores they were decided on (NaN: the row's prompt is not fully read yet)."""
        return self.verdict_R, self.score_R

    def read_prompt(self, gate: Gate, x_ND: Tensor, cache: LatentCache, tb: TokenBatch) -> None:
        """Add this step's prompt tokens to each row's accumulator; fix the verdict of rows whose last prompt token
        is in the step. Rows whose sequence starts in this step are cleared first."""
        self._clear(gate, tb.new_rows_R)
        rows_N, prompt_N = tb.row_N, tb.is_prompt_N
        w_N = prompt_N.to(self.count_R.dtype)
        self.count_R.index_add_(0, rows_N, w_N)
        s_N: Tensor | None = None
        if gate.aggregate == "window_max":
            s_N = self._window_scores(gate, cache.x_in_ND.float() * w_N[:, None], tb)
            self.acc_R.scatter_reduce_(0, rows_N, s_N.masked_fill(~prompt_N, -torch.inf), reduce="amax")
        elif self.acc_RD is not None:
            self.acc_RD.index_add_(0, rows_N, cache.x_in_ND.float() * w_N[:, None])
        else:
            s_N = gate.score(x_ND, cache).float()
            if gate.aggregate == "max":
                self.acc_R.scatter_reduce_(0, rows_N, s_N.masked_fill(~prompt_N, -torch.inf), reduce="amax")
            elif gate.aggregate == "mean":
                self.acc_R.index_add_(0, rows_N, s_N.masked_fill(~prompt_N, 0.0))
        last_N = tb.last_prompt_N
        done_R = torch.zeros_like(self.count_R).index_add_(0, rows_N, last_N.to(self.count_R.dtype)) > 0
        value_R = self._value(gate, s_N, last_N, rows_N)
        self.verdict_R.copy_(torch.where(done_R, gate.fires(value_R), self.verdict_R))
        self.score_R.copy_(torch.where(done_R, value_R, self.score_R))

    def _clear(self, gate: Gate, new_R: Tensor) -> None:
        self.verdict_R.masked_fill_(new_R, False)
        self.score_R.masked_fill_(new_R, torch.nan)
        self.acc_R.masked_fill_(new_R, _init(gate))
        self.count_R.masked_fill_(new_R, 0.0)
        if self.acc_RD is not None:
            self.acc_RD.masked_fill_(new_R[:, None], 0.0)
        if self.ring_RWD is not None:
            self.ring_RWD.masked_fill_(new_R[:, None, None], 0.0)

    def _window_scores(self, gate: Gate, x_ND: Tensor, tb: TokenBatch) -> Tensor:
        """The score of the mean activation over the last ``w`` prompt tokens (fewer at the start) at every token.

        A window's sum is the prefix sum at its last token minus the one ``w`` positions back, taken from this step
        (a row's prompt tokens are contiguous in a step) or from the ring of earlier steps' prefix sums; the prefix
        sums are updated in place. Fixed shapes throughout (chunked prefill gives the verdict of one step)."""
        assert self.acc_RD is not None and self.ring_RWD is not None
        w, rows_N, pos_N, prompt_N = gate.window, tb.row_N, tb.position_N, tb.is_prompt_N
        n, dev = x_ND.shape[0], x_ND.device
        idx_N = torch.arange(n, device=dev)
        csum_ND = x_ND.cumsum(0)
        start_R = torch.full_like(self.count_R, n, dtype=torch.long).scatter_reduce(0, rows_N, idx_N, "amin")
        before_RD = torch.where((start_R > 0)[:, None], csum_ND[(start_R - 1).clamp_min(0)], 0.0)
        prefix_ND = self.acc_RD[rows_N] + csum_ND - before_RD[rows_N]
        back_N = pos_N - w
        far_R = torch.full_like(start_R, 2**62)
        first_R = far_R.scatter_reduce(0, rows_N, torch.where(prompt_N, pos_N, 2**62), "amin")
        in_step = back_N >= first_R[rows_N]
        ring_ND = self.ring_RWD[rows_N, back_N.remainder(w)]
        back_ND = torch.where(in_step[:, None], prefix_ND[(idx_N - w).clamp_min(0)], ring_ND)
        back_ND = torch.where((back_N >= 0)[:, None], back_ND, 0.0)
        mean_ND = (prefix_ND - back_ND) / (pos_N + 1).clamp(1, w).to(x_ND.dtype)[:, None]
        last_R = torch.full_like(start_R, -1).scatter_reduce(0, rows_N, torch.where(prompt_N, pos_N, -1), "amax")
        keep_N = prompt_N & (pos_N > last_R[rows_N] - w)
        self.ring_RWD.index_put_((rows_N, torch.where(keep_N, pos_N.remainder(w), w)), prefix_ND)
        self.acc_RD.index_add_(0, rows_N, x_ND)
        if gate.pooled is not None:
            return gate.pooled(mean_ND).float()
        return gate.score(mean_ND, LatentCache(mean_ND)).float()

    def _value(self, gate: Gate, s_N: Tensor | None, last_N: Tensor, rows_N: Tensor) -> Tensor:
        """Each row's prompt score as it stands (only read where the row's last prompt token is in the step)."""
        if gate.aggregate == "window_max":
            return self.acc_R.clone()
        if self.acc_RD is not None:
            assert gate.pooled is not None
            return gate.pooled(self.acc_RD / self.count_R.clamp_min(1)[:, None]).float()
        assert s_N is not None
        if gate.aggregate == "last":
            return torch.zeros_like(self.acc_R).index_add_(0, rows_N, s_N.masked_fill(~last_N, 0.0))
        if gate.aggregate == "max":
            return self.acc_R.clone()
        return self.acc_R / self.count_R.clamp_min(1)


def _init(gate: Gate) -> float:
    return -torch.inf if gate.aggregate in ("max", "window_max") else 0.0


@dataclass
class RunState:
    """The run state of one plan on one model: a :class:`GateState` per prompt-scoped gate, keyed by the bound op's
    ``order``. Buffers are made on first use and remade only when the number of rows changes (a new batch)."""

    d_model: int
    device: torch.device
    gates: dict[int, GateState] = field(default_factory=dict)

    def gate(self, order: int, gate: Gate, n_rows: int) -> GateState:
        st = self.gates.get(order)
        if st is None or st.n_rows != n_rows:
            st = self.gates[order] = GateState.empty(gate, n_rows, self.d_model, self.device)
        return st

    def decided(self, order: int) -> tuple[Tensor, Tensor] | None:
        """The verdicts of the gate of bound op ``order``, or None if it has not read a prompt yet."""
        st = self.gates.get(order)
        return None if st is None else st.decided()
