"""Run a site's bound ops on one step's activations: backend-independent (HF hooks and vLLM both call this)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from steerlib.plan import BoundOp
from steerlib.policy import LatentCache
from steerlib.run_state import RunState
from steerlib.tokens import TokenBatch


def run_site(
    ops: Sequence[BoundOp], x_ND: Tensor, tb: TokenBatch, state: RunState, x_in_ND: Tensor | None = None
) -> Tensor:
    """Apply ``ops`` in order; prompt-scoped gates read and write their verdicts in ``state``. ``x_in_ND`` is the MLP
    input for transcoder ops (None otherwise).

    No host sync and no branch on tensor data: an op runs on the whole step and writes only the tokens its mask
    selects. What the host knows decides which ops run at all (``Policy.may_apply``: a prompt-only op costs nothing
    while decoding), so the same code is graph-safe and cheap.
    """
    for b in ops:
        if not b.policy.may_apply(tb) or (b.op is None and not tb.has_prompt):
            continue
        cache = LatentCache(x_in_ND if b.reads_mlp_in and x_in_ND is not None else x_ND)
        mask_N = b.policy.static_mask(tb)
        gate = b.policy.gate
        if gate is not None:
            gs = state.gate(b.order, gate, tb.n_rows) if gate.scope == "prompt" else None
            mask_N = mask_N & gate.mask(x_ND, cache, tb, gs)
        if b.op is not None:
            # No no_grad here: ReFAT-style training backpropagates through an ablation.
            x_ND = b.op(x_ND, cache, mask_N)
    return x_ND
