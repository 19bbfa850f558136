"""Probes on activations, to use as steering conditions: which prompts or tokens show a property.

A logistic probe, ``p(y | x) = sigmoid(w·x + b)``, is an L2-regularised logistic regression fitted with L-BFGS on
standardised activations and folded back to raw activations, so it runs as a plain ``when: {vector: w, metric: dot,
above: t - b}`` condition (save ``w`` with :class:`~steerlib.vectors.SteeringVector`; Alain & Bengio, arXiv
1610.01644). An MLP probe (one ReLU hidden layer, AdamW, full batch, seeded) is folded back the same way into a
:class:`~steerlib.mlp_probe.MlpProbe`, run as a ``when: {probe: FILE, above: t}`` condition.

    acts_pos, acts_neg = ...                      # (N, D) activations, e.g. from steerlib.hf.recording.record
    probe = fit_mlp_probe(acts_pos, acts_neg)
    probe.save("probes/harm.safetensors")         # when: {probe: probes/harm.safetensors, above: 0.0, ...}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from steerlib.mlp_probe import MlpProbe


@dataclass(frozen=True)
class LinearProbe:
    weight_D: Tensor
    bias: float

    def scores(self, x_ND: Tensor) -> Tensor:
        return x_ND.float() @ self.weight_D + self.bias


class Probe(Protocol):
    def scores(self, x_ND: Tensor) -> Tensor: ...


def _example_weights(n_pos: int, n_neg: int, neg_weight_N: Tensor | None, device: torch.device) -> Tensor:
    """Per-example loss weights on ``device``: half to the positives (equal), half to the negatives (by
    ``neg_weight_N``)."""
    if neg_weight_N is None:
        w_neg = torch.ones(n_neg, dtype=torch.float64, device=device)
    else:
        w_neg = neg_weight_N.to(device=device, dtype=torch.float64)
    if w_neg.shape != (n_neg,) or bool((w_neg < 0).any()) or float(w_neg.sum()) <= 0:
        raise ValueError(f"neg_weight_N must be {n_neg} non-negative weights with a positive sum")
    w_pos = torch.full((n_pos,), 0.5 / n_pos, dtype=torch.float64, device=device)
    return torch.cat([w_pos, 0.5 * w_neg / w_neg.sum()])


def _labels(n_pos: int, n_neg: int, device: torch.device) -> Tensor:
    """1 for each positive, then 0 for each negative (float32)."""
    return torch.cat([torch.ones(n_pos, device=device), torch.zeros(n_neg, device=device)])


def fit_logistic_probe(
    pos_ND: Tensor, neg_ND: Tensor, *, l2: float = 1e-2, steps: int = 200, neg_weight_N: Tensor | None = None
) -> LinearProbe:
    """Logistic regression of positives (label 1) against negatives (label 0), classes weighted equally.

    ``neg_weight_N`` (optional, non-negative) spreads the negative class's half of the loss unevenly over the
    negatives, e.g. to give each harmless dataset the same weight however many prompts it has.
    """
    x = torch.cat([pos_ND, neg_ND]).double()
    y = _labels(len(pos_ND), len(neg_ND), x.device).double()
    weights = _example_weights(len(pos_ND), len(neg_ND), neg_weight_N, x.device)
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mu) / sd
    w = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        logits = z @ w + b
        loss = (torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none") * weights).sum()
        loss = loss + l2 * (w @ w)
        loss.backward()
        return loss

    opt.step(closure)
    w_raw = (w.detach() / sd).float()
    return LinearProbe(w_raw, float(b.detach() - (w.detach() / sd) @ mu))


def fit_mlp_probe(
    pos_ND: Tensor,
    neg_ND: Tensor,
    *,
    hidden: int = 32,
    weight_decay: float = 1e-2,
    epochs: int = 300,
    lr: float = 1e-3,
    seed: int = 0,
    neg_weight_N: Tensor | None = None,
) -> MlpProbe:
    """A one-hidden-layer ReLU probe, positives against negatives with the loss weighted as in
    :func:`fit_logistic_probe`, trained full batch with AdamW from a seeded initialisation on standardised
    activations."""
    x = torch.cat([pos_ND, neg_ND]).float()
    y = _labels(len(pos_ND), len(neg_ND), x.device)
    weights = _example_weights(len(pos_ND), len(neg_ND), neg_weight_N, x.device).float()
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mu) / sd
    # The initialisation is drawn on the CPU, so one seed gives one probe whatever device trains it.
    gen = torch.Generator(device="cpu").manual_seed(seed)
    bound = 1 / x.shape[1] ** 0.5
    W = ((torch.rand(hidden, x.shape[1], generator=gen, device="cpu") * 2 - 1) * bound).to(x.device).requires_grad_()
    b1 = ((torch.rand(hidden, generator=gen, device="cpu") * 2 - 1) * bound).to(x.device).requires_grad_()
    w = ((torch.rand(hidden, generator=gen, device="cpu") * 2 - 1) / hidden**0.5).to(x.device).requires_grad_()
    b = torch.zeros((), device=x.device, requires_grad=True)
    opt = torch.optim.AdamW([W, b1, w, b], lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        opt.zero_grad()
        logits = torch.relu(z @ W.T + b1) @ w + b
        loss = (torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none") * weights).sum()
        loss.backward()
        opt.step()
    with torch.no_grad():  # fold the standardisation into the first layer: W z + b1 = (W / sd) x + (b1 - (W / sd) mu)
        W_raw = W / sd
        return MlpProbe(W_raw.clone(), (b1 - W_raw @ mu).clone(), w.clone(), b.clone())
