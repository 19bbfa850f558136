"""Probes on activations and the ROC facts a detector is judged by.

The linear probe is an L2-regularised logistic regression ``p(harmful | x) = sigmoid(w·x + b)`` fitted with L-BFGS
on standardised activations and folded back to raw activations, so that it runs inside a steering config as a plain
``when: {vector: w, metric: dot, above: -b}`` condition (Alain & Bengio, arXiv 1610.01644, linear probes).
The MLP probe (one ReLU hidden layer, AdamW, full batch, seeded) is folded back the same way into a
:class:`steerlib.mlp_probe.MlpProbe`, run as a ``when: {probe: FILE}`` condition.
"""

from __future__ import annotations

from collections.abc import Callable
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


def _example_weights(n_pos: int, n_neg: int, neg_weight_N: Tensor | None) -> Tensor:
    """Per-example loss weights: half to the positives (equal), half to the negatives (by ``neg_weight_N``)."""
    w_neg = torch.ones(n_neg, dtype=torch.float64) if neg_weight_N is None else neg_weight_N.double()
    if w_neg.shape != (n_neg,) or bool((w_neg < 0).any()) or float(w_neg.sum()) <= 0:
        raise ValueError(f"neg_weight_N must be {n_neg} non-negative weights with a positive sum")
    return torch.cat([torch.full((n_pos,), 0.5 / n_pos, dtype=torch.float64), 0.5 * w_neg / w_neg.sum()])


def fit_probe(
    pos_ND: Tensor, neg_ND: Tensor, *, l2: float = 1e-2, steps: int = 200, neg_weight_N: Tensor | None = None
) -> LinearProbe:
    """Logistic regression of positives (label 1) against negatives (label 0), classes weighted equally.

    ``neg_weight_N`` (optional, non-negative) spreads the negative class's half of the loss unevenly over the
    negatives, e.g. to give each harmless dataset the same weight however many prompts it has.
    """
    x = torch.cat([pos_ND, neg_ND]).double()
    y = torch.cat([torch.ones(len(pos_ND)), torch.zeros(len(neg_ND))]).double()
    weights = _example_weights(len(pos_ND), len(neg_ND), neg_weight_N)
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mu) / sd
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
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
    """A one-hidden-layer ReLU probe, positives against negatives with the loss weighted as in :func:`fit_probe`,
    trained full batch with AdamW from a seeded initialisation on standardised activations."""
    x = torch.cat([pos_ND, neg_ND]).float()
    y = torch.cat([torch.ones(len(pos_ND)), torch.zeros(len(neg_ND))])
    weights = _example_weights(len(pos_ND), len(neg_ND), neg_weight_N).float()
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mu) / sd
    gen = torch.Generator().manual_seed(seed)
    bound = 1 / x.shape[1] ** 0.5
    W = ((torch.rand(hidden, x.shape[1], generator=gen) * 2 - 1) * bound).requires_grad_()
    b1 = ((torch.rand(hidden, generator=gen) * 2 - 1) * bound).requires_grad_()
    w = ((torch.rand(hidden, generator=gen) * 2 - 1) / hidden**0.5).requires_grad_()
    b = torch.zeros((), requires_grad=True)
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


ProbeFit = Callable[[Tensor, Tensor, Tensor | None], Probe]
"""Fits a probe on ``(positives, negatives, negative weights)``."""


def roc_auc(pos_scores: Tensor, neg_scores: Tensor) -> float:
    """Probability that a random positive outscores a random negative (ties count half)."""
    p, n = pos_scores.double()[:, None], neg_scores.double()[None, :]
    return float(((p > n).double() + 0.5 * (p == n).double()).mean())


def threshold_at_fpr(neg_scores: Tensor, max_fpr: float) -> float:
    """The lowest threshold whose false-positive rate (score > threshold) on ``neg_scores`` is at most ``max_fpr``."""
    if not 0.0 <= max_fpr < 1.0:
        raise ValueError(f"max_fpr must be in [0, 1), got {max_fpr}")
    s = neg_scores.double().sort(descending=True).values
    allowed = int(max_fpr * len(s))  # this many negatives may score above the threshold
    return float(s[allowed])


def rate_above(scores: Tensor, threshold: float) -> float:
    return float((scores > threshold).double().mean()) if len(scores) else float("nan")


def out_of_fold_scores(
    pos_ND: Tensor,
    neg_ND: Tensor,
    fold_pos: Tensor,
    fold_neg: Tensor,
    *,
    fit: ProbeFit,
    folds: int,
    neg_weight_N: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Every example scored by a probe fitted without its fold: honest scores to pick settings and thresholds on."""
    s_pos, s_neg = torch.empty(len(pos_ND)), torch.empty(len(neg_ND))
    for k in range(folds):
        w = None if neg_weight_N is None else neg_weight_N[fold_neg != k]
        probe = fit(pos_ND[fold_pos != k], neg_ND[fold_neg != k], w)
        s_pos[fold_pos == k] = probe.scores(pos_ND[fold_pos == k])
        s_neg[fold_neg == k] = probe.scores(neg_ND[fold_neg == k])
    return s_pos, s_neg
