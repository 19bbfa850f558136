"""The refusal feature of a model and its ablation, as ReFAT trains against them.

Per decoder layer, the refusal feature is the difference of mean residual-stream activations, harmful minus harmless,
at the last prompt token (Arditi et al., arXiv 2406.11717); ReFAT (Yu et al., arXiv 2409.20089) projects it out of
every layer's output for the harmful rows of a batch, so the model learns to refuse by other routes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from evals.recipes.refat_data import forward_padded, prompt_ids
from steerlib.extract.activations import left_pad, pad_id_of
from steerlib.hf.layout import get_layout


def refusal_features(
    model: nn.Module, tokenizer: Any, harmful: Sequence[str], harmless: Sequence[str], *, batch_size: int = 16
) -> Tensor:
    """``(L, D)``: per decoder layer, mean(harmful) - mean(harmless) of its output at the last prompt token."""
    device = next(model.parameters()).device

    def means(prompts: Sequence[str]) -> Tensor:
        seqs = prompt_ids(tokenizer, prompts)
        total: Tensor | None = None
        for start in range(0, len(seqs), batch_size):
            ids, mask = left_pad(seqs[start : start + batch_size], pad_id_of(tokenizer), device)
            with torch.no_grad():
                hs = forward_padded(model, ids, mask, output_hidden_states=True).hidden_states
            last_LBD = torch.stack([h[:, -1].float() for h in hs[1:]])
            total = last_LBD.sum(1) if total is None else total + last_LBD.sum(1)
        assert total is not None
        return total / len(seqs)

    if not harmful or not harmless:
        raise ValueError(f"need harmful and harmless prompts, got {len(harmful)} and {len(harmless)}")
    was_training = model.training
    model.eval()
    try:
        return means(harmful) - means(harmless)
    finally:
        model.train(was_training)


@contextmanager
def ablated(model: nn.Module, features_LD: Tensor, rows_B: Tensor) -> Iterator[None]:
    """Project each layer's feature out of that layer's output, for the rows where ``rows_B`` is set."""
    layout = get_layout(model)
    if features_LD.shape[0] != layout.n_layers:
        raise ValueError(f"got {features_LD.shape[0]} feature directions for a model of {layout.n_layers} layers")
    unit_LD = features_LD / features_LD.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    handles = []

    def hook_for(u_D: Tensor) -> Any:
        def hook(mod: nn.Module, args: Any, output: Any) -> Any:
            h = output[0] if isinstance(output, tuple) else output
            u = u_D.to(h.dtype)
            h = h - rows_B.to(h.dtype)[:, None, None] * (h @ u)[..., None] * u
            return (h, *output[1:]) if isinstance(output, tuple) else h

        return hook

    try:
        for i in range(layout.n_layers):
            handles.append(layout.layer(i).register_forward_hook(hook_for(unit_LD[i])))
        yield
    finally:
        for handle in handles:
            handle.remove()
