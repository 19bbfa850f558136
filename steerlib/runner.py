"""Run a site's bound ops on one step's activations: backend-independent (HF hooks and vLLM both call this)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from steerlib.plan import BoundOp
from steerlib.policy import LatentCache
from steerlib.tokens import TokenBatch


def run_site(ops: Sequence[BoundOp], x_ND: Tensor, tb: TokenBatch, x_in_ND: Tensor | None = None) -> Tensor:
    """Apply ``ops`` in order. ``x_in_ND`` is the MLP input for transcoder ops (None otherwise).

    An op whose static mask is empty this step is skipped (a prompt-only policy costs nothing while decoding),
    except that a prompt-scoped gate still reads the prompt so its verdict is ready for later steps.
    """
    for b in ops:
        mask_N = b.policy.static_mask(tb)
        gate = b.policy.gate
        needs_gate_update = gate is not None and gate.scope == "prompt" and bool(tb.is_prompt_N.any())
        if not needs_gate_update and not bool(mask_N.any()):
            continue
        cache = LatentCache(x_in_ND if b.reads_mlp_in and x_in_ND is not None else x_ND)
        if gate is not None:
            mask_N = mask_N & gate.mask(x_ND, cache, tb)
            if not bool(mask_N.any()):
                continue
        # No no_grad here: ReFAT-style training backpropagates through an ablation.
        x_ND = b.op(x_ND, cache, mask_N)
    return x_ND
