"""What each token of a forward step is: which row it belongs to, its position, prompt or generated.

Backends describe a step as a flat list of N tokens (HF's ``(B, T)`` batch is flattened row-major; vLLM's batch is
flat already), so the policies and ops in ``steerlib.policy`` / ``steerlib.ops`` are written once for both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class TokenBatch:
    """Per-token facts of one forward step (N tokens from R rows)."""

    row_N: Tensor
    """Row (sequence / request) each token belongs to, ``(N,)`` long."""
    position_N: Tensor
    """Position of the token in its sequence, 0 = first non-padding token; -1 for padding. ``(N,)`` long."""
    is_prompt_N: Tensor
    """True for prompt tokens, False for generated ones and for padding. ``(N,)`` bool."""
    prompt_len_R: Tensor
    """Number of prompt tokens of each row, ``(R,)`` long."""
    token_ids_N: Tensor | None
    """Token ids, ``(N,)`` long; None when the model was fed embeddings."""
    new_rows_R: Tensor
    """Rows whose sequence starts in this step (their per-row state must be reset), ``(R,)`` bool."""
    has_prompt: bool = True
    """Host-side: the step may hold prompt tokens (False only when certainly not). Lets a prompt-only op be skipped
    without reading a device tensor (no host sync on the hot path)."""
    has_generated: bool = True
    """Host-side: the step may hold generated tokens (False only when certainly not)."""

    @property
    def n_rows(self) -> int:
        return int(self.prompt_len_R.shape[0])

    @property
    def valid_N(self) -> Tensor:
        return self.position_N >= 0

    @property
    def last_prompt_N(self) -> Tensor:
        """True at the last prompt token of each row."""
        return self.is_prompt_N & (self.position_N == self.prompt_len_R[self.row_N] - 1)


def from_padded(
    attention_mask_BS: Tensor | None,
    batch: int,
    n_new: int,
    past_len: int,
    prompt_len_B: Tensor | None,
    token_ids_BT: Tensor | None,
    device: torch.device,
) -> TokenBatch:
    """Describe an HF step: ``n_new`` tokens per row after ``past_len`` cached ones, left padding in the mask.

    ``prompt_len_B`` is the prompt length recorded when the sequence started; None means this step starts it.
    """
    if attention_mask_BS is not None and attention_mask_BS.dim() == 2:
        mask = attention_mask_BS.to(device=device, dtype=torch.long)
        pos_BS = mask.cumsum(-1) - 1
        pos_BT = pos_BS[:, -n_new:].masked_fill(mask[:, -n_new:] == 0, -1)
    else:
        pos_BT = (torch.arange(n_new, device=device) + past_len).expand(batch, n_new)
    new_rows = prompt_len_B is None
    if prompt_len_B is None:
        prompt_len_B = (pos_BT >= 0).sum(-1)
    row_BT = torch.arange(batch, device=device)[:, None].expand(batch, n_new)
    is_prompt_BT = (pos_BT >= 0) & (pos_BT < prompt_len_B[:, None])
    return TokenBatch(
        row_N=row_BT.reshape(-1),
        position_N=pos_BT.reshape(-1),
        is_prompt_N=is_prompt_BT.reshape(-1),
        prompt_len_R=prompt_len_B,
        token_ids_N=None if token_ids_BT is None else token_ids_BT.reshape(-1).to(device),
        new_rows_R=torch.full((batch,), new_rows, dtype=torch.bool, device=device),
        has_prompt=new_rows,
        has_generated=not new_rows,
    )
