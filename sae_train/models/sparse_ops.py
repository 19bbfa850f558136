"""Top-k encoding with a sparse backward pass (the trick of Gao et al., arXiv 2406.04093, and sparsify's kernels).

The forward pass needs every pre-activation (a dense ``x @ W_enc``), but only the k winners per token receive a
gradient, so the encoder's weight gradient ``x^T @ G`` is a product with a matrix of N·k non-zeros, not N·F: computed
as a sparse-dense product it costs N·k·D instead of N·F·D. The decoder is read with ``embedding_bag`` from the k
indices, so no dense ``(N, F)`` latent tensor is built in either direction.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx


class _TopKEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, x_ND: Tensor, W_enc_DF: Tensor, b_enc_F: Tensor, k: int) -> tuple[Tensor, Tensor]:
        pre_NF = torch.addmm(b_enc_F.to(x_ND.dtype), x_ND, W_enc_DF.to(x_ND.dtype))
        values_NK, indices_NK = pre_NF.topk(k, dim=-1, sorted=False)
        values_NK = values_NK.relu()
        ctx.save_for_backward(x_ND, W_enc_DF, values_NK, indices_NK)
        ctx.mark_non_differentiable(indices_NK)
        return values_NK, indices_NK

    @staticmethod
    def backward(ctx: Any, grad_values_NK: Tensor, _grad_indices: Tensor | None) -> tuple[Tensor | None, ...]:
        x_ND, W_enc_DF, values_NK, indices_NK = ctx.saved_tensors
        g_NK = (grad_values_NK * (values_NK > 0)).to(W_enc_DF.dtype)  # relu: no gradient to clipped slots
        n, k = g_NK.shape
        F = W_enc_DF.shape[1]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.nn.functional.embedding_bag(
                indices_NK, W_enc_DF.T.contiguous(), per_sample_weights=g_NK, mode="sum"
            ).to(x_ND.dtype)
        if ctx.needs_input_grad[1]:
            rows = torch.arange(n, device=x_ND.device).repeat_interleave(k)
            where = torch.stack([indices_NK.reshape(-1), rows])
            G_FN = torch.sparse_coo_tensor(where, g_NK.reshape(-1), (F, n), check_invariants=False)
            grad_w = torch.sparse.mm(G_FN, x_ND.to(W_enc_DF.dtype)).T
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(F, dtype=W_enc_DF.dtype, device=W_enc_DF.device)
            grad_b.index_add_(0, indices_NK.reshape(-1), g_NK.reshape(-1))
        return grad_x, grad_w, grad_b, None


def topk_encode(x_ND: Tensor, W_enc_DF: Tensor, b_enc_F: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``(relu of the k largest pre-activations, their indices)``, each ``(N, K)``, with a sparse backward."""
    out: tuple[Tensor, Tensor] = _TopKEncode.apply(x_ND, W_enc_DF, b_enc_F, k)
    return out


def sparse_decode(values_NK: Tensor, indices_NK: Tensor, W_dec_FD: Tensor) -> Tensor:
    """``sum_k values[n, k] * W_dec[indices[n, k]]`` ``(N, D)`` without the bias."""
    return torch.nn.functional.embedding_bag(
        indices_NK, W_dec_FD, per_sample_weights=values_NK.to(W_dec_FD.dtype), mode="sum"
    )
